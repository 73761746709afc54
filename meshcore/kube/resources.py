"""Resource types: which URL serves which kind.

A `ResourceType` is the (group, version, kind, plural, scope) tuple that discovery returns; it
builds the REST paths. The well-known core kinds are constants so that callers need no discovery
round trip for them; anything else is found with `ApiClient.resolve`.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Iterable, Iterator


def split_api_version(api_version: str) -> tuple[str, str]:
    """``"v1"`` -> ``("", "v1")``; ``"apps/v1"`` -> ``("apps", "v1")``."""
    group, _, version = api_version.rpartition("/")
    return group, version


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_path(self) -> str:
        """``/api/v1`` for the core group, ``/apis/<group>/<version>`` otherwise."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The REST path of the collection, or of one object (and its subresource).

        `namespace` is ignored for cluster-scoped kinds (as kubectl ignores ``-n`` for them), and
        None for a namespaced kind means "all namespaces" (a list or watch path).
        """
        if subresource is not None and name is None:
            raise ValueError(f"subresource {subresource!r} of {self.plural} needs an object name")
        parts = [self.group_path]
        if self.namespaced and namespace:
            parts.append(f"/namespaces/{_segment(namespace)}")
        parts.append(f"/{self.plural}")
        if name is not None:
            parts.append(f"/{_segment(name)}")
        if subresource is not None:
            parts.append(f"/{_segment(subresource)}")
        return "".join(parts)


def _segment(value: str) -> str:
    # Names are validated DNS names on the server, but a caller's typo must not change the path.
    if not value:
        raise ValueError("empty path segment")
    return urllib.parse.quote(value, safe="")


NAMESPACES = ResourceType("", "v1", "Namespace", "namespaces", namespaced=False)
NODES = ResourceType("", "v1", "Node", "nodes", namespaced=False)
PODS = ResourceType("", "v1", "Pod", "pods", namespaced=True)
SERVICES = ResourceType("", "v1", "Service", "services", namespaced=True)
DEPLOYMENTS = ResourceType("apps", "v1", "Deployment", "deployments", namespaced=True)
# Istio's security policies (also served as v1beta1; v1 is what istiod watches).
AUTHORIZATION_POLICIES = ResourceType(
    "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies", namespaced=True
)
PEER_AUTHENTICATIONS = ResourceType(
    "security.istio.io", "v1", "PeerAuthentication", "peerauthentications", namespaced=True
)
# Istio's traffic kinds (also served as v1beta1 and v1alpha3).
VIRTUAL_SERVICES = ResourceType(
    "networking.istio.io", "v1", "VirtualService", "virtualservices", namespaced=True
)
DESTINATION_RULES = ResourceType(
    "networking.istio.io", "v1", "DestinationRule", "destinationrules", namespaced=True
)
SERVICE_ENTRIES = ResourceType(
    "networking.istio.io", "v1", "ServiceEntry", "serviceentries", namespaced=True
)
# Gateway API (a waypoint is a Gateway of class istio-waypoint; HTTPRoutes bind to Services).
GATEWAYS = ResourceType("gateway.networking.k8s.io", "v1", "Gateway", "gateways", namespaced=True)
HTTP_ROUTES = ResourceType(
    "gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes", namespaced=True
)
# Istio's Telemetry (tracing sampling for waypoints; also served as v1alpha1).
TELEMETRIES = ResourceType("telemetry.istio.io", "v1", "Telemetry", "telemetries", namespaced=True)

WELL_KNOWN: tuple[ResourceType, ...] = (NAMESPACES, NODES, PODS, SERVICES)


class ResourceRegistry:
    """Resource types indexed by (apiVersion, kind) and by (group, version, plural).

    Invariant: both indexes hold the same types; a (group, version) never serves two types under
    one kind or one plural.
    """

    def __init__(self, types: Iterable[ResourceType] = WELL_KNOWN) -> None:
        self._by_kind: dict[tuple[str, str], ResourceType] = {}
        self._by_plural: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in types:
            self.add(rtype)

    def add(self, rtype: ResourceType) -> None:
        kind_key = (rtype.api_version, rtype.kind)
        plural_key = (rtype.group, rtype.version, rtype.plural)
        old = self._by_kind.get(kind_key) or self._by_plural.get(plural_key)
        if old is not None and old != rtype:
            raise ValueError(f"{rtype} clashes with {old}")
        self._by_kind[kind_key] = rtype
        self._by_plural[plural_key] = rtype

    def find_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return self._by_kind.get((api_version, kind))

    def find_plural(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_plural.get((group, version, plural))

    def __iter__(self) -> Iterator[ResourceType]:
        return iter(list(self._by_kind.values()))

    def __len__(self) -> int:
        return len(self._by_kind)
