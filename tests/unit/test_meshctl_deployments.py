"""meshctl's pure parts for Deployments and nodes: references, tables, readiness, and the
ZTUNNEL column's process states; plus `scale`'s usage errors (no playground needed)."""

from __future__ import annotations

import datetime
import io
from typing import Any

import pytest

from meshcore.kube import resources
from meshctl import cli, errors, kinds, podfields, tables
from meshctl.playground import record

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
CREATED = "2026-01-01T11:58:30Z"  # 90 s before NOW


def _deployment(
    name: str = "web", replicas: int = 2, generation: int = 2, status: dict[str, int] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "creationTimestamp": CREATED,
            "generation": generation,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name, "tier": "x"}},
            "template": {
                "metadata": {"labels": {"app": name, "tier": "x"}},
                "spec": {
                    "containers": [
                        {"name": "app", "command": ["mesh-demo-app", "serve"]},
                        {"name": "side", "image": "busybox:1", "command": ["sleep"]},
                    ]
                },
            },
        },
        "status": status or {},
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["deployment/web"], ("deployment", "web"), id="slash"),
        pytest.param(["deploy/web"], ("deploy", "web"), id="short-slash"),
        pytest.param(["deployment", "web"], ("deployment", "web"), id="two-words"),
    ],
)
def test_split_ref(args: list[str], expected: tuple[str, str]) -> None:
    assert kinds.split_ref(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["web"], id="no-kind"),
        pytest.param(["deployment/"], id="no-name"),
        pytest.param(["/web"], id="empty-kind"),
        pytest.param(["deployment/a/b"], id="two-slashes"),
        pytest.param(["deployment/a", "b"], id="slash-and-word"),
        pytest.param(["a", "b", "c"], id="three-words"),
    ],
)
def test_split_ref_rejects(args: list[str]) -> None:
    with pytest.raises(errors.UsageError, match="expected KIND/NAME or KIND NAME"):
        kinds.split_ref(args)


@pytest.mark.parametrize("alias", ["deployments", "deployment", "deploy", "Deploy"])
def test_deployment_aliases(alias: str) -> None:
    assert kinds.find_resource(alias) == kinds.DEPLOYMENTS
    assert kinds.find_scalable(alias) == kinds.DEPLOYMENTS


def test_only_deployments_scale() -> None:
    with pytest.raises(errors.UsageError, match="cannot scale pods: only deployments"):
        kinds.find_scalable("po")
    with pytest.raises(kinds.UnknownResourceError, match='resource type "statefulset"'):
        kinds.find_scalable("statefulset")


def test_deployment_rows() -> None:
    rolling = _deployment(status={"readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1})
    fresh = _deployment("api", replicas=1)
    fresh["status"] = {}
    headers, rows = tables.build_rows(kinds.DEPLOYMENTS, [rolling, fresh], now=NOW, wide=True)
    assert headers == [
        "NAME",
        "READY",
        "UP-TO-DATE",
        "AVAILABLE",
        "AGE",
        "CONTAINERS",
        "IMAGES",
        "SELECTOR",
    ]
    assert rows == [
        ["web", "1/2", "1", "1", "90s", "app,side", "mesh-demo-app,busybox:1", "app=web,tier=x"],
        ["api", "0/1", "0", "0", "90s", "app,side", "mesh-demo-app,busybox:1", "app=api,tier=x"],
    ]
    headers, rows = tables.build_rows(kinds.DEPLOYMENTS, [rolling], now=NOW, all_namespaces=True)
    assert headers == ["NAMESPACE", "NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert rows == [["shop", "web", "1/2", "1", "1", "90s"]]


def _node(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": CREATED},
        "spec": extra.pop("spec", {}),
        "status": extra.pop("status", {}),
    }


def test_node_rows_show_address_cidr_and_ztunnel() -> None:
    ready = _node(
        "node1",
        spec={"podCIDR": "10.244.0.0/24"},
        status={
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [
                {"type": "Hostname", "address": "node1"},
                {"type": "InternalIP", "address": "172.30.0.10"},
            ],
        },
    )
    stopped = _node("node2", spec={"podCIDR": "10.244.1.0/24"})
    unknown = _node("node3")
    states = {"node1": tables.PROCESS_RUNNING, "node2": tables.PROCESS_EXITED}
    headers, rows = tables.build_rows(
        resources.NODES, [ready, stopped, unknown], now=NOW, ztunnel_states=states
    )
    assert headers == ["NAME", "STATUS", "ADDRESS", "POD-CIDR", "ZTUNNEL", "AGE"]
    assert rows == [
        ["node1", "Ready", "172.30.0.10", "10.244.0.0/24", "Running", "90s"],
        ["node2", "NotReady", "<none>", "10.244.1.0/24", "Exited", "90s"],
        ["node3", "NotReady", "<none>", "<none>", "-", "90s"],
    ]
    _, rows = tables.build_rows(resources.NODES, [ready], now=NOW)
    assert rows[0][4] == "-"


def _proc(name: str, node: str | None, pid: int) -> record.ProcessRecord:
    return record.ProcessRecord(name=name, pid=pid, start_time=1, log="x.log", node=node)


def test_ztunnel_states_from_the_record() -> None:
    procs = [
        _proc("controller", None, 10),
        _proc("ztunnel", "node1", 11),
        _proc("ztunnel", "node2", 12),
        _proc("kubelet", "node1", 13),
    ]
    states = cli.build_ztunnel_states(procs, lambda p: p.pid == 11)
    assert states == {"node1": "Running", "node2": "Exited"}


@pytest.mark.parametrize(
    ("deployment", "ready"),
    [
        pytest.param(
            _deployment(
                status={
                    "observedGeneration": 2,
                    "replicas": 2,
                    "updatedReplicas": 2,
                    "readyReplicas": 2,
                }
            ),
            True,
            id="ready",
        ),
        pytest.param(
            _deployment(
                status={
                    "observedGeneration": 1,
                    "replicas": 2,
                    "updatedReplicas": 2,
                    "readyReplicas": 2,
                }
            ),
            False,
            id="spec-not-observed",
        ),
        pytest.param(
            _deployment(
                status={
                    "observedGeneration": 2,
                    "replicas": 3,
                    "updatedReplicas": 2,
                    "readyReplicas": 3,
                }
            ),
            False,
            id="old-pod-left",
        ),
        pytest.param(
            _deployment(
                status={
                    "observedGeneration": 2,
                    "replicas": 2,
                    "updatedReplicas": 2,
                    "readyReplicas": 1,
                }
            ),
            False,
            id="not-all-ready",
        ),
        pytest.param(
            _deployment(replicas=0, status={"observedGeneration": 2}), True, id="zero-replicas"
        ),
        pytest.param(_deployment(), False, id="no-status"),
    ],
)
def test_is_deployment_ready(deployment: dict[str, Any], ready: bool) -> None:
    assert podfields.is_deployment_ready(deployment) is ready


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(argv), {}, out, err, io.StringIO())
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["scale", "deploy/web", "--replicas", "-1"],
            "error: --replicas must be greater than or equal to 0, got -1\n",
            id="negative",
        ),
        pytest.param(
            ["scale", "pod/web", "--replicas", "1"],
            "error: cannot scale pods: only deployments (deploy) have replicas\n",
            id="not-scalable",
        ),
        pytest.param(
            ["scale", "web", "--replicas", "1"],
            "error: expected KIND/NAME or KIND NAME, got 'web'\n",
            id="no-kind",
        ),
    ],
)
def test_scale_usage_errors_need_no_playground(
    tmp_path: object, argv: list[str], message: str
) -> None:
    code, out, err = _run("--state-dir", str(tmp_path), *argv)
    assert (code, out, err) == (2, "", message)


def test_scale_unknown_kind_and_missing_replicas(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run("--state-dir", str(tmp_path), "scale", "foo/web", "--replicas", "1")
    assert code == 2
    assert err.startswith('error: the server doesn\'t have a resource type "foo"')
    code, _, _ = _run("--state-dir", str(tmp_path), "scale", "deploy/web")
    assert code == 2
    # argparse reports its own errors on the process's stderr.
    assert "the following arguments are required: --replicas" in capsys.readouterr().err
    code, _, err = _run("--state-dir", str(tmp_path), "scale", "deploy/web", "--replicas", "1")
    assert code == 1
    assert err.startswith("error: no playground is running")
