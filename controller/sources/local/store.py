"""The local object store: what etcd plus the Kubernetes control plane are to a real cluster.

Objects are JSON dicts keyed by (resource type, namespace, name). Every change gets the next
value of one global resourceVersion counter, is written through `persistence` before it is
visible, and becomes a change in a bounded history that watches resume from.

Invariants:
- A stored dict is never mutated after it is stored; every write stores a fresh one. Callers get
  deep copies, so nothing outside can change the store behind its back.
- The history holds every change with a version above `_history_floor`; a watch from an older
  version gets 410 Gone. After a restart the floor is the loaded counter (history is not
  persisted), so a client that saw the last version before the restart resumes without a gap.
- Every stored object passed its kind's validation; defaults and server-assigned fields
  (uid, timestamps, clusterIP, nodeName) are valid by construction.

Control-plane behaviour, as the Kubernetes API server and controllers would do it: ClusterIP
allocation for Services, scheduling of Pods that name no node within each node's
`allocatable.pods` (retried when nodes change or a bound pod finishes or goes; a pod that waits
carries kube-scheduler's `PodScheduled=False/Unschedulable` condition saying why), graceful
deletion of scheduled Pods (`deletionTimestamp`; the kubelet finishes with
`gracePeriodSeconds=0`), Namespace termination that deletes the namespace's content first, and
removal of the pods of a deleted Node; `metadata.generation` for the kinds that track it.
Writes to the main resource may change `.status` too (a PUT that leaves `status` out keeps the
stored one); `/status` writes change only `.status`. Pods owned by a Deployment are made and
removed by `deployments.DeploymentController`, which works through this API like any client.
"""

from __future__ import annotations

import collections
import copy
import datetime
import logging
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from controller.sources.local import (
    allocation,
    kinds,
    persistence,
    scheduling,
    schemas,
    validation,
    watch,
)
from controller.sources.local import errors as local_errors
from meshcore import log
from meshcore.kube import errors, objects, resources, selectors
from meshcore.kube.objects import ObjectList

_LOG = logging.getLogger("controller.store")

DEFAULT_HISTORY_SIZE = 10_000
DEFAULT_NAMESPACE = "default"
PROTECTED_NAMESPACES = frozenset({DEFAULT_NAMESPACE})
_SERVER_OWNED_METADATA = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

Key = tuple[str, str]  # (namespace or "", name)


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes timestamps."""
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(5))


def _not_found(rtype: resources.ResourceType, name: str) -> errors.NotFoundError:
    return errors.NotFoundError(
        f'{rtype.plural} "{name}" not found', details={"name": name, "kind": rtype.plural}
    )


def _bad_request(message: str) -> errors.BadRequestError:
    return errors.BadRequestError(message)


class ObjectStore:
    """In-memory objects, persisted; a synchronous API (the event loop is never left mid-write)."""

    def __init__(
        self,
        registry: kinds.KindRegistry,
        *,
        store_persistence: persistence.Persistence | None = None,
        history_size: int = DEFAULT_HISTORY_SIZE,
        service_cidr: str = allocation.DEFAULT_SERVICE_CIDR,
        scheduler: scheduling.Scheduler | None = None,
        clock: Callable[[], float] = time.time,
        system_namespaces: Iterable[str] = (),
    ) -> None:
        """Load what `store_persistence` holds (raises `CorruptStoreError` on a bad file).

        `system_namespaces` always exist and may not be deleted, like `default` (the mesh's
        root namespace, which an Istio install creates and its mesh-wide policies live in).
        """
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        self.registry = registry
        self._persistence = store_persistence or persistence.MemoryPersistence()
        self._scheduler = scheduler or scheduling.LeastPodsScheduler()
        self._clock = clock
        self._allocator = allocation.ClusterIpAllocator(service_cidr)
        self._protected = PROTECTED_NAMESPACES | frozenset(system_namespaces)
        self._objects: dict[resources.ResourceType, dict[Key, dict[str, Any]]] = {
            t: {} for t in registry.types
        }
        self._history: collections.deque[watch.Change] = collections.deque(maxlen=history_size)
        self._subscriptions: set[watch.Subscription] = set()
        self._max_pending = history_size
        state = self._persistence.load(registry.types)
        for stored in state.objects:
            self._load_one(stored)
        self._rv = state.resource_version
        self._history_floor = self._rv
        self._bootstrap()

    def _load_one(self, stored: persistence.StoredObject) -> None:
        obj = stored.object
        if stored.rtype == resources.SERVICES:
            ip = _cluster_ip(obj)
            if ip and ip != "None":
                try:
                    self._allocator.reserve(ip)
                except local_errors.AllocationError as exc:
                    raise local_errors.CorruptStoreError(stored.path, exc.detail) from exc
        self._objects[stored.rtype][objects.key(obj)] = obj

    def _bootstrap(self) -> None:
        """What a fresh cluster has, and what a restart must pick up again."""
        if resources.NAMESPACES in self._objects:
            for name in sorted(self._protected):
                if ("", name) not in self._objects[resources.NAMESPACES]:
                    self.create(resources.NAMESPACES, {"metadata": {"name": name}})
            for ns in list(self._objects[resources.NAMESPACES].values()):
                if objects.is_terminating(ns):
                    self._finish_namespace(objects.name(ns))
        self._schedule_pending()

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        """End every subscription (after the events already queued for it), and record the
        exact resourceVersion, so that watchers resume after a restart without relisting."""
        for subscription in list(self._subscriptions):
            subscription.close()
        try:
            self._persistence.close(self._rv)
        except OSError as exc:  # the reserved ceiling stays: safe, clients relist after restart
            _LOG.warning(
                "could not record the store's resourceVersion",
                extra=log.fields(error=str(exc)),
            )

    # -- reads -------------------------------------------------------------------------------

    def _served(self, rtype: resources.ResourceType) -> kinds.ServedKind:
        served = self.registry.find(rtype)
        if served is None:
            raise errors.NotFoundError("the server could not find the requested resource")
        return served

    def _key(self, rtype: resources.ResourceType, namespace: str | None, name: str) -> Key:
        return ((namespace or "") if rtype.namespaced else "", name)

    def find(
        self, rtype: resources.ResourceType, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        self._served(rtype)
        found = self._objects[rtype].get(self._key(rtype, namespace, name))
        return None if found is None else copy.deepcopy(found)

    def get(
        self, rtype: resources.ResourceType, name: str, namespace: str | None = None
    ) -> dict[str, Any]:
        found = self.find(rtype, name, namespace)
        if found is None:
            raise _not_found(rtype, name)
        return found

    def _iter(
        self, rtype: resources.ResourceType, namespace: str | None = None
    ) -> Iterator[dict[str, Any]]:
        for (ns, _), obj in sorted(self._objects[rtype].items()):
            if not namespace or ns == namespace:
                yield obj

    def list(
        self,
        rtype: resources.ResourceType,
        namespace: str | None = None,
        *,
        label_selector: selectors.LabelSelector | None = None,
        field_selector: selectors.FieldSelector | None = None,
    ) -> ObjectList:
        self._served(rtype)
        match = watch.WatchFilter(
            rtype,
            namespace if rtype.namespaced else None,
            label_selector or selectors.LabelSelector(),
            field_selector or selectors.FieldSelector(),
        )
        items = [copy.deepcopy(o) for o in self._iter(rtype) if match.matches(o)]
        return ObjectList(items, str(self._rv))

    def subscribe(
        self,
        rtype: resources.ResourceType | None = None,
        namespace: str | None = None,
        *,
        label_selector: selectors.LabelSelector | None = None,
        field_selector: selectors.FieldSelector | None = None,
        since: int | None = None,
    ) -> watch.Subscription:
        """Changes after version `since` (None or 0: from now) that pass the filter.

        Raises `GoneError` when `since` is older than the history (or newer than anything
        this store issued: the client saw another store). The backlog and the registration
        happen in one step, so no change falls between them.
        """
        if rtype is not None:
            self._served(rtype)
        watch_filter = watch.WatchFilter(
            rtype,
            namespace if rtype is None or rtype.namespaced else None,
            label_selector or selectors.LabelSelector(),
            field_selector or selectors.FieldSelector(),
        )
        backlog: list[watch.Change] = []
        if since:
            if since < self._history_floor:
                raise errors.GoneError(f"too old resource version: {since} ({self._history_floor})")
            if since > self._rv:
                raise errors.GoneError(f"too large resource version: {since}, current: {self._rv}")
            backlog = [c for c in self._history if c.resource_version > since]
        subscription = watch.Subscription(watch_filter, self._max_pending, self._unsubscribe)
        for change in backlog:
            subscription.offer(change)
        self._subscriptions.add(subscription)
        return subscription

    def _unsubscribe(self, subscription: watch.Subscription) -> None:
        self._subscriptions.discard(subscription)

    # -- committing --------------------------------------------------------------------------

    def _next_version(self) -> int:
        # Consumed even when the write fails: a version is never issued twice.
        self._rv += 1
        return self._rv

    def _persist_failed(self, exc: OSError) -> errors.ApiError:
        _LOG.error("cannot persist a change", extra=log.fields(error=str(exc)))
        return errors.ApiError(f"Internal error occurred: cannot persist the change: {exc}")

    def _commit(
        self, rtype: resources.ResourceType, old: dict[str, Any] | None, new: dict[str, Any]
    ) -> dict[str, Any]:
        version = self._next_version()
        new["metadata"]["resourceVersion"] = str(version)
        try:
            self._persistence.save_object(rtype, new, version)
        except OSError as exc:
            raise self._persist_failed(exc) from exc
        self._objects[rtype][objects.key(new)] = new
        self._emit(
            watch.Change(objects.MODIFIED if old else objects.ADDED, rtype, new, old, version)
        )
        return copy.deepcopy(new)

    def _remove(self, rtype: resources.ResourceType, old: dict[str, Any]) -> dict[str, Any]:
        version = self._next_version()
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = str(version)
        try:
            self._persistence.delete_object(
                rtype, objects.namespace(old), objects.name(old), version
            )
        except OSError as exc:
            raise self._persist_failed(exc) from exc
        del self._objects[rtype][objects.key(old)]
        if rtype == resources.SERVICES:
            ip = _cluster_ip(old)
            if ip and ip != "None":
                self._allocator.release(ip)
        self._emit(watch.Change(objects.DELETED, rtype, final, None, version))
        if rtype == resources.NODES:
            self._remove_pods_of_node(objects.name(old))
        if rtype == resources.NODES or (rtype == resources.PODS and scheduling.is_occupying(old)):
            self._schedule_pending()  # room freed, or fewer nodes to name in the message
        if rtype.namespaced:
            self._finish_namespace(objects.namespace(old))
        return copy.deepcopy(final)

    def _emit(self, change: watch.Change) -> None:
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0].resource_version
        self._history.append(change)
        for subscription in list(self._subscriptions):
            subscription.offer(change)

    # -- writes ------------------------------------------------------------------------------

    def _prepare_body(
        self, served: kinds.ServedKind, body: Any, namespace: str | None
    ) -> dict[str, Any]:
        """A private copy of `body` with apiVersion, kind and namespace settled."""
        rtype = served.rtype
        if not isinstance(body, dict):
            raise _bad_request(f"the body must be a JSON object, not {type(body).__name__}")
        obj = copy.deepcopy(body)
        for field, expected in (("apiVersion", rtype.api_version), ("kind", rtype.kind)):
            value = obj.setdefault(field, expected)
            if value != expected:
                raise _bad_request(
                    f"{field} {validation.render_value(value)} of the object does not match "
                    f"the {rtype.kind} ({rtype.api_version}) expected at this URL"
                )
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            return obj  # validation names the problem
        given = meta.get("namespace")
        if not rtype.namespaced:
            meta.pop("namespace", None)
        elif namespace:
            if given not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
        elif not isinstance(given, str) or not given:
            raise _bad_request(f"a {rtype.kind} needs a namespace")
        return obj

    def _validate(self, served: kinds.ServedKind, obj: dict[str, Any]) -> None:
        found = validation.validate(served.schema, obj)
        if not found and served.check_references is not None:
            found = served.check_references(obj, self._stored_in)
        if found:
            name = objects.name(obj)
            raise validation.build_invalid_error(served.rtype.kind, name, found)

    def _stored_in(self, rtype: resources.ResourceType, namespace: str) -> Sequence[dict[str, Any]]:
        return [obj for (ns, _), obj in self._objects.get(rtype, {}).items() if ns == namespace]

    def _check_namespace(self, namespace: str) -> None:
        if resources.NAMESPACES not in self._objects:
            return
        ns = self._objects[resources.NAMESPACES].get(("", namespace))
        if ns is None:
            raise _not_found(resources.NAMESPACES, namespace)
        if objects.is_terminating(ns):
            raise errors.ForbiddenError(
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated"
            )

    def create(
        self, rtype: resources.ResourceType, body: Any, namespace: str | None = None
    ) -> dict[str, Any]:
        served = self._served(rtype)
        obj = self._prepare_body(served, body, namespace)
        meta = obj["metadata"]
        if isinstance(meta, dict):
            for field in (*_SERVER_OWNED_METADATA, "resourceVersion"):
                meta.pop(field, None)
            base = meta.get("generateName")
            if not meta.get("name") and isinstance(base, str) and base:
                meta["name"] = base[:58] + _random_suffix()
        self._validate(served, obj)
        name, ns = objects.name(obj), objects.namespace(obj)
        if rtype.namespaced:
            self._check_namespace(ns)
        if (ns, name) in self._objects[rtype]:
            raise errors.AlreadyExistsError(
                f'{rtype.plural} "{name}" already exists',
                details={"name": name, "kind": rtype.plural},
            )
        if served.default is not None:
            served.default(obj)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = format_timestamp(self._clock())
        if served.tracks_generation:
            meta["generation"] = 1
        if rtype == resources.SERVICES:
            return self._create_service(obj)
        placement = None
        if rtype == resources.PODS and not scheduling.find_pod_node(obj):
            placement = self._place(obj)
            if placement.is_bound:
                self._apply_placement(obj, placement)
        created = self._commit(rtype, None, obj)
        if rtype == resources.NODES:
            self._schedule_pending()
        elif placement is not None and not placement.is_bound:
            # As from kube-scheduler, the reason comes as an update after the create: the
            # create answers with the pod as posted.
            self._write_placement(self._objects[rtype][objects.key(obj)], placement)
        return created

    def _create_service(self, obj: dict[str, Any]) -> dict[str, Any]:
        spec = obj["spec"]
        requested = _cluster_ip(obj)
        try:
            if requested == "None":
                ip = "None"
            elif requested:
                self._allocator.reserve(requested)
                ip = requested
            else:
                ip = self._allocator.allocate()
        except local_errors.AllocationError as exc:
            raise validation.build_invalid_error(
                "Service",
                objects.name(obj),
                [validation.invalid("spec.clusterIP", requested, exc.detail)]
                if requested
                else [validation.FieldError("spec.clusterIP", "Internal error", None, exc.detail)],
            ) from exc
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        try:
            return self._commit(resources.SERVICES, None, obj)
        except errors.ApiError:
            if ip != "None":
                self._allocator.release(ip)
            raise

    def replace(
        self,
        rtype: resources.ResourceType,
        body: Any,
        namespace: str | None = None,
        name: str | None = None,
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """PUT. Without `status` in `body` the stored status is kept; a `resourceVersion` in
        `body` must be the stored one (409 Conflict otherwise)."""
        served = self._served(rtype)
        obj = self._prepare_body(served, body, namespace)
        meta = obj["metadata"]
        if isinstance(meta, dict):
            given = meta.get("name")
            if name and given not in (None, "", name):
                raise _bad_request(
                    f"the name of the object ({given}) does not match the name on the URL ({name})"
                )
            if name:
                meta["name"] = name
        name = objects.name(obj) if isinstance(meta, dict) else name or ""
        old = self._objects[rtype].get(self._key(rtype, namespace or objects.namespace(obj), name))
        if old is None:
            raise _not_found(rtype, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            new["metadata"]["resourceVersion"] = (
                meta.get("resourceVersion") if isinstance(meta, dict) else None
            )
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
            return self._update(served, old, new)
        if subresource is not None:
            raise errors.NotFoundError("the server could not find the requested resource")
        if "status" not in obj and "status" in old:
            obj["status"] = copy.deepcopy(old["status"])
        return self._update(served, old, obj)

    def patch(
        self,
        rtype: resources.ResourceType,
        name: str,
        namespace: str | None,
        patch: Any,
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch. A `metadata.resourceVersion` in the patch is a precondition."""
        served = self._served(rtype)
        if not isinstance(patch, dict):
            raise _bad_request(f"a merge patch must be a JSON object, not {type(patch).__name__}")
        old = self._objects[rtype].get(self._key(rtype, namespace, name))
        if old is None:
            raise _not_found(rtype, name)
        merged = objects.merge_patch(old, patch)
        if subresource == "status":
            new = copy.deepcopy(old)
            meta = merged.get("metadata")
            new["metadata"]["resourceVersion"] = (
                meta.get("resourceVersion") if isinstance(meta, dict) else None
            )
            if "status" in merged:
                new["status"] = merged["status"]
            else:
                new.pop("status", None)
            merged = new
        elif subresource is not None:
            raise errors.NotFoundError("the server could not find the requested resource")
        for field in ("apiVersion", "kind"):
            if merged.get(field) != old[field]:
                raise _bad_request(f"a patch may not change {field}")
        if objects.name(merged) != name or objects.namespace(merged) != objects.namespace(old):
            raise _bad_request("a patch may not change metadata.name or metadata.namespace")
        return self._update(served, old, merged)

    def _update(
        self, served: kinds.ServedKind, old: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        rtype = served.rtype
        meta = new.get("metadata")
        if isinstance(meta, dict) and meta.get("resourceVersion") is None:
            meta.pop("resourceVersion", None)
        if rtype == resources.SERVICES:
            _normalize_cluster_ips(old, new)
        self._validate(served, new)
        meta = new["metadata"]
        wanted = meta.get("resourceVersion")
        current = old["metadata"]["resourceVersion"]
        if wanted and wanted != current:
            raise errors.ConflictError(
                f'Operation cannot be fulfilled on {rtype.plural} "{objects.name(old)}": the '
                "object has been modified; please apply your changes to the latest version and "
                "try again",
                details={"name": objects.name(old), "kind": rtype.plural},
            )
        for field in _SERVER_OWNED_METADATA:
            meta.pop(field, None)
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if served.default is not None:
            served.default(new)
        if rtype == resources.SERVICES:
            self._keep_cluster_ip(old, new)
        elif rtype == resources.PODS:
            self._keep_node_name(old, new)
        elif rtype == resources.NAMESPACES and objects.is_terminating(old):
            new["status"]["phase"] = "Terminating"
        if served.tracks_generation:
            meta["generation"] = _next_generation(old, new)
        meta["resourceVersion"] = current
        if new == old:
            return copy.deepcopy(old)  # no change: no new version, no event
        updated = self._commit(rtype, old, new)
        if rtype == resources.NODES or (rtype == resources.PODS and _may_reschedule(old, new)):
            self._schedule_pending()
        return updated

    def _keep_cluster_ip(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        before, wanted = _cluster_ip(old), _cluster_ip(new)
        if wanted and wanted != before:
            raise validation.build_invalid_error(
                "Service",
                objects.name(old),
                [validation.invalid("spec.clusterIP", wanted, "field is immutable")],
            )
        new["spec"]["clusterIP"] = before
        new["spec"]["clusterIPs"] = [before]

    def _keep_node_name(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        before, wanted = scheduling.find_pod_node(old), scheduling.find_pod_node(new)
        if before and wanted and wanted != before:
            raise validation.build_invalid_error(
                "Pod",
                objects.name(old),
                [validation.invalid("spec.nodeName", wanted, "field is immutable once scheduled")],
            )
        if before:
            new["spec"]["nodeName"] = before

    # -- deletion ----------------------------------------------------------------------------

    def delete(
        self,
        rtype: resources.ResourceType,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_seconds: int | None = None,
        precondition_uid: str | None = None,
    ) -> dict[str, Any]:
        """The object as deletion left it: terminating (pods, namespaces) or gone.

        With `precondition_uid`, only that incarnation of the name is deleted (409 otherwise):
        a kubelet finishing a pod must not remove a new pod that reuses its name.
        """
        self._served(rtype)
        limit = schemas.MAX_GRACE_PERIOD_SECONDS
        if grace_period_seconds is not None and not 0 <= grace_period_seconds <= limit:
            raise _bad_request(f"gracePeriodSeconds must be between 0 and {limit}")
        old = self._objects[rtype].get(self._key(rtype, namespace, name))
        if old is None:
            raise _not_found(rtype, name)
        if precondition_uid is not None and precondition_uid != objects.uid(old):
            raise errors.ConflictError(
                f"Precondition failed: UID in precondition: {precondition_uid}, UID in object "
                f"meta: {objects.uid(old)}",
                details={"name": name, "kind": rtype.plural},
            )
        if rtype == resources.NAMESPACES:
            return self._delete_namespace(old)
        if rtype == resources.PODS:
            return self._delete_pod(old, grace_period_seconds)
        return self._remove(rtype, old)

    def _delete_pod(self, old: dict[str, Any], grace: int | None) -> dict[str, Any]:
        spec, status = old["spec"], old.get("status", {})
        if not scheduling.find_pod_node(old) or status.get("phase") in _TERMINAL_PHASES:
            grace = 0  # no kubelet has to stop anything
        elif grace is None:
            # A pod asking for 0 still gets 1 s, so its kubelet can stop it (Kubernetes does so).
            grace = spec.get("terminationGracePeriodSeconds", kinds.DEFAULT_GRACE_PERIOD_SECONDS)
            grace = max(int(grace), 1)
        if grace == 0:
            return self._remove(resources.PODS, old)
        current = old["metadata"].get("deletionGracePeriodSeconds")
        if objects.is_terminating(old) and isinstance(current, int) and current <= grace:
            return copy.deepcopy(old)
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = format_timestamp(self._clock() + grace)
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        return self._commit(resources.PODS, old, new)

    def _delete_namespace(self, old: dict[str, Any]) -> dict[str, Any]:
        name = objects.name(old)
        if name in self._protected:
            raise errors.ForbiddenError(
                f'namespaces "{name}" is forbidden: this namespace may not be deleted'
            )
        current = old
        if not objects.is_terminating(old):
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = format_timestamp(self._clock())
            new.setdefault("status", {})["phase"] = "Terminating"
            self._commit(resources.NAMESPACES, old, new)
            current = new
        for rtype in list(self._objects):
            if not rtype.namespaced:
                continue
            for obj in list(self._iter(rtype, name)):
                if rtype == resources.PODS:
                    self._delete_pod(obj, None)
                else:
                    self._remove(rtype, obj)
        final = self._finish_namespace(name)
        return final if final is not None else copy.deepcopy(current)

    def _finish_namespace(self, name: str) -> dict[str, Any] | None:
        """Remove a terminating namespace once nothing is left in it; its final state if so."""
        ns = self._objects.get(resources.NAMESPACES, {}).get(("", name))
        if ns is None or not objects.is_terminating(ns):
            return None
        for rtype, items in self._objects.items():
            if rtype.namespaced and any(key[0] == name for key in items):
                return None
        return self._remove(resources.NAMESPACES, ns)

    def _remove_pods_of_node(self, node: str) -> None:
        """A deleted node's pods are gone with it (what the pod garbage collector does)."""
        if resources.PODS not in self._objects:
            return
        for pod in list(self._iter(resources.PODS)):
            if scheduling.find_pod_node(pod) == node:
                self._remove(resources.PODS, pod)

    # -- scheduling --------------------------------------------------------------------------

    def _place(self, pod: dict[str, Any]) -> scheduling.Placement:
        nodes = list(self._iter(resources.NODES)) if resources.NODES in self._objects else []
        pods = list(self._iter(resources.PODS))
        return self._scheduler.build_placement(pod, nodes, pods)

    def _apply_placement(self, pod: dict[str, Any], placement: scheduling.Placement) -> None:
        """Bind `pod` (a private copy) or say why it waits, in its PodScheduled condition."""
        if placement.node is not None:
            pod["spec"]["nodeName"] = placement.node
        now = format_timestamp(self._clock())
        pod["status"] = scheduling.build_scheduled_status(pod.get("status"), placement, now)

    def _schedule_pending(self) -> None:
        """Bind pods that wait for a node, oldest first, or refresh why they wait (a MODIFIED
        event each, and none for a pod whose placement and reason did not change)."""
        if resources.PODS not in self._objects:
            return
        pending = [
            p
            for p in self._iter(resources.PODS)
            if not scheduling.find_pod_node(p) and not objects.is_terminating(p)
        ]
        # Creation order; resourceVersion breaks ties within a second.
        pending.sort(
            key=lambda p: (
                str(objects.metadata(p).get("creationTimestamp") or ""),
                int(objects.resource_version(p) or 0),
            )
        )
        for pod in pending:
            self._write_placement(pod, self._place(pod))

    def _write_placement(self, pod: dict[str, Any], placement: scheduling.Placement) -> None:
        """Commit `placement` for the stored `pod` unless the pod already says it."""
        new = copy.deepcopy(pod)
        self._apply_placement(new, placement)
        if new == pod:
            return
        try:
            self._commit(resources.PODS, pod, new)
        except errors.ApiError:
            _LOG.exception("cannot bind a pending pod", extra=log.fields(pod=objects.name(pod)))


def _may_reschedule(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A pod update that can change where pending pods go: it stopped occupying its node (it
    finished), or it is itself pending (its selector may have changed)."""
    freed = scheduling.is_occupying(old) and not scheduling.is_occupying(new)
    return freed or not scheduling.find_pod_node(new)


def _normalize_cluster_ips(old: dict[str, Any], new: dict[str, Any]) -> None:
    """An update that changes `clusterIP` but carries the old `clusterIPs` along (a patch, or
    an edited copy of the object) means a new address: make `clusterIPs` follow, as Kubernetes
    does, so that the answer is "field is immutable" rather than a mismatch between the two."""
    spec, old_spec = new.get("spec"), old.get("spec")
    if not isinstance(spec, dict) or not isinstance(old_spec, dict):
        return
    ip = spec.get("clusterIP")
    changed = isinstance(ip, str) and ip and ip != old_spec.get("clusterIP")
    if changed and spec.get("clusterIPs") == old_spec.get("clusterIPs"):
        spec["clusterIPs"] = [ip]


def _cluster_ip(service: dict[str, Any]) -> str:
    spec = service.get("spec")
    if not isinstance(spec, dict):
        return ""
    ip = spec.get("clusterIP")
    if isinstance(ip, str) and ip:
        return ip
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and ips and isinstance(ips[0], str):
        return ips[0]
    return ""


def _next_generation(old: dict[str, Any], new: dict[str, Any]) -> int:
    """The server owns `metadata.generation`: one more than before when `spec` changed."""
    before = old["metadata"].get("generation")
    current = before if isinstance(before, int) and not isinstance(before, bool) else 1
    return current + 1 if new.get("spec") != old.get("spec") else current
