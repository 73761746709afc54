"""The controller's configuration: one frozen value built from the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import sys
from collections.abc import Mapping

from meshcore import envconfig, errors
from meshcore.identity import spiffe
from meshcore.model import ids
from meshcore.policy import spec as policy_spec

# A namespace name (DNS-1123 label).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


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
    # Policies here without a selector apply to the whole mesh (istiod's meshConfig.rootNamespace).
    root_namespace: str = policy_spec.DEFAULT_ROOT_NAMESPACE
    # Send dry-run AuthorizationPolicies to ztunnel, marked dry run (istiod's flag of this name).
    dry_run_policies: bool = False
    log_level: str = "info"
    # How waypoint pods are started and reach this controller ("" address: `xds_listen`).
    waypoint_command: tuple[str, ...] = (sys.executable, "-m", "waypoint")
    waypoint_xds_address: str = ""
    waypoint_otlp_endpoint: str = ""

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
        root_namespace = read.optional("ROOT_NAMESPACE", policy_spec.DEFAULT_ROOT_NAMESPACE)
        if not _NAMESPACE.fullmatch(root_namespace):
            raise ConfigError(f"ROOT_NAMESPACE={root_namespace!r} is not a namespace name")
        dry_run = read.optional("AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY", "false").lower()
        if dry_run not in _TRUE | _FALSE:
            raise ConfigError(
                f"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY={dry_run!r} is not true or false"
            )
        return cls(
            state_dir=read.required("CONTROLLER_STATE_DIR"),
            xds_listen=read.required("XDS_LISTEN"),
            local_api_socket=read.required("LOCAL_API_SOCKET"),
            trust_domain=read.optional("TRUST_DOMAIN", spiffe.DEFAULT_TRUST_DOMAIN),
            cluster_id=read.optional("CLUSTER_ID", ids.DEFAULT_CLUSTER_ID),
            domain=read.optional("CLUSTER_DOMAIN", ids.DEFAULT_DOMAIN),
            service_cidr=cidr,
            root_namespace=root_namespace,
            dry_run_policies=dry_run in _TRUE,
            log_level=read.log_level(),
            waypoint_command=_command(read.optional("WAYPOINT_COMMAND", "")),
            waypoint_xds_address=read.optional("WAYPOINT_XDS_ADDRESS", ""),
            waypoint_otlp_endpoint=read.optional("WAYPOINT_OTLP_ENDPOINT", ""),
        )


def _command(text: str) -> tuple[str, ...]:
    if not text.strip():
        return (sys.executable, "-m", "waypoint")
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"WAYPOINT_COMMAND={text!r} is not a command line: {exc}") from None
