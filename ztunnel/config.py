"""ztunnel's configuration: one frozen value built from the environment, nothing else reads it."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from meshcore import errors
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
    drain_deadline: float = 5.0
    log_level: str = "info"
    instance_ip: str = ""
    pod_name: str = "ztunnel"
    pod_namespace: str = "istio-system"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"environment variable {name} is required")
            return value

        def seconds(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
            if value <= 0:
                raise ConfigError(f"{name}={raw!r} must be positive")
            return value

        xds = required("XDS_ADDRESS")
        return cls(
            node_name=required("NODE_NAME"),
            xds_address=xds,
            ca_address=env.get("CA_ADDRESS", "").strip() or xds,
            token_file=required("XDS_TOKEN_FILE"),
            zds_socket=required("INPOD_UDS"),
            trust_domain=env.get("TRUST_DOMAIN", "").strip() or spiffe.DEFAULT_TRUST_DOMAIN,
            cluster_id=env.get("CLUSTER_ID", "").strip() or ids.DEFAULT_CLUSTER_ID,
            metrics_addr=_address(env, "METRICS_ADDR", ("0.0.0.0", 15020)),
            readiness_addr=_address(env, "READINESS_ADDR", ("0.0.0.0", 15021)),
            admin_addr=_address(env, "ADMIN_ADDR", ("127.0.0.1", 15000)),
            secret_ttl=datetime.timedelta(seconds=seconds("SECRET_TTL", 86400.0)),
            connect_timeout=seconds("CONNECT_TIMEOUT", 10.0),
            pool_idle_timeout=seconds("POOL_UNUSED_RELEASE_TIMEOUT", 300.0),
            drain_deadline=seconds("CONNECTION_TERMINATION_DEADLINE", 5.0),
            log_level=env.get("LOG_LEVEL", "info"),
            instance_ip=env.get("INSTANCE_IP", ""),
            pod_name=env.get("POD_NAME", "ztunnel"),
            pod_namespace=env.get("POD_NAMESPACE", "istio-system"),
        )

    @property
    def node_id(self) -> str:
        """The xDS node id istiod expects from a ztunnel (spec 5.1)."""
        ns = self.pod_namespace
        return f"ztunnel~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"


def _address(env: Mapping[str, str], name: str, default: tuple[str, int]) -> tuple[str, int]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={raw!r} must be host:port")
    return (host.strip("[]") or "0.0.0.0", int(port))
