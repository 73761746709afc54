"""The waypoint's configuration: one frozen value built from the environment."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from meshcore import envconfig, errors
from meshcore.identity import spiffe
from meshcore.model import ids


class ConfigError(errors.MeshError, ValueError):
    """An environment variable is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    namespace: str  # the waypoint's namespace (its Gateway's)
    name: str  # its Gateway's name
    xds_address: str
    ca_address: str
    token_file: str
    service_account: str
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    cluster_id: str = ids.DEFAULT_CLUSTER_ID
    hbone_addr: tuple[str, int] = ("0.0.0.0", 15008)
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    secret_ttl: datetime.timedelta = datetime.timedelta(hours=24)
    connect_timeout: float = 10.0
    otlp_endpoint: str | None = None  # http://collector:4318; None: no spans exported
    trace_flush_interval: float = 1.0
    node_name: str = ""
    instance_ip: str = ""
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        read = envconfig.Env(env, ConfigError)
        xds = read.required("XDS_ADDRESS")
        name = read.required("WAYPOINT_NAME")
        return cls(
            namespace=read.required("POD_NAMESPACE"),
            name=name,
            xds_address=xds,
            ca_address=read.optional("CA_ADDRESS", xds),
            token_file=read.required("XDS_TOKEN_FILE"),
            service_account=read.optional("SERVICE_ACCOUNT", name),
            trust_domain=read.optional("TRUST_DOMAIN", spiffe.DEFAULT_TRUST_DOMAIN),
            cluster_id=read.optional("CLUSTER_ID", ids.DEFAULT_CLUSTER_ID),
            hbone_addr=read.host_port("HBONE_ADDR", ("0.0.0.0", 15008)),
            metrics_addr=read.host_port("METRICS_ADDR", ("0.0.0.0", 15020)),
            readiness_addr=read.host_port("READINESS_ADDR", ("0.0.0.0", 15021)),
            secret_ttl=datetime.timedelta(seconds=read.seconds("SECRET_TTL", 86400.0)),
            connect_timeout=read.seconds("CONNECT_TIMEOUT", 10.0),
            otlp_endpoint=read.optional("OTLP_ENDPOINT") or None,
            trace_flush_interval=read.seconds("TRACE_FLUSH_INTERVAL", 1.0),
            node_name=read.optional("NODE_NAME"),
            instance_ip=read.optional("INSTANCE_IP"),
            log_level=read.log_level(),
        )

    @property
    def identity(self) -> spiffe.SpiffeId:
        return spiffe.SpiffeId.for_workload(self.namespace, self.service_account, self.trust_domain)

    @property
    def node_id(self) -> str:
        """The xDS node id of a waypoint (Envoy's form: router~ip~pod.ns~ns.svc.cluster.local)."""
        ns = self.namespace
        return f"router~{self.instance_ip}~{self.name}.{ns}~{ns}.svc.cluster.local"
