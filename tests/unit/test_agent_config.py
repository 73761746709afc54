"""The node agent's Config.from_env: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import pytest

from cni.agent import config
from cni.redirect import ebpf

BASE = {"NODE_NAME": "node-a", "KUBE_API": "unix:///tmp/mt-x/api.sock"}


def test_defaults() -> None:
    cfg = config.Config.from_env(BASE)
    assert cfg == config.Config(
        node_name="node-a",
        kube_api="unix:///tmp/mt-x/api.sock",
        ztunnel_socket="/var/run/ztunnel/ztunnel.sock",
        cni_event_socket="/var/run/ambient-mesh/cni.sock",
        state_dir="/var/lib/ambient-mesh/agent",
        log_level="info",
        dns_capture=False,
        redirect_mode="iptables",
        bpf_pin_dir="/sys/fs/bpf/ambient-mesh",
        system_namespace="istio-system",
    )


def test_every_variable() -> None:
    env = {
        **BASE,
        "ZTUNNEL_UDS": "/tmp/mt-x/zds.sock",
        "CNI_EVENT_UDS": "/tmp/mt-x/cni.sock",
        "AGENT_STATE_DIR": "/tmp/mt-x/agent",
        "LOG_LEVEL": "DEBUG",
        "DNS_CAPTURE": "true",
        "POD_NAMESPACE": "mesh-system",
    }
    cfg = config.Config.from_env(env)
    assert cfg.system_namespace == "mesh-system"
    assert (cfg.ztunnel_socket, cfg.cni_event_socket, cfg.state_dir) == (
        "/tmp/mt-x/zds.sock",
        "/tmp/mt-x/cni.sock",
        "/tmp/mt-x/agent",
    )
    assert cfg.log_level == "debug"
    assert cfg.dns_capture is True
    assert cfg.redirect_mode == "iptables"


def test_ebpf_redirect_mode() -> None:
    cfg = config.Config.from_env({**BASE, "REDIRECT_MODE": "eBPF", "BPF_PIN_DIR": "/run/bpf/am"})
    assert (cfg.redirect_mode, cfg.bpf_pin_dir) == ("ebpf", "/run/bpf/am")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"NODE_NAME": " "}, "environment variable NODE_NAME is required", id="node"),
        pytest.param(
            {"NODE_NAME": "node-a,spec.x=y"},
            "NODE_NAME='node-a,spec.x=y' is not a valid node name (lowercase letters, digits, "
            "'-' and '.', at most 253 characters)",
            id="node-name",
        ),
        pytest.param({"KUBE_API": ""}, "environment variable KUBE_API is required", id="api"),
        pytest.param(
            {"KUBE_API": "unix://relative.sock"},
            "KUBE_API='unix://relative.sock' must be unix:///path/to/api.sock or "
            "http(s)://host:port",
            id="api-relative-socket",
        ),
        pytest.param(
            {"ZTUNNEL_UDS": "zds.sock"}, "ZTUNNEL_UDS='zds.sock' must be an absolute path",
            id="relative-socket",
        ),
        pytest.param(
            {"CNI_EVENT_UDS": "/" + "x" * 120},
            f"CNI_EVENT_UDS='/{'x' * 120}' is longer than 107 bytes, too long for a Unix socket",
            id="long-socket",
        ),
        pytest.param(
            {"AGENT_STATE_DIR": "state"}, "AGENT_STATE_DIR='state' must be an absolute path",
            id="relative-state",
        ),
        pytest.param(
            {"POD_NAMESPACE": "Mesh_System"},
            "POD_NAMESPACE='Mesh_System' is not a valid namespace name (a DNS label: lowercase "
            "letters, digits and '-', at most 63 characters)",
            id="system-namespace",
        ),
        pytest.param(
            {"BPF_PIN_DIR": "bpf"}, "BPF_PIN_DIR='bpf' must be an absolute path", id="pin-dir"
        ),
        pytest.param(
            {"LOG_LEVEL": "loud"},
            "LOG_LEVEL='loud' must be one of debug, info, warning, error, critical",
            id="log-level",
        ),
        pytest.param(
            {"REDIRECT_MODE": "tproxy"},
            "REDIRECT_MODE='tproxy' must be one of iptables, ebpf",
            id="redirect-mode",
        ),
        pytest.param(
            {"REDIRECT_MODE": "ebpf", "DNS_CAPTURE": "true"},
            "DNS_CAPTURE=true needs REDIRECT_MODE=iptables: the eBPF programs do not capture DNS",
            id="dns-capture-with-ebpf",
        ),
        pytest.param(
            {"DNS_CAPTURE": "sometimes"}, "DNS_CAPTURE='sometimes' must be true or false",
            id="dns-capture",
        ),
    ],
)  # fmt: skip
def test_errors_name_the_variable(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.Config.from_env({**BASE, **overrides})
    assert str(caught.value) == message


@pytest.mark.parametrize("release", ["6.5.0", "6.18.44-fc-v1272", "7.0.1"])
def test_ebpf_mode_accepts_kernels_from_6_5(release: str) -> None:
    ebpf.check_kernel(release)


@pytest.mark.parametrize("release", ["6.1.0-57-amd64", "5.15.0", "not-a-version"])
def test_ebpf_mode_refuses_older_kernels_naming_the_release(release: str) -> None:
    with pytest.raises(ebpf.BpfUnavailableError, match=f"Linux 6.5 or later .* {release!r}"):
        ebpf.check_kernel(release)
