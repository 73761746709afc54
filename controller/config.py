"""The controller's configuration: one frozen value built from the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

from meshcore import errors
from meshcore.identity import spiffe
from meshcore.model import ids


class ConfigError(errors.MeshError, ValueError):
    """An environment variable is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    state_dir: str
    xds_listen: str
    local_api_socket: str
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    cluster_id: str = ids.DEFAULT_CLUSTER_ID
    domain: str = ids.DEFAULT_DOMAIN
    service_cidr: str = "10.96.0.0/16"
    log_level: str = "info"

    @property
    def store_dir(self) -> str:
        return os.path.join(self.state_dir, "store")

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.state_dir, "ca")

    @property
    def token_secret_file(self) -> str:
        return os.path.join(self.state_dir, "token-secret")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"environment variable {name} is required")
            return value

        cidr = env.get("SERVICE_CIDR", "").strip() or "10.96.0.0/16"
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise ConfigError(f"SERVICE_CIDR={cidr!r} is not a network: {exc}") from None
        return cls(
            state_dir=required("CONTROLLER_STATE_DIR"),
            xds_listen=required("XDS_LISTEN"),
            local_api_socket=required("LOCAL_API_SOCKET"),
            trust_domain=env.get("TRUST_DOMAIN", "").strip() or spiffe.DEFAULT_TRUST_DOMAIN,
            cluster_id=env.get("CLUSTER_ID", "").strip() or ids.DEFAULT_CLUSTER_ID,
            domain=env.get("CLUSTER_DOMAIN", "").strip() or ids.DEFAULT_DOMAIN,
            service_cidr=cidr,
            log_level=env.get("LOG_LEVEL", "info"),
        )
