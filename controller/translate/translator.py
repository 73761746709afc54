"""Incremental translation of Kubernetes watch events into model changes. Pure: no I/O.

Invariants:
- `_workloads` holds exactly `build_workload(pod, services of its namespace)` for every known
  pod that has one, and `_services` exactly `build_service(svc)` for every known Service that
  translates; `Changes` carries the difference an event made to them, nothing more.
- A Pod event recomputes only that pod; a Service event recomputes only its namespace's pods
  (a Service selects pods of its own namespace only).
- `_identities` indexes every known, not-terminated pod by (node, namespace, service account),
  so the CA can answer "may this node ask for this identity?" without scanning.
- Every workload lists `_policies.find_keys(namespace, labels)` of its pod: a policy event
  recomputes the pods of the namespaces `PolicyUpdate.namespaces` names, a Pod event its pod.
- Services and workloads are built with the current labels of their Namespace (which may name
  their waypoint): a Namespace event whose waypoint labels changed recomputes that namespace's
  services, ServiceEntries and pods. Namespaces come first in a full sync, so nothing is built
  twice.
- They are also built with what every known Gateway is a waypoint for (`_gateways`): a Gateway
  event that changes that (or adds or removes the Gateway) recomputes the services,
  ServiceEntries and pods that name it, in every namespace (`istio.io/use-waypoint-namespace`
  reaches across); other Gateway events (status, spec) change nothing. Gateways come right
  after Namespaces in a full sync.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

from controller.translate import policies as policy_translate
from controller.translate import serviceentries as entry_translate
from controller.translate import services as svc_translate
from controller.translate import waypoints
from controller.translate import workloads as wl_translate
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
from meshcore.policy import spec as policy_spec

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

_Key = tuple[str, str]  # (namespace, name)


@dataclasses.dataclass(frozen=True, slots=True)
class Changes:
    """What one event changed; tuples are sorted by key. `errors` name objects left out."""

    workloads: tuple[workload.Workload, ...] = ()
    removed_workloads: tuple[ids.WorkloadUid, ...] = ()
    services: tuple[workload.Service, ...] = ()
    removed_services: tuple[ids.ServiceKey, ...] = ()
    policies: tuple[authorization.Authorization, ...] = ()
    removed_policies: tuple[ids.PolicyKey, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))


class Translator:
    def __init__(
        self,
        *,
        trust_domain: str,
        cluster_id: str,
        domain: str,
        root_namespace: str = policy_spec.DEFAULT_ROOT_NAMESPACE,
        dry_run_policies: bool = False,
    ) -> None:
        """`root_namespace` holds mesh-wide policies (istiod's meshConfig.rootNamespace);
        `dry_run_policies` sends dry-run AuthorizationPolicies to ztunnel, marked dry run."""
        self._trust_domain = trust_domain
        self._cluster_id = cluster_id
        self._domain = domain
        self._pods: dict[_Key, svc_translate.KubeObject] = {}
        self._pods_by_namespace: dict[str, set[str]] = collections.defaultdict(set)
        self._services_by_namespace: dict[str, dict[str, svc_translate.KubeObject]] = (
            collections.defaultdict(dict)
        )
        self._namespace_labels: dict[str, dict[str, str]] = {}
        self._gateways: dict[_Key, str] = {}  # what each Gateway is a waypoint for
        self._workloads: dict[_Key, workload.Workload] = {}
        # ServiceEntries, and the services (one per host) and endpoints each became.
        self._entries: dict[_Key, svc_translate.KubeObject] = {}
        self._entry_services: dict[_Key, tuple[workload.Service, ...]] = {}
        self._entry_workloads: dict[_Key, tuple[workload.Workload, ...]] = {}
        self._services: dict[_Key, workload.Service] = {}
        self._identities: dict[tuple[str, str, str], set[_Key]] = collections.defaultdict(set)
        self._policies = policy_translate.PolicyIndex(
            root_namespace=root_namespace, dry_run_enabled=dry_run_policies
        )

    def apply(
        self, event_type: str, obj: svc_translate.KubeObject, *, kind: str | None = None
    ) -> Changes:
        """Apply one watch event. `kind` overrides obj["kind"] (list items carry no kind)."""
        kind = kind or obj.get("kind")
        if event_type not in (ADDED, MODIFIED, DELETED):
            return Changes()  # BOOKMARK, ERROR: nothing to translate
        deleted = event_type == DELETED
        match kind:
            case "Pod":
                return self._apply_pod(obj, deleted=deleted)
            case "Service":
                return self._apply_service(obj, deleted=deleted)
            case "Namespace":
                return self._apply_namespace(obj, deleted=deleted)
            case "Gateway":
                return self._apply_gateway(obj, deleted=deleted)
            case entry_translate.KIND:
                return self._apply_service_entry(obj, deleted=deleted)
            case policy_translate.AUTHORIZATION_POLICY:
                update = self._policies.apply_authorization_policy(obj, deleted=deleted)
                return self._apply_policy_update(update)
            case policy_translate.PEER_AUTHENTICATION:
                update = self._policies.apply_peer_authentication(obj, deleted=deleted)
                return self._apply_policy_update(update)
        return Changes()

    def snapshot(self) -> Changes:
        """Everything currently known, as if it had all just been added."""
        entry_workloads = [w for ws in self._entry_workloads.values() for w in ws]
        entry_services = [s for ss in self._entry_services.values() for s in ss]
        return Changes(
            workloads=tuple(
                sorted([*self._workloads.values(), *entry_workloads], key=lambda w: w.uid)
            ),
            services=tuple(
                sorted([*self._services.values(), *entry_services], key=lambda s: s.key)
            ),
            policies=tuple(self._policies.policies()),
        )

    def has_identity_on_node(self, node: str, identity: spiffe.SpiffeId) -> bool:
        """A not-terminated pod running as `identity` is scheduled on `node`."""
        if identity.trust_domain != self._trust_domain or not node:
            return False
        return bool(self._identities.get((node, identity.namespace, identity.service_account)))

    # --- pods ---

    def _apply_pod(self, pod: svc_translate.KubeObject, *, deleted: bool) -> Changes:
        key = svc_translate.object_key(pod)
        old = self._pods.pop(key, None)
        if old is not None:
            self._unindex_identity(key, old)
        if deleted:
            names = self._pods_by_namespace.get(key[0])
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._pods_by_namespace[key[0]]
        else:
            self._pods[key] = pod
            self._pods_by_namespace[key[0]].add(key[1])
            self._index_identity(key, pod)
        return self._refresh_pods([key])

    def _index_identity(self, key: _Key, pod: svc_translate.KubeObject) -> None:
        if identity := _identity_key(pod):
            self._identities[identity].add(key)

    def _unindex_identity(self, key: _Key, pod: svc_translate.KubeObject) -> None:
        identity = _identity_key(pod)
        if identity and (members := self._identities.get(identity)) is not None:
            members.discard(key)
            if not members:
                del self._identities[identity]

    def _refresh_pods(self, keys: list[_Key]) -> Changes:
        """Rebuild the workloads of `keys`; the Changes list those that differ from before."""
        changed: list[workload.Workload] = []
        removed: list[ids.WorkloadUid] = []
        errors: list[str] = []
        for key in keys:
            pod = self._pods.get(key)
            new: workload.Workload | None = None
            if pod is not None:
                labels = (pod.get("metadata") or {}).get("labels") or {}
                try:
                    new = wl_translate.build_workload(
                        pod,
                        services=self._services_by_namespace.get(key[0], {}).values(),
                        trust_domain=self._trust_domain,
                        cluster_id=self._cluster_id,
                        domain=self._domain,
                        authorization_policies=self._policies.find_keys(key[0], labels),
                        namespace_labels=self._namespace_labels.get(key[0]),
                        gateways=self._gateways,
                    )
                except svc_translate.TranslateError as exc:
                    errors.append(str(exc))  # left out until a later event fixes it
            old = self._workloads.get(key)
            if new == old:
                continue
            if new is None:
                del self._workloads[key]
                assert old is not None
                removed.append(old.uid)
            else:
                self._workloads[key] = new
                changed.append(new)
        return Changes(
            workloads=tuple(sorted(changed, key=lambda w: w.uid)),
            removed_workloads=tuple(sorted(removed)),
            errors=tuple(errors),
        )

    # --- services ---

    def _apply_service(self, svc: svc_translate.KubeObject, *, deleted: bool) -> Changes:
        key = svc_translate.object_key(svc)
        errors: list[str] = []
        new: workload.Service | None = None
        if not deleted:
            try:
                new = self._build_service(svc)
            except svc_translate.TranslateError as exc:
                errors.append(str(exc))
        # A Service that does not translate selects nothing either: bindings and VIP go together.
        if new is None:
            namespace_services = self._services_by_namespace.get(key[0])
            if namespace_services is not None:
                namespace_services.pop(key[1], None)
                if not namespace_services:
                    del self._services_by_namespace[key[0]]
        else:
            self._services_by_namespace[key[0]][key[1]] = svc
        old = self._services.get(key)
        services: tuple[workload.Service, ...] = ()
        removed: tuple[ids.ServiceKey, ...] = ()
        if new is None:
            if old is not None:
                del self._services[key]
                removed = (old.key,)
        elif new != old:
            self._services[key] = new
            services = (new,)
        pods = sorted((key[0], name) for name in self._pods_by_namespace.get(key[0], ()))
        result = self._refresh_pods(pods)
        return dataclasses.replace(
            result, services=services, removed_services=removed, errors=(*errors, *result.errors)
        )

    def _build_service(self, svc: svc_translate.KubeObject) -> workload.Service:
        namespace, _ = svc_translate.object_key(svc)
        return svc_translate.build_service(
            svc,
            domain=self._domain,
            namespace_labels=self._namespace_labels.get(namespace),
            gateways=self._gateways,
        )

    def _refresh_services(
        self, namespace: str, which: Callable[[svc_translate.KubeObject], bool]
    ) -> tuple[workload.Service, ...]:
        """Rebuild the services of `namespace` for which `which` is true; those that differ
        from before.

        Only services that translated before are here, and what a Namespace or Gateway changes
        (the waypoint) cannot make one fail, so nothing is added or removed."""
        changed = []
        for name, svc in sorted(self._services_by_namespace.get(namespace, {}).items()):
            if not which(svc):
                continue
            new = self._build_service(svc)
            if new != self._services.get((namespace, name)):
                self._services[(namespace, name)] = new
                changed.append(new)
        return tuple(sorted(changed, key=lambda s: s.key))

    # --- service entries ---

    def _apply_service_entry(self, entry: svc_translate.KubeObject, *, deleted: bool) -> Changes:
        key = svc_translate.object_key(entry)
        if deleted:
            self._entries.pop(key, None)
        else:
            self._entries[key] = entry
        return self._refresh_entry(key)

    def _refresh_entry(self, key: _Key) -> Changes:
        """Rebuild one ServiceEntry's services and endpoints; what changed."""
        entry = self._entries.get(key)
        services: tuple[workload.Service, ...] = ()
        endpoints: tuple[workload.Workload, ...] = ()
        errors: tuple[str, ...] = ()
        if entry is not None:
            try:
                services = entry_translate.build_services(
                    entry,
                    namespace_labels=self._namespace_labels.get(key[0]) or {},
                    domain=self._domain,
                    gateways=self._gateways,
                )
                endpoints = entry_translate.build_endpoints(
                    entry, services, cluster_id=self._cluster_id
                )
            except svc_translate.TranslateError as exc:
                errors = (str(exc),)  # left out until a later event fixes it
        old_services = {s.key: s for s in self._entry_services.pop(key, ())}
        old_endpoints = {w.uid: w for w in self._entry_workloads.pop(key, ())}
        if services:
            self._entry_services[key] = services
        if endpoints:
            self._entry_workloads[key] = endpoints
        new_services = {s.key: s for s in services}
        new_endpoints = {w.uid: w for w in endpoints}
        return Changes(
            workloads=tuple(
                w for u, w in sorted(new_endpoints.items()) if old_endpoints.get(u) != w
            ),
            removed_workloads=tuple(sorted(old_endpoints.keys() - new_endpoints.keys())),
            services=tuple(s for k, s in sorted(new_services.items()) if old_services.get(k) != s),
            removed_services=tuple(sorted(old_services.keys() - new_services.keys())),
            errors=errors,
        )

    # --- policies ---

    def _apply_policy_update(self, update: policy_translate.PolicyUpdate) -> Changes:
        """The policies `update` changed, and the workloads whose keys it may have changed."""
        if update.namespaces is None:
            pods = sorted(self._pods)
        else:
            pods = sorted(
                (ns, name)
                for ns in update.namespaces
                for name in self._pods_by_namespace.get(ns, ())
            )
        result = self._refresh_pods(pods)
        return dataclasses.replace(
            result,
            policies=update.policies,
            removed_policies=update.removed,
            errors=(*update.errors, *result.errors),
        )

    # --- waypoints ---

    def _apply_gateway(self, gateway: svc_translate.KubeObject, *, deleted: bool) -> Changes:
        key = svc_translate.object_key(gateway)
        before = self._gateways.get(key)
        if deleted:
            self._gateways.pop(key, None)
        else:
            self._gateways[key] = waypoints.traffic_of(gateway)
        if self._gateways.get(key) == before:
            return Changes()
        namespaces = {
            *self._namespace_labels,
            *self._services_by_namespace,
            *self._pods_by_namespace,
            *(k[0] for k in self._entries),
        }
        return self._refresh_waypoints(sorted(namespaces), naming=key)

    def _refresh_waypoints(self, namespaces: list[str], *, naming: _Key | None = None) -> Changes:
        """Rebuild what may have a waypoint in `namespaces` (services, ServiceEntries, pods);
        with `naming`, only the objects that name that waypoint."""
        wanted = set(namespaces)

        def names_it(namespace: str, obj: svc_translate.KubeObject) -> bool:
            if naming is None:
                return True
            labels = (obj.get("metadata") or {}).get("labels") or {}
            ns_labels = self._namespace_labels.get(namespace) or {}
            return waypoints.named_waypoint(labels, namespace, ns_labels) == naming

        entries = [
            self._refresh_entry(k)
            for k in sorted(self._entries)
            if k[0] in wanted and names_it(k[0], self._entries[k])
        ]
        pods = self._refresh_pods(
            sorted(
                (ns, name)
                for ns in namespaces
                for name in self._pods_by_namespace.get(ns, ())
                if names_it(ns, self._pods[(ns, name)])
            )
        )
        services = [
            s
            for ns in namespaces
            for s in self._refresh_services(ns, functools.partial(names_it, ns))
        ]
        return Changes(
            workloads=tuple(
                sorted(
                    [*pods.workloads, *(w for c in entries for w in c.workloads)],
                    key=lambda w: w.uid,
                )
            ),
            removed_workloads=tuple(
                sorted(
                    [*pods.removed_workloads, *(u for c in entries for u in c.removed_workloads)]
                )
            ),
            services=tuple(
                sorted([*services, *(s for c in entries for s in c.services)], key=lambda s: s.key)
            ),
            removed_services=tuple(sorted(k for c in entries for k in c.removed_services)),
            errors=(*pods.errors, *(e for c in entries for e in c.errors)),
        )

    # --- namespaces ---

    def _apply_namespace(self, ns: svc_translate.KubeObject, *, deleted: bool) -> Changes:
        meta = ns.get("metadata") or {}
        namespace = meta.get("name") or ""
        if not deleted:
            labels = dict(meta.get("labels") or {})
            before = waypoints.waypoint_labels(self._namespace_labels.get(namespace) or {})
            self._namespace_labels[namespace] = labels
            if waypoints.waypoint_labels(labels) == before:
                return Changes()
            return self._refresh_waypoints([namespace])
        self._namespace_labels.pop(namespace, None)
        # Kubernetes deletes a namespace's pods and services (with their own events) before the
        # namespace goes, so this only matters if those events were missed: drop the leftovers.
        removed_services = []
        for name in list(self._services_by_namespace.pop(namespace, {})):
            service = self._services.pop((namespace, name), None)
            if service is not None:
                removed_services.append(service.key)
        for name in self._pods_by_namespace.pop(namespace, set()):
            pod = self._pods.pop((namespace, name), None)
            if pod is not None:
                self._unindex_identity((namespace, name), pod)
        # The pods are gone from _pods, so refreshing them yields their removals.
        leftovers = sorted(k for k in self._workloads if k[0] == namespace)
        removals = self._refresh_pods(leftovers)
        # Its policies go too; from the root namespace that changes every workload's keys.
        result = self._apply_policy_update(self._policies.drop_namespace(namespace))
        return dataclasses.replace(
            result,
            removed_workloads=tuple(
                sorted((*removals.removed_workloads, *result.removed_workloads))
            ),
            removed_services=tuple(sorted(removed_services)),
        )


def _identity_key(pod: svc_translate.KubeObject) -> tuple[str, str, str] | None:
    """(node, namespace, service account) of a scheduled, not-terminated pod."""
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    if not node or wl_translate.is_terminated(pod):
        return None
    namespace, _ = svc_translate.object_key(pod)
    return node, namespace, spec.get("serviceAccountName") or spiffe.DEFAULT_SERVICE_ACCOUNT
