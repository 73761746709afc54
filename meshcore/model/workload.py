"""Workloads (pods) and services as the data plane sees them."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from meshcore.identity import spiffe
from meshcore.model import ids


class TunnelProtocol(enum.Enum):
    NONE = 0  # plain TCP: the workload is not in the mesh
    HBONE = 1  # reach it through HBONE on port 15008


class AppTunnelProtocol(enum.Enum):
    NONE = 0  # connect to the tunnel port, nothing written first
    PROXY = 1  # connect to the tunnel port and first write a PROXY protocol v2 header


@dataclasses.dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    """How the receiving ztunnel hands HBONE connections to this workload (spec section 2, item
    6): to `port` (None: the port the client asked for) speaking `protocol`."""

    protocol: AppTunnelProtocol
    port: int | None = None


HBONE_MTLS_PORT = 15008


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint is reached (istio.workload.GatewayAddress): exactly one of a Service
    named by `hostname` = (namespace, hostname), or one `address` = (network, IP).

    A waypoint is always reached over HBONE on `hbone_mtls_port`, whatever its own workloads'
    tunnel protocol: waypoint pods are not captured by ztunnel and terminate HBONE themselves.
    """

    hostname: tuple[str, str] | None = None
    address: tuple[str, ids.IpAddress] | None = None
    hbone_mtls_port: int = HBONE_MTLS_PORT

    def __post_init__(self) -> None:
        if (self.hostname is None) == (self.address is None):
            raise ValueError("a GatewayAddress names exactly one of hostname or address")

    def __str__(self) -> str:
        """How messages name it: "shop/waypoint (waypoint.shop.svc.cluster.local)"."""
        if self.hostname is not None:
            namespace, hostname = self.hostname
            return f"{namespace}/{hostname.split('.', 1)[0]} ({hostname})"
        assert self.address is not None
        network, address = self.address
        return f"{address} on network {network!r}" if network else str(address)


class WorkloadStatus(enum.Enum):
    HEALTHY = 0
    UNHEALTHY = 1


class WorkloadType(enum.Enum):
    DEPLOYMENT = 0
    CRONJOB = 1
    POD = 2
    JOB = 3


@dataclasses.dataclass(frozen=True, slots=True)
class PortMapping:
    """A service port and the port on the workload it forwards to."""

    service_port: int
    target_port: int


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceBinding:
    """This workload is an endpoint of `service` with these port mappings."""

    service: ids.ServiceKey
    ports: tuple[PortMapping, ...]

    def target_port(self, service_port: int) -> int | None:
        for mapping in self.ports:
            if mapping.service_port == service_port:
                return mapping.target_port
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    uid: ids.WorkloadUid
    name: str
    namespace: str
    addresses: tuple[ids.IpAddress, ...]
    node: str
    service_account: str = spiffe.DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.POD
    workload_name: str = ""
    services: tuple[ServiceBinding, ...] = ()
    authorization_policies: tuple[ids.PolicyKey, ...] = ()
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    cluster_id: str = ids.DEFAULT_CLUSTER_ID
    network: str = ""
    application_tunnel: ApplicationTunnel | None = None
    # Traffic dialled to this workload's own address goes through this waypoint (never
    # traffic addressed to one of its services: that follows the Service's waypoint).
    waypoint: GatewayAddress | None = None
    # The pod's labels, sorted: waypoints pick DestinationRule subsets by them.
    labels: tuple[tuple[str, str], ...] = ()
    # A DNS name instead of addresses: a ServiceEntry endpoint resolved where it is dialled.
    hostname: str = ""

    @property
    def identity(self) -> spiffe.SpiffeId:
        return spiffe.SpiffeId.for_workload(self.namespace, self.service_account, self.trust_domain)

    @property
    def is_healthy(self) -> bool:
        return self.status is WorkloadStatus.HEALTHY

    @property
    def has_hbone(self) -> bool:
        return self.tunnel_protocol is TunnelProtocol.HBONE

    def has_labels(self, wanted: Iterable[tuple[str, str]]) -> bool:
        """Every (key, value) of `wanted` is among the labels (a subset's selector)."""
        own = dict(self.labels)
        return all(own.get(k) == v for k, v in wanted)

    def binding(self, service: ids.ServiceKey) -> ServiceBinding | None:
        for binding in self.services:
            if binding.service == service:
                return binding
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    addresses: tuple[ids.IpAddress, ...]  # empty for a headless service
    ports: tuple[PortMapping, ...]
    subject_alt_names: tuple[str, ...] = ()
    # Traffic to the service's addresses goes through this waypoint (L7 policy and routing).
    waypoint: GatewayAddress | None = None

    @property
    def key(self) -> ids.ServiceKey:
        return ids.service_key(self.namespace, self.hostname)

    def port(self, service_port: int) -> PortMapping | None:
        for mapping in self.ports:
            if mapping.service_port == service_port:
                return mapping
        return None
