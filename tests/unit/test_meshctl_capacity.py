"""Node capacity on the playground side: kubelet admission (pure), the rejected status and how
the CLI tables show it, and `max_pods` from `meshctl up` through the supervisor to the Node."""

from __future__ import annotations

import types
from typing import Any, cast

import pytest

from meshctl import errors, tables
from meshctl.playground import control, kubelet, paths, podstatus, podworker, supervisor, topology

FULL_MESSAGE = (
    "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2"
)


@pytest.mark.parametrize(
    ("used", "capacity", "expected"),
    [
        pytest.param(0, 2, None, id="empty"),
        pytest.param(1, 2, None, id="last-slot"),
        pytest.param(2, 2, podstatus.Rejection("OutOfpods", FULL_MESSAGE), id="full"),
        pytest.param(
            5,
            2,
            podstatus.Rejection(
                "OutOfpods",
                "Pod was rejected: Node didn't have enough resource: pods, requested: 1, "
                "used: 5, capacity: 2",
            ),
            id="over-full",
        ),
        pytest.param(0, 110, None, id="default"),
    ],
)
def test_admission(used: int, capacity: int, expected: podstatus.Rejection | None) -> None:
    assert podstatus.find_rejection(used, capacity) == expected


def test_rejected_status_is_final_and_shown_by_the_tables() -> None:
    rejection = podstatus.find_rejection(2, 2)
    assert rejection is not None
    status = podstatus.build_rejected_status(rejection, "2024-05-01T10:00:00Z")
    assert status == {
        "phase": "Failed",
        "reason": "OutOfpods",
        "message": FULL_MESSAGE,
        "startTime": "2024-05-01T10:00:00Z",
    }
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {"nodeName": "node1"}}
    assert tables.pod_status_text({**pod, "status": status}) == "OutOfpods"
    assert tables.pod_message({**pod, "status": status}) == FULL_MESSAGE
    waiting = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Too many pods.",
            }
        ],
    }
    assert tables.pod_status_text({**pod, "status": waiting}) == "Pending"


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        pytest.param("Pending", False, id="pending"),
        pytest.param("Running", False, id="running"),
        pytest.param("Succeeded", True, id="succeeded"),
        pytest.param("Failed", True, id="failed"),
        pytest.param("Unknown", False, id="unknown"),
    ],
)
def test_terminal_phase(phase: str, expected: bool) -> None:
    assert podstatus.is_terminal_phase(phase) is expected


KUBELET_ENV = {
    "NODE_NAME": "node1",
    "KUBE_API": "unix:///s/api.sock",
    "NODE_STATE_DIR": "/s/nodes/node1",
    "POD_CIDR": "10.244.0.0/24",
    "NETNS_PREFIX": "mt1",
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, 110, id="default"),
        pytest.param("", 110, id="empty"),
        pytest.param("2", 2, id="two"),
        pytest.param(" 250 ", 250, id="spaces"),
    ],
)
def test_kubelet_max_pods(raw: str | None, expected: int) -> None:
    env = dict(KUBELET_ENV) if raw is None else {**KUBELET_ENV, "MAX_PODS": raw}
    config = kubelet.Config.from_env(env)
    assert config.max_pods == expected
    node = kubelet.build_node(config, "172.30.0.10", "t0", "t1")
    assert node["status"]["capacity"] == {"pods": str(expected)}
    assert node["status"]["allocatable"] == {"pods": str(expected)}
    status = kubelet.build_node_status(
        "172.30.0.10", ready=False, since="t0", now="t1", max_pods=config.max_pods
    )
    assert status["allocatable"] == {"pods": str(expected)}


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_kubelet_max_pods_must_be_a_count(raw: str) -> None:
    with pytest.raises(kubelet.ConfigError, match=f"MAX_PODS='{raw}' must be a positive whole"):
        kubelet.Config.from_env({**KUBELET_ENV, "MAX_PODS": raw})


def test_max_pods_reaches_the_kubelet_from_up_options() -> None:
    opts = control.UpOptions(state_dir="/tmp/mt-abc", nodes=2, prefix="mt1", max_pods=3)
    argv = control.build_supervisor_argv(opts)
    assert argv[argv.index("--max-pods") + 1] == "3"
    config = supervisor.Config.from_args(argv[3:], {"PATH": "/usr/bin"})
    assert config.max_pods == 3
    node = topology.build_node_record("mt1", "node2", 1, topology.DEFAULT_SUBNET)
    _, _, kubelet_spec = supervisor.build_node_specs(config, paths.Paths(config.state_dir), node)
    assert kubelet.Config.from_env(kubelet_spec.env).max_pods == 3


def test_max_pods_defaults_everywhere() -> None:
    assert control.UpOptions(state_dir="/s").max_pods == podstatus.DEFAULT_MAX_PODS == 110
    config = supervisor.Config.from_args(["--state-dir", "/tmp/mt-abc"], {})
    assert config.max_pods == 110


def test_max_pods_below_one_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="--max-pods must be at least 1, got 0"):
        control.check_options(control.UpOptions(state_dir="/s", max_pods=0))
    with pytest.raises(errors.UsageError, match="--max-pods must be at least 1, got -2"):
        supervisor.Config.from_args(["--max-pods", "-2"], {})
    with pytest.raises(errors.UsageError, match="--max-pods must be at least 1"):
        # Checked before anything is started or written.
        control.launch_supervisor(control.UpOptions(state_dir="/nonexistent/mt-x", max_pods=0), {})


def _worker(phase: str) -> podworker.PodWorker:
    host = types.SimpleNamespace(node_state_dir="/nonexistent", netns_prefix="mt1")
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {"containers": [{"name": "c", "command": ["true"]}]},
        "status": {"phase": phase},
    }
    return podworker.PodWorker(cast(podworker.PodHost, host), pod)


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        pytest.param("Pending", True, id="pending"),
        pytest.param("Running", True, id="running"),
        pytest.param("Succeeded", False, id="succeeded"),
        pytest.param("Failed", False, id="failed"),
    ],
)
def test_worker_holds_a_slot_while_active(phase: str, expected: bool) -> None:
    assert _worker(phase).is_active is expected


def test_worker_frees_its_slot_when_its_pod_is_deleted() -> None:
    worker = _worker("Running")
    worker.update(None)
    assert not worker.is_active
