"""The node agent's configuration: one frozen value built from the environment.

Nothing else in the agent reads `os.environ`. Variable names are shared with the playground
supervisor and the DaemonSet manifest (docs/internals.md, "Configuration").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from meshcore import bpffs, envconfig, errors

DEFAULT_ZTUNNEL_UDS = "/var/run/ztunnel/ztunnel.sock"  # istio-cni's default (spec 4)
DEFAULT_CNI_EVENT_UDS = "/var/run/ambient-mesh/cni.sock"
DEFAULT_STATE_DIR = "/var/lib/ambient-mesh/agent"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# How the in-pod redirection is installed: iptables rules (spec 3.2) or tc eBPF programs.
REDIRECT_MODES = envconfig.REDIRECT_MODES
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

# Kubernetes node names are DNS-1123 subdomains; the name also ends up in a field selector.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(errors.MeshError, ValueError):
    """An environment variable is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    kube_api: str
    ztunnel_socket: str = DEFAULT_ZTUNNEL_UDS
    cni_event_socket: str = DEFAULT_CNI_EVENT_UDS
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    # Off until ztunnel has a DNS proxy on 15053: capturing port 53 without one breaks DNS.
    dns_capture: bool = False
    redirect_mode: str = "iptables"
    # eBPF mode pins its map of captured connections here, so that it outlives a restart.
    bpf_pin_dir: str = bpffs.DEFAULT_PIN_DIR
    # The agent's own namespace, as istio-cni reads it: ztunnel's pods there are never captured.
    system_namespace: str = envconfig.DEFAULT_SYSTEM_NAMESPACE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        read = envconfig.Env(env, ConfigError)
        required, optional = read.required, read.optional
        node_name = required("NODE_NAME")
        if len(node_name) > 253 or not _NODE_NAME.fullmatch(node_name):
            raise ConfigError(
                f"NODE_NAME={node_name!r} is not a valid node name (lowercase letters, digits, "
                "'-' and '.', at most 253 characters)"
            )
        kube_api = required("KUBE_API")
        if not kube_api.startswith(("unix:///", "http://", "https://")):
            raise ConfigError(
                f"KUBE_API={kube_api!r} must be unix:///path/to/api.sock or http(s)://host:port"
            )
        log_level = optional("LOG_LEVEL", "info").lower()
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        system_namespace = optional("POD_NAMESPACE", envconfig.DEFAULT_SYSTEM_NAMESPACE)
        if len(system_namespace) > 63 or not _NAMESPACE.fullmatch(system_namespace):
            raise ConfigError(
                f"POD_NAMESPACE={system_namespace!r} is not a valid namespace name (a DNS label: "
                "lowercase letters, digits and '-', at most 63 characters)"
            )
        redirect_mode = optional("REDIRECT_MODE", "iptables").lower()
        if redirect_mode not in REDIRECT_MODES:
            raise ConfigError(
                f"REDIRECT_MODE={redirect_mode!r} must be one of {', '.join(REDIRECT_MODES)}"
            )
        dns_capture = _boolean("DNS_CAPTURE", env.get("DNS_CAPTURE", ""), default=False)
        if dns_capture and redirect_mode == "ebpf":
            raise ConfigError(
                "DNS_CAPTURE=true needs REDIRECT_MODE=iptables: "
                "the eBPF programs do not capture DNS"
            )
        return cls(
            node_name=node_name,
            kube_api=kube_api,
            ztunnel_socket=_socket_path(
                "ZTUNNEL_UDS", optional("ZTUNNEL_UDS", DEFAULT_ZTUNNEL_UDS)
            ),
            cni_event_socket=_socket_path(
                "CNI_EVENT_UDS", optional("CNI_EVENT_UDS", DEFAULT_CNI_EVENT_UDS)
            ),
            state_dir=_absolute("AGENT_STATE_DIR", optional("AGENT_STATE_DIR", DEFAULT_STATE_DIR)),
            log_level=log_level,
            dns_capture=dns_capture,
            redirect_mode=redirect_mode,
            bpf_pin_dir=_absolute("BPF_PIN_DIR", optional("BPF_PIN_DIR", bpffs.DEFAULT_PIN_DIR)),
            system_namespace=system_namespace,
        )


def _absolute(name: str, value: str) -> str:
    if not os.path.isabs(value):
        raise ConfigError(f"{name}={value!r} must be an absolute path")
    return value


def _socket_path(name: str, value: str) -> str:
    _absolute(name, value)
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{name}={value!r} is longer than {MAX_SOCKET_PATH} bytes, too long for a Unix socket"
        )
    return value


def _boolean(name: str, raw: str, *, default: bool) -> bool:
    value = raw.strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} must be true or false")
