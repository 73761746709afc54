from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import scheduling


def _node(name: str, ready: bool = True, **extra: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "metadata": {"name": name, "labels": extra.pop("labels", {})},
        "spec": extra.pop("spec", {}),
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }
    node["metadata"].update(extra)
    return node


def _pod(
    node: str = "", phase: str = "Running", selector: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node} if node else {}
    if selector:
        spec["nodeSelector"] = selector
    return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("nodes", "pods", "pod", "expected"),
    [
        ([], [], _pod(), None),
        ([_node("n1"), _node("n2")], [], _pod(), "n1"),
        ([_node("n1"), _node("n2")], [_pod("n1")], _pod(), "n2"),
        ([_node("n1"), _node("n2")], [_pod("n1", "Succeeded"), _pod("n2")], _pod(), "n1"),
        ([_node("n1", ready=False), _node("n2")], [_pod("n2"), _pod("n2")], _pod(), "n2"),
        ([_node("n1", ready=False)], [], _pod(), None),
        ([_node("n1", spec={"unschedulable": True}), _node("n2")], [_pod("n2")], _pod(), "n2"),
        (
            [_node("n1", deletionTimestamp="2024-01-01T00:00:00Z"), _node("n2")],
            [_pod("n2")],
            _pod(),
            "n2",
        ),
        (
            [_node("n1"), _node("n2", labels={"zone": "b"})],
            [_pod("n2")],
            _pod(selector={"zone": "b"}),
            "n2",
        ),
        ([_node("n1")], [], _pod(selector={"zone": "b"}), None),
        ([{"metadata": {"name": "n1"}}], [], _pod(), None),
    ],
    ids=[
        "no-nodes",
        "tie-by-name",
        "fewest-pods",
        "terminal-pods-free",
        "not-ready-skipped",
        "none-ready",
        "unschedulable",
        "terminating-node",
        "node-selector",
        "selector-unmatched",
        "no-conditions",
    ],
)
def test_least_pods_scheduler(
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    pod: dict[str, Any],
    expected: str | None,
) -> None:
    assert scheduling.LeastPodsScheduler().choose_node(pod, nodes, pods) == expected
