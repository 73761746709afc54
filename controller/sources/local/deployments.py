"""The deployment controller of the local control plane: Deployments become pods.

Kubernetes puts a ReplicaSet between a Deployment and its pods; here the Deployment owns its pods
directly (an ownerReference with ``kind: Deployment, controller: true``), and the ReplicaSet's
identity survives as the ``pod-template-hash`` label: the hash of the pod template, part of every
pod's name (``<deployment>-<hash>-<5 random characters>``, as Kubernetes names them).

Deciding is pure: `build_plan` takes a Deployment and the pods it owns and returns how many pods
of the current template to create, which pods to delete and the status to record.
`DeploymentController` carries plans out through the store's own API (so pods go through the
normal validation, defaulting and scheduling path) whenever a watch event touches a Deployment
or one of its pods. Nothing polls: the store's subscription drives everything, and a failed write
is retried with a backoff timer.

What a plan does, in this order:
- Pods that are terminating do not count (they are on their way out); pods that ended (phase
  Succeeded or Failed) are deleted, so they can be replaced.
- More current-template pods than `spec.replicas`: the surplus is deleted, pods that are not
  Ready before Ready ones, then the newest first (unscheduled and Pending pods go before Running
  ones).
- A rollout (pods of an older template exist): old pods that are not Ready are deleted at once
  (they serve nothing); old Ready pods are deleted only as new pods become Ready, keeping
  ``Ready(old) + Ready(new) >= spec.replicas``: the number of Ready pods never drops below
  what it was (at most `spec.replicas`). New pods are created up to `spec.replicas`, with at most
  a surge of 25% of `spec.replicas` (rounded up, at least 1) above it in total. This is
  Kubernetes' RollingUpdate with maxSurge 25% and maxUnavailable 0; `spec.strategy` is not served.
- Otherwise, missing pods are created.
A rollout whose new pods never become Ready stops there, as in Kubernetes: the old pods keep
serving and at most the surge is added. Once settled, exactly `spec.replicas` pods exist.

Garbage collection: the pods whose controller reference names a Deployment that no longer exists
(by uid: a new Deployment with the old name does not adopt them) are deleted. Deleting a
Deployment deletes its pods (gracefully, as any pod deletion). Pods without an owner are never
adopted.

Restart: everything is in the store (the template hash is in each pod's labels), so a controller
that starts reconciles every Deployment and every owner its pods name, and creates nothing that
exists already.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from controller.sources.local import kinds, reconciler
from controller.sources.local import store as store_mod
from meshcore import log
from meshcore.kube import errors, objects, resources

_LOG = logging.getLogger("controller.deployments")

DEPLOYMENTS = kinds.DEPLOYMENTS
API_VERSION = DEPLOYMENTS.api_version
KIND = DEPLOYMENTS.kind
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"

# Kubernetes' alphabets: no vowels (no accidental words), no look-alikes (0/o, 1/l).
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
SUFFIX_ALPHABET = _HASH_ALPHABET
SUFFIX_LENGTH = 5
# A generated name keeps at most this much of its base, so that base + suffix fits a label.
MAX_NAME_BASE = 63 - SUFFIX_LENGTH
_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
_PHASE_RANK = {"Pending": 0, "Unknown": 1, "Running": 2}
_MAX_NAME_TRIES = 5
# Pods one reconcile creates at most (Kubernetes' ReplicaSet controller has 500); the rest come
# in later passes, so that a Deployment of thousands of replicas does not hold the API.
BURST_REPLICAS = 100


# -- pure parts -------------------------------------------------------------------------------


def _fnv32a(data: bytes) -> int:
    value = _FNV32_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def build_template_hash(template: Mapping[str, Any]) -> str:
    """The ``pod-template-hash`` of a pod template: FNV-1a (32 bit) of its canonical JSON,
    written with Kubernetes' safe alphabet (e.g. ``7c5ddbdf54``). Equal templates, equal hashes;
    key order does not matter."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a template stored before lone surrogates were refused must not crash us.
    digits = str(_fnv32a(canonical.encode("utf-8", "surrogatepass")))
    return "".join(_HASH_ALPHABET[ord(c) % len(_HASH_ALPHABET)] for c in digits)


def random_suffix() -> str:
    return "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(SUFFIX_LENGTH))


def build_pod_name(deployment: str, template_hash: str, suffix: str) -> str:
    """``<deployment>-<hash>-<suffix>``; the base is cut to `MAX_NAME_BASE` characters first,
    as the API server does for a generateName."""
    base = f"{deployment}-{template_hash}-"
    return base[:MAX_NAME_BASE] + suffix


def build_owner_reference(deployment: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": objects.name(deployment),
        "uid": objects.uid(deployment),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def find_controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference with ``controller: true`` if it names a Deployment."""
    refs = objects.metadata(obj).get("ownerReferences")
    if not isinstance(refs, list):
        return None
    for ref in refs:
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            if ref.get("apiVersion") == API_VERSION and ref.get("kind") == KIND:
                return ref
            return None
    return None


def _spec(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = deployment.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def find_template(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    template = _spec(deployment).get("template")
    return template if isinstance(template, Mapping) else {}


def find_replicas(deployment: Mapping[str, Any]) -> int:
    replicas = _spec(deployment).get("replicas", 1)
    return replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else 1


def build_pod(deployment: Mapping[str, Any], template_hash: str, name: str) -> dict[str, Any]:
    """The pod `deployment` wants, named `name`: its template plus the hash label and the owner."""
    template = find_template(deployment)
    template_meta = template.get("metadata")
    if not isinstance(template_meta, Mapping):
        template_meta = {}
    meta: dict[str, Any] = {
        "name": name,
        "namespace": objects.namespace(deployment),
        "labels": {**objects.labels(template), POD_TEMPLATE_HASH_LABEL: template_hash},
        "ownerReferences": [build_owner_reference(deployment)],
    }
    annotations = template_meta.get("annotations")
    if isinstance(annotations, Mapping) and annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": copy.deepcopy(dict(template.get("spec") or {})),
    }


def _status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    status = pod.get("status")
    return status if isinstance(status, Mapping) else {}


def _phase(pod: Mapping[str, Any]) -> str:
    phase = _status(pod).get("phase")
    return phase if isinstance(phase, str) else "Pending"


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = _status(pod).get("conditions")
    if not isinstance(conditions, list):
        return False
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )


def _is_scheduled(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec")
    return isinstance(spec, Mapping) and bool(spec.get("nodeName"))


def rank_for_deletion(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods in the order a scale-down removes them: unscheduled before scheduled, Pending before
    Running, not Ready before Ready, then the newest first (by creation time, then name)."""
    newest_first = sorted(
        pods,
        key=lambda p: (str(objects.metadata(p).get("creationTimestamp") or ""), objects.name(p)),
        reverse=True,
    )
    return sorted(  # stable: keeps newest-first within each class
        newest_first,
        key=lambda p: (_is_scheduled(p), _PHASE_RANK.get(_phase(p), 1), is_pod_ready(p)),
    )


def max_surge(replicas: int) -> int:
    """How many pods a rollout may add above `replicas`: 25% rounded up, at least 1."""
    return max(1, math.ceil(replicas / 4))


@dataclasses.dataclass(frozen=True, slots=True)
class PodRef:
    name: str
    uid: str


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one reconcile of a Deployment does; `status` is what to record afterwards."""

    template_hash: str
    create: int
    delete: tuple[PodRef, ...]
    status: dict[str, Any]


def _ref(pod: Mapping[str, Any]) -> PodRef:
    return PodRef(objects.name(pod), objects.uid(pod))


def build_plan(deployment: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> Plan:
    """Decide for `deployment`, given the pods it controls (the module docstring has the rules).

    Terminating pods in `pods` are ignored; the status counts the pods that stay, before the
    ones to create exist (the next reconcile counts those).
    """
    replicas = find_replicas(deployment)
    template_hash = build_template_hash(find_template(deployment))
    live = [p for p in pods if not objects.is_terminating(p)]
    ended = [p for p in live if _phase(p) in _TERMINAL_PHASES]
    active = [p for p in live if _phase(p) not in _TERMINAL_PHASES]
    new = [p for p in active if objects.labels(p).get(POD_TEMPLATE_HASH_LABEL) == template_hash]
    old = [p for p in active if objects.labels(p).get(POD_TEMPLATE_HASH_LABEL) != template_hash]
    delete = list(ended)

    if len(new) > replicas:
        ranked = rank_for_deletion(new)
        cut = len(new) - replicas
        delete += ranked[:cut]
        new = ranked[cut:]
    if old:
        # Old pods that are not Ready serve nothing: they need not wait for the new ones.
        delete += [p for p in old if not is_pod_ready(p)]
        ranked = rank_for_deletion(p for p in old if is_pod_ready(p))
        ready_new = sum(1 for p in new if is_pod_ready(p))
        cut = len(ranked) - max(0, min(len(ranked), replicas - ready_new))
        delete += ranked[:cut]
        old = ranked[cut:]
        room = replicas + max_surge(replicas) - len(new) - len(old)
        create = max(0, min(replicas - len(new), room))
    else:
        create = max(0, replicas - len(new))

    staying = [*new, *old]
    ready = sum(1 for p in staying if is_pod_ready(p))
    generation = objects.metadata(deployment).get("generation")
    status = {
        "observedGeneration": generation if isinstance(generation, int) else 0,
        "replicas": len(staying),
        "updatedReplicas": len(new),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": max(0, replicas - ready),
    }
    return Plan(template_hash, create, tuple(_ref(p) for p in delete), status)


def build_watch_keys(event: objects.WatchEvent) -> list[tuple[str, str]]:
    """The (namespace, name) of the Deployments a store event concerns."""
    obj = event.object
    kind = obj.get("kind")
    if kind == KIND and obj.get("apiVersion") == API_VERSION:
        return [(objects.namespace(obj), objects.name(obj))]
    if kind == "Pod":
        ref = find_controller_ref(obj)
        if ref is not None and isinstance(ref.get("name"), str):
            return [(objects.namespace(obj), str(ref["name"]))]
    return []


# -- carrying plans out -----------------------------------------------------------------------


Key = reconciler.Key  # (namespace, deployment name)


class DeploymentController(reconciler.StoreReconciler):
    """Keeps every Deployment's pods and status in line with its spec (see the module doc).

    `run()` until cancelled. Reconciles are synchronous store calls made on the event loop, so
    a reconcile always sees the store's current state, including its own earlier writes: no
    expectations bookkeeping is needed to avoid double creates.
    """

    noun = "deployment"

    def __init__(
        self,
        object_store: store_mod.ObjectStore,
        *,
        make_suffix: Callable[[], str] = random_suffix,
        initial_retry: float = 0.5,
        max_retry: float = 30.0,
    ) -> None:
        # Every kind: Deployments, and pods (their owners are what an event concerns).
        super().__init__(
            object_store, watched=None, initial_retry=initial_retry, max_retry=max_retry
        )
        self._make_suffix = make_suffix

    def find_all_keys(self) -> Iterable[Key]:
        """Every Deployment, and every owner that any pod names (garbage)."""
        for deployment in self._store.list(DEPLOYMENTS).items:
            yield (objects.namespace(deployment), objects.name(deployment))
        for pod in self._store.list(resources.PODS).items:
            ref = find_controller_ref(pod)
            if ref is not None and isinstance(ref.get("name"), str):
                yield (objects.namespace(pod), str(ref["name"]))

    def find_event_keys(self, event: objects.WatchEvent) -> Iterable[Key]:
        return build_watch_keys(event)

    def _owned_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Pods in `namespace` whose controller reference names Deployment `name`."""
        found = []
        for pod in self._store.list(resources.PODS, namespace).items:
            ref = find_controller_ref(pod)
            if ref is not None and ref.get("name") == name:
                found.append(pod)
        return found

    def reconcile_one(self, namespace: str, name: str) -> None:
        deployment = self._store.find(DEPLOYMENTS, name, namespace)
        uid = objects.uid(deployment) if deployment is not None else None
        mine: list[dict[str, Any]] = []
        for pod in self._owned_pods(namespace, name):
            owner = find_controller_ref(pod)
            if owner is not None and owner.get("uid") == uid:
                mine.append(pod)
            elif not objects.is_terminating(pod):
                # The owner is gone (or is another incarnation of the name): garbage.
                self._delete_pod(namespace, _ref(pod), reason="owner deleted")
        if deployment is None:
            return
        plan = build_plan(deployment, mine)
        for doomed in plan.delete:
            self._delete_pod(namespace, doomed, reason="scaled down or replaced")
        for _ in range(min(plan.create, BURST_REPLICAS)):
            self._create_pod(deployment, plan.template_hash)
        if plan.create > BURST_REPLICAS:
            self.requeue(namespace, name)  # the rest after the API has had its turn
        self._record_status(deployment, plan.status)

    def _create_pod(self, deployment: dict[str, Any], template_hash: str) -> None:
        namespace, name = objects.namespace(deployment), objects.name(deployment)
        for attempt in range(_MAX_NAME_TRIES):
            pod_name = build_pod_name(name, template_hash, self._make_suffix())
            try:
                self._store.create(
                    resources.PODS, build_pod(deployment, template_hash, pod_name), namespace
                )
            except errors.AlreadyExistsError:
                if attempt == _MAX_NAME_TRIES - 1:
                    raise
                continue
            _LOG.info(
                "pod created",
                extra=log.fields(namespace=namespace, deployment=name, pod=pod_name),
            )
            return

    def _delete_pod(self, namespace: str, ref: PodRef, *, reason: str) -> None:
        try:
            self._store.delete(resources.PODS, ref.name, namespace, precondition_uid=ref.uid)
        except (errors.NotFoundError, errors.ConflictError):
            return  # already gone, or the name now belongs to another pod
        _LOG.info("pod deleted", extra=log.fields(namespace=namespace, pod=ref.name, reason=reason))

    def _record_status(self, deployment: dict[str, Any], status: dict[str, Any]) -> None:
        if deployment.get("status") == status:
            return
        body = copy.deepcopy(deployment)
        body["status"] = status
        self._store.replace(
            DEPLOYMENTS,
            body,
            objects.namespace(deployment),
            objects.name(deployment),
            subresource="status",
        )
