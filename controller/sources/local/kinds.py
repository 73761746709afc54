"""The kinds the local API server serves, as data.

Each `ServedKind` is a resource type plus what the server needs to know about it: its schema,
its defaults, which field selectors it supports, its short names for discovery, the other API
versions it is served in and the non-fatal warnings a write of it gets. Adding a kind (Gateway,
...) is adding an entry here; the store and the HTTP server are generic over this registry.
Namespaces, nodes, pods and services also have control-plane behaviour (lifecycle, scheduling,
ClusterIP allocation) that lives in the store.

Versions: a kind is stored in one version (its `rtype`, the preferred one) and may be served in
more (`extra_versions`), as Kubernetes serves a CRD: the same objects, whose `apiVersion` in an
answer is the one of the URL. The schemas of Istio's v1 and v1beta1 security kinds are the same,
so converting is only rewriting `apiVersion` (done by the API server).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from controller.sources.local import (
    gatewayschemas,
    policyschemas,
    schemas,
    serviceentryschemas,
    telemetryschemas,
    trafficschemas,
    validation,
)
from meshcore.kube import resources
from meshcore.policy import analysis, spec

Defaulter = Callable[[dict[str, Any]], None]
# The non-fatal warnings for a stored object (each one a `Warning: 299` header of the answer).
WarningFinder = Callable[[dict[str, Any]], list[str]]
# The stored objects of a type in a namespace, for checks that look across objects.
Lookup = Callable[[resources.ResourceType, str], Sequence[dict[str, Any]]]
# Errors in what an object refers to (a subset no DestinationRule defines), judged against the
# objects stored when it is written; run only once the object passed its schema.
ReferenceChecker = Callable[[dict[str, Any], Lookup], list[validation.FieldError]]

BASE_FIELD_LABELS = frozenset({"metadata.name", "metadata.namespace"})
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
STATUS_VERBS = ["get", "patch", "update"]


@dataclasses.dataclass(frozen=True, slots=True)
class ServedKind:
    rtype: resources.ResourceType
    schema: validation.Schema = schemas.GENERIC
    # Fills defaults in place into an object that passed validation; must keep it valid.
    default: Defaulter | None = None
    field_labels: frozenset[str] = frozenset()
    short_names: tuple[str, ...] = ()
    has_status: bool = True
    # metadata.generation starts at 1 and grows with every change of `spec` (what controllers
    # compare status.observedGeneration with).
    tracks_generation: bool = False
    # Versions the same stored objects are also served in, after `rtype.version`.
    extra_versions: tuple[str, ...] = ()
    find_warnings: WarningFinder | None = None
    check_references: ReferenceChecker | None = None

    @property
    def supported_field_labels(self) -> frozenset[str]:
        return BASE_FIELD_LABELS | self.field_labels

    @property
    def versions(self) -> tuple[str, ...]:
        """Every version this kind is served in; the first is the stored and preferred one."""
        return (self.rtype.version, *self.extra_versions)

    def rtype_at(self, version: str) -> resources.ResourceType:
        """The resource type as served in `version` (one of `versions`)."""
        if version == self.rtype.version:
            return self.rtype
        if version not in self.extra_versions:
            raise ValueError(f"{self.rtype.plural} are not served in version {version!r}")
        return dataclasses.replace(self.rtype, version=version)


class KindRegistry:
    """Served kinds by resource type, (apiVersion, kind) and (group, version, plural).

    Invariant: one kind per (group, plural), since the store's directory layout has no version;
    that kind may be served in several versions, all of which find it. `types` and `find` speak
    of stored types (the store keys objects by them), the lookups by name of any served version.
    """

    def __init__(self, kinds: Iterable[ServedKind]) -> None:
        self._types = resources.ResourceRegistry(())
        self._kinds: dict[resources.ResourceType, ServedKind] = {}
        self._served: dict[resources.ResourceType, ServedKind] = {}
        plurals: set[tuple[str, str]] = set()
        for served in kinds:
            rtype = served.rtype
            if (rtype.group, rtype.plural) in plurals:
                raise ValueError(f"{rtype.group or 'core'}/{rtype.plural} is served twice")
            if len(set(served.versions)) != len(served.versions):
                raise ValueError(f"{rtype.plural} lists a version twice: {served.versions}")
            plurals.add((rtype.group, rtype.plural))
            for version in served.versions:
                at = served.rtype_at(version)
                self._types.add(at)
                self._served[at] = served
            self._kinds[rtype] = served

    def __iter__(self) -> Iterator[ServedKind]:
        return iter(list(self._kinds.values()))

    def find(self, rtype: resources.ResourceType) -> ServedKind | None:
        """The kind stored as `rtype` (not one of its other served versions)."""
        return self._kinds.get(rtype)

    def find_kind(self, api_version: str, kind: str) -> ServedKind | None:
        rtype = self._types.find_kind(api_version, kind)
        return None if rtype is None else self._served[rtype]

    def find_plural(self, group: str, version: str, plural: str) -> ServedKind | None:
        rtype = self._types.find_plural(group, version, plural)
        return None if rtype is None else self._served[rtype]

    def serves(self, group: str, version: str) -> bool:
        """Some kind is served at ``/apis/<group>/<version>`` (``/api/<version>`` for core)."""
        return any((t.group, t.version) == (group, version) for t in self._served)

    @property
    def types(self) -> list[resources.ResourceType]:
        """The stored types, one per kind."""
        return list(self._kinds)

    def group_versions(self) -> dict[str, list[str]]:
        """Named groups (not core) and their versions, in registration order: a kind's stored
        version before its other versions, so the first version of a group is its preferred."""
        found: dict[str, list[str]] = {}
        for served in self._kinds.values():
            group = served.rtype.group
            if not group:
                continue
            versions = found.setdefault(group, [])
            versions.extend(v for v in served.versions if v not in versions)
        return found


# -- defaults (what the Kubernetes API server fills in) ------------------------------------

DEFAULT_GRACE_PERIOD_SECONDS = 30


def _dict_at(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.setdefault(key, {})
    assert isinstance(value, dict)  # the object passed validation
    return value


def default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD_SECONDS)
    spec.setdefault("serviceAccountName", "default")
    for container in spec["containers"]:
        for port in container.get("ports", []):
            port.setdefault("protocol", "TCP")


def default_pod(pod: dict[str, Any]) -> None:
    default_pod_spec(_dict_at(pod, "spec"))
    _dict_at(pod, "status").setdefault("phase", "Pending")


def default_deployment(deployment: dict[str, Any]) -> None:
    """The template gets the pod defaults, so a pod made from it equals its template and the
    template hash does not change when the server fills a default in."""
    spec = _dict_at(deployment, "spec")
    spec.setdefault("replicas", 1)
    default_pod_spec(_dict_at(_dict_at(spec, "template"), "spec"))


def default_service(service: dict[str, Any]) -> None:
    spec = _dict_at(service, "spec")
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports", []):
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])


def default_namespace(namespace: dict[str, Any]) -> None:
    _dict_at(namespace, "status").setdefault("phase", "Active")


def build_core_kinds() -> list[ServedKind]:
    """Namespace, Node, Pod and Service: what the mesh needs from the core API."""
    return [
        ServedKind(
            resources.NAMESPACES,
            schemas.NAMESPACE,
            default_namespace,
            frozenset({"status.phase"}),
            ("ns",),
        ),
        ServedKind(resources.NODES, schemas.NODE, None, frozenset({"spec.unschedulable"}), ("no",)),
        ServedKind(
            resources.PODS,
            schemas.POD,
            default_pod,
            frozenset(
                {
                    "spec.nodeName",
                    "spec.serviceAccountName",
                    "spec.restartPolicy",
                    "status.phase",
                    "status.podIP",
                    "status.nominatedNodeName",
                }
            ),
            ("po",),
        ),
        ServedKind(
            resources.SERVICES,
            schemas.SERVICE,
            default_service,
            frozenset({"spec.clusterIP", "spec.type"}),
            ("svc",),
        ),
    ]


# Not among meshcore's well-known types (those need no discovery); the local server serves it.
DEPLOYMENTS = resources.DEPLOYMENTS


def build_apps_kinds() -> list[ServedKind]:
    """apps/v1: Deployment (its pods are made by `controller.sources.local.deployments`)."""
    return [
        ServedKind(
            DEPLOYMENTS,
            schemas.DEPLOYMENT,
            default_deployment,
            short_names=("deploy",),
            tracks_generation=True,
        )
    ]


# Istio's security kinds: stored as v1, also served as v1beta1 (the same schema).
SECURITY_GROUP = "security.istio.io"
AUTHORIZATION_POLICIES = resources.AUTHORIZATION_POLICIES
PEER_AUTHENTICATIONS = resources.PEER_AUTHENTICATIONS
SECURITY_EXTRA_VERSIONS = ("v1beta1",)
# Istio's default meshConfig.rootNamespace: a policy there applies to the whole mesh.
DEFAULT_ROOT_NAMESPACE = spec.DEFAULT_ROOT_NAMESPACE


def build_unenforced_warnings(root_namespace: str, *, dry_run_enabled: bool) -> WarningFinder:
    """One warning per part of an AuthorizationPolicy that ztunnel does not enforce as written
    (``spec.rules[0].to[0].operation.methods: HTTP attribute: ...``), judged with the
    controller's settings."""

    def find(obj: dict[str, Any]) -> list[str]:
        found = analysis.find_unenforced(
            obj, root_namespace=root_namespace, dry_run_enabled=dry_run_enabled
        )
        return [str(f) for f in found]

    return find


def build_security_kinds(
    root_namespace: str = DEFAULT_ROOT_NAMESPACE, *, dry_run_enabled: bool = False
) -> list[ServedKind]:
    """security.istio.io: AuthorizationPolicy and PeerAuthentication, in v1 and v1beta1.
    `root_namespace` and `dry_run_enabled` are the controller's (meshConfig.rootNamespace,
    AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY): the warnings say what its translation does."""
    return [
        ServedKind(
            AUTHORIZATION_POLICIES,
            policyschemas.AUTHORIZATION_POLICY,
            short_names=("ap",),
            tracks_generation=True,
            extra_versions=SECURITY_EXTRA_VERSIONS,
            find_warnings=build_unenforced_warnings(
                root_namespace, dry_run_enabled=dry_run_enabled
            ),
        ),
        ServedKind(
            PEER_AUTHENTICATIONS,
            policyschemas.PEER_AUTHENTICATION,
            short_names=("pa",),
            tracks_generation=True,
            extra_versions=SECURITY_EXTRA_VERSIONS,
        ),
    ]


# Istio's traffic kinds: stored as v1, also served in the older versions Istio still serves.
NETWORKING_GROUP = "networking.istio.io"
VIRTUAL_SERVICES = resources.VIRTUAL_SERVICES
DESTINATION_RULES = resources.DESTINATION_RULES
SERVICE_ENTRIES = resources.SERVICE_ENTRIES
NETWORKING_EXTRA_VERSIONS = ("v1beta1", "v1alpha3")


def build_traffic_kinds() -> list[ServedKind]:
    """networking.istio.io: VirtualService, DestinationRule and ServiceEntry, validated and
    stored; each write is answered with what the mesh does not act on. A ServiceEntry's status
    holds the addresses `serviceentries` allocates for it."""
    return [
        ServedKind(
            VIRTUAL_SERVICES,
            trafficschemas.VIRTUAL_SERVICE,
            short_names=("vs",),
            tracks_generation=True,
            extra_versions=NETWORKING_EXTRA_VERSIONS,
            find_warnings=trafficschemas.find_unenforced,
            check_references=trafficschemas.check_subsets,
        ),
        ServedKind(
            DESTINATION_RULES,
            trafficschemas.DESTINATION_RULE,
            short_names=("dr",),
            tracks_generation=True,
            extra_versions=NETWORKING_EXTRA_VERSIONS,
            find_warnings=trafficschemas.find_unenforced,
        ),
        ServedKind(
            SERVICE_ENTRIES,
            serviceentryschemas.SERVICE_ENTRY,
            short_names=("se",),
            tracks_generation=True,
            extra_versions=NETWORKING_EXTRA_VERSIONS,
            find_warnings=serviceentryschemas.find_unenforced,
        ),
    ]


# Gateway API: stored as v1, also served as v1beta1 (the same schema for these two kinds).
GATEWAYS = resources.GATEWAYS
HTTP_ROUTES = resources.HTTP_ROUTES
GATEWAY_EXTRA_VERSIONS = ("v1beta1",)


def build_gateway_kinds() -> list[ServedKind]:
    """gateway.networking.k8s.io: Gateway (a waypoint is one of class istio-waypoint) and
    HTTPRoute, validated and stored; each write says what the mesh does not act on."""
    return [
        ServedKind(
            GATEWAYS,
            gatewayschemas.GATEWAY,
            short_names=("gtw",),
            tracks_generation=True,
            extra_versions=GATEWAY_EXTRA_VERSIONS,
            find_warnings=gatewayschemas.find_unenforced,
        ),
        ServedKind(
            HTTP_ROUTES,
            gatewayschemas.HTTP_ROUTE,
            tracks_generation=True,
            extra_versions=GATEWAY_EXTRA_VERSIONS,
            find_warnings=gatewayschemas.find_unenforced,
        ),
    ]


TELEMETRIES = resources.TELEMETRIES


def build_telemetry_kinds() -> list[ServedKind]:
    """telemetry.istio.io: Telemetry (its tracing sampling reaches waypoints)."""
    return [
        ServedKind(
            TELEMETRIES,
            telemetryschemas.TELEMETRY,
            tracks_generation=True,
            extra_versions=("v1alpha1",),
            find_warnings=telemetryschemas.find_unenforced,
        )
    ]


def build_registry(
    extra: Iterable[ServedKind] = (),
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    dry_run_enabled: bool = False,
) -> KindRegistry:
    return KindRegistry(
        [
            *build_core_kinds(),
            *build_apps_kinds(),
            *build_security_kinds(root_namespace, dry_run_enabled=dry_run_enabled),
            *build_traffic_kinds(),
            *build_gateway_kinds(),
            *build_telemetry_kinds(),
            *extra,
        ]
    )


# -- discovery documents -------------------------------------------------------------------


def build_api_versions() -> dict[str, Any]:
    """``GET /api``."""
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}


def build_api_group_list(registry: KindRegistry) -> dict[str, Any]:
    """``GET /apis``."""
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [build_api_group(g, vs) for g, vs in registry.group_versions().items()],
    }


def build_api_group(group: str, versions: list[str]) -> dict[str, Any]:
    """``GET /apis/<group>``; the first version registered is the preferred one."""
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": entries,
        "preferredVersion": entries[0],
    }


def build_api_resource_list(registry: KindRegistry, group: str, version: str) -> dict[str, Any]:
    """``GET /api/v1`` or ``/apis/<group>/<version>``: the kinds served there."""
    group_version = f"{group}/{version}" if group else version
    entries: list[dict[str, Any]] = []
    for served in registry:
        if served.rtype.group != group or version not in served.versions:
            continue
        rtype = served.rtype_at(version)
        entries.append(
            {
                "name": rtype.plural,
                "singularName": rtype.kind.lower(),
                "namespaced": rtype.namespaced,
                "kind": rtype.kind,
                "verbs": VERBS,
                "shortNames": list(served.short_names),
            }
        )
        if served.has_status:
            entries.append(
                {
                    "name": f"{rtype.plural}/status",
                    "singularName": "",
                    "namespaced": rtype.namespaced,
                    "kind": rtype.kind,
                    "verbs": STATUS_VERBS,
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": entries,
    }
