from __future__ import annotations

import datetime
from typing import Any

import pytest

from meshcore.kube import resources
from meshctl import tables

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
CREATED = "2026-01-01T11:58:30Z"  # 90 s before NOW


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(119, "119s", id="under-2m"),
        pytest.param(150, "2m30s", id="minutes-seconds"),
        pytest.param(600, "10m", id="ten-minutes"),
        pytest.param(3 * 3600 + 1200, "3h20m", id="hours-minutes"),
        pytest.param(30 * 3600, "30h", id="hours"),
        pytest.param(53 * 3600, "2d5h", id="days-hours"),
        pytest.param(40 * 86400, "40d", id="days"),
        pytest.param(-5, "<invalid>", id="future"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert tables.human_duration(seconds) == text


def test_render_table_aligns_columns_without_trailing_spaces() -> None:
    out = tables.render_table(["NAME", "IP"], [["a", "10.0.0.1"], ["longer-name", ""]])
    assert out == "NAME          IP\na             10.0.0.1\nlonger-name\n"


def pod(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "creationTimestamp": CREATED,
            "annotations": status.pop("annotations", {}),
        },
        "spec": {
            "nodeName": "node1",
            "serviceAccountName": status.pop("sa", "web"),
            "containers": [{"name": "app"}],
        },
        "status": status,
    }


def test_pod_rows() -> None:
    ready = pod(
        "web",
        phase="Running",
        podIP="10.244.0.5",
        containerStatuses=[{"name": "app", "ready": True, "restartCount": 2, "state": {}}],
    )
    failing = pod(
        "blocked",
        phase="Pending",
        reason="FailedCreatePodSandBox",
        message="node agent refused ADD",
    )
    headers, rows = tables.build_rows(resources.PODS, [ready, failing], now=NOW, wide=True)
    assert headers == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "MESSAGE"]
    assert rows == [
        ["web", "1/1", "Running", "2", "90s", "10.244.0.5", "node1", ""],
        [
            "blocked",
            "0/1",
            "FailedCreatePodSandBox",
            "0",
            "90s",
            "<none>",
            "node1",
            "node agent refused ADD",
        ],
    ]


@pytest.mark.parametrize(
    ("status", "text"),
    [
        pytest.param({"phase": "Running"}, "Running", id="phase"),
        pytest.param(
            {
                "phase": "Running",
                "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
            },
            "CrashLoopBackOff",
            id="waiting-reason",
        ),
        pytest.param(
            {
                "phase": "Succeeded",
                "containerStatuses": [{"state": {"terminated": {"reason": "Completed"}}}],
            },
            "Completed",
            id="terminated-reason",
        ),
    ],
)
def test_pod_status_text(status: dict[str, Any], text: str) -> None:
    assert tables.pod_status_text(pod("p", **status)) == text


def test_terminating_pod_status() -> None:
    p = pod("p", phase="Running")
    p["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:30Z"
    assert tables.pod_status_text(p) == "Terminating"


def test_workload_rows_show_protocol_and_identity() -> None:
    captured = pod(
        "web",
        podIP="10.244.0.5",
        annotations={"ambient.istio.io/redirection": "enabled"},
        sa="product-catalog",
    )
    plain = pod("client", podIP="10.244.0.6", sa="client")
    headers, rows = tables.build_rows(None, [captured, plain], now=NOW)
    assert headers == ["NAMESPACE", "NAME", "NODE", "IP", "PROTOCOL", "IDENTITY"]
    assert rows == [
        [
            "shop",
            "web",
            "node1",
            "10.244.0.5",
            "HBONE",
            "spiffe://cluster.local/ns/shop/sa/product-catalog",
        ],
        [
            "shop",
            "client",
            "node1",
            "10.244.0.6",
            "TCP",
            "spiffe://cluster.local/ns/shop/sa/client",
        ],
    ]


def test_service_rows_all_namespaces() -> None:
    svc = {
        "metadata": {"name": "web", "namespace": "shop", "creationTimestamp": CREATED},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"port": 80}]},
    }
    headers, rows = tables.build_rows(
        resources.SERVICES, [svc], now=NOW, wide=True, all_namespaces=True
    )
    assert headers[:2] == ["NAMESPACE", "NAME"]
    assert rows == [
        ["shop", "web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP", "90s", "app=web"]
    ]


def test_node_rows() -> None:
    node = {
        "metadata": {"name": "node1", "creationTimestamp": CREATED},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": "172.30.0.10"}],
            "nodeInfo": {"kubeletVersion": "v1.31.0-playground"},
        },
    }
    headers, rows = tables.build_rows(
        resources.NODES, [node], now=NOW, wide=True, ztunnel_states={"node1": "Running"}
    )
    assert headers == ["NAME", "STATUS", "ADDRESS", "POD-CIDR", "ZTUNNEL", "AGE", "VERSION"]
    assert rows == [
        ["node1", "Ready", "172.30.0.10", "10.244.0.0/24", "Running", "90s", "v1.31.0-playground"]
    ]


def test_service_entry_rows_are_istios_columns() -> None:
    entry = {
        "metadata": {"name": "api", "namespace": "shop", "creationTimestamp": CREATED},
        "spec": {"hosts": ["api.example.com", "*.example.org"], "resolution": "DNS"},
    }
    headers, rows = tables.build_rows(
        resources.SERVICE_ENTRIES, [entry], now=NOW, all_namespaces=True
    )
    assert headers == ["NAMESPACE", "NAME", "HOSTS", "LOCATION", "RESOLUTION", "AGE"]
    # An unset location is blank, as kubectl prints a CRD's missing column.
    assert rows == [["shop", "api", '["api.example.com","*.example.org"]', "", "DNS", "90s"]]
