"""ztunnel's configuration: one frozen value built from the environment, nothing else reads it."""

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
    node_name: str
    xds_address: str
    ca_address: str
    token_file: str
    zds_socket: str
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    cluster_id: str = ids.DEFAULT_CLUSTER_ID
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    secret_ttl: datetime.timedelta = datetime.timedelta(hours=24)
    connect_timeout: float = 10.0
    # How long an inbound connection waits for the local pod's workload to appear in xDS.
    workload_wait: float = 5.0
    pool_max_streams: int = 100
    pool_idle_timeout: float = 300.0
    # HTTP/2 PING on every pooled connection; no ACK within the timeout closes it, so a dead
    # peer node is noticed before a new stream is put on its connection.
    pool_keepalive_interval: float = 10.0
    pool_keepalive_timeout: float = 20.0
    drain_deadline: float = 5.0
    log_level: str = "info"
    instance_ip: str = ""
    pod_name: str = "ztunnel"
    pod_namespace: str = envconfig.DEFAULT_SYSTEM_NAMESPACE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        read = envconfig.Env(env, ConfigError)
        xds = read.required("XDS_ADDRESS")
        return cls(
            node_name=read.required("NODE_NAME"),
            xds_address=xds,
            ca_address=read.optional("CA_ADDRESS", xds),
            token_file=read.required("XDS_TOKEN_FILE"),
            zds_socket=read.required("INPOD_UDS"),
            trust_domain=read.optional("TRUST_DOMAIN", spiffe.DEFAULT_TRUST_DOMAIN),
            cluster_id=read.optional("CLUSTER_ID", ids.DEFAULT_CLUSTER_ID),
            metrics_addr=read.host_port("METRICS_ADDR", ("0.0.0.0", 15020)),
            readiness_addr=read.host_port("READINESS_ADDR", ("0.0.0.0", 15021)),
            admin_addr=read.host_port("ADMIN_ADDR", ("127.0.0.1", 15000)),
            secret_ttl=datetime.timedelta(seconds=read.seconds("SECRET_TTL", 86400.0)),
            connect_timeout=read.seconds("CONNECT_TIMEOUT", 10.0),
            pool_max_streams=read.count("POOL_MAX_STREAMS_PER_CONNECTION", 100, maximum=1000),
            pool_idle_timeout=read.seconds("POOL_UNUSED_RELEASE_TIMEOUT", 300.0),
            pool_keepalive_interval=read.seconds("POOL_KEEPALIVE_INTERVAL", 10.0),
            pool_keepalive_timeout=read.seconds("POOL_KEEPALIVE_TIMEOUT", 20.0),
            drain_deadline=read.seconds("CONNECTION_TERMINATION_DEADLINE", 5.0),
            log_level=read.log_level(),
            instance_ip=read.optional("INSTANCE_IP"),
            pod_name=read.optional("POD_NAME", "ztunnel"),
            pod_namespace=read.optional("POD_NAMESPACE", envconfig.DEFAULT_SYSTEM_NAMESPACE),
        )

    @property
    def node_id(self) -> str:
        """The xDS node id istiod expects from a ztunnel (spec 5.1)."""
        ns = self.pod_namespace
        return f"ztunnel~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"
