"""The controller's configuration: one frozen value built from the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

from meshcore import envconfig, errors
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
        read = envconfig.Env(env, ConfigError)
        cidr = read.optional("SERVICE_CIDR", "10.96.0.0/16")
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise ConfigError(f"SERVICE_CIDR={cidr!r} is not a network: {exc}") from None
        return cls(
            state_dir=read.required("CONTROLLER_STATE_DIR"),
            xds_listen=read.required("XDS_LISTEN"),
            local_api_socket=read.required("LOCAL_API_SOCKET"),
            trust_domain=read.optional("TRUST_DOMAIN", spiffe.DEFAULT_TRUST_DOMAIN),
            cluster_id=read.optional("CLUSTER_ID", ids.DEFAULT_CLUSTER_ID),
            domain=read.optional("CLUSTER_DOMAIN", ids.DEFAULT_DOMAIN),
            service_cidr=cidr,
            log_level=read.log_level(),
        )
