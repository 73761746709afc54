"""The scheduler's capacity filter, its other filters' reasons and kube-scheduler's message, and
the PodScheduled condition it leaves on a pod (pure functions, no store)."""

from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import scheduling

NOW = "2024-05-01T10:00:00Z"
EARLIER = "2024-05-01T09:00:00Z"


def _node(
    name: str,
    *,
    pods: object = "110",
    ready: str = "True",
    labels: dict[str, str] | None = None,
    cordoned: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": ready}]}
    if pods is not None:
        status["allocatable"] = {"pods": pods}
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = EARLIER
    return {"metadata": meta, "spec": {"unschedulable": cordoned}, "status": status}


def _pod(
    node: str = "",
    phase: str = "Running",
    selector: dict[str, str] | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node} if node else {}
    if selector:
        spec["nodeSelector"] = selector
    meta: dict[str, Any] = {"name": "p"}
    if terminating:
        meta["deletionTimestamp"] = EARLIER
    return {"metadata": meta, "spec": spec, "status": {"phase": phase}}


def _on(node: str, count: int, **kwargs: Any) -> list[dict[str, Any]]:
    return [_pod(node, **kwargs) for _ in range(count)]


ZONE_B = {"zone": "b"}


@pytest.mark.parametrize(
    ("nodes", "pods", "pod", "expected"),
    [
        pytest.param(
            [_node("n1", pods="2"), _node("n2", pods="2")],
            _on("n1", 2),
            _pod(),
            scheduling.Placement("n2"),
            id="full-node-skipped",
        ),
        pytest.param(
            [_node("n1", pods="3"), _node("n2", pods="2")],
            [*_on("n1", 2), *_on("n2", 1)],
            _pod(),
            scheduling.Placement("n2"),
            id="fewest-pods-among-fitting",
        ),
        pytest.param(
            [_node("n1", pods="2")],
            _on("n1", 1),
            _pod(),
            scheduling.Placement("n1"),
            id="last-slot",
        ),
        pytest.param(
            [_node("n1", pods="1")],
            _on("n1", 1),
            _pod(),
            scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods."),
            id="one-full-node",
        ),
        pytest.param(
            [_node("n1", pods=2)],
            _on("n1", 2),
            _pod(),
            scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods."),
            id="capacity-as-int",
        ),
        pytest.param(
            [_node("n1", pods="1")],
            [*_on("n1", 1, phase="Succeeded"), *_on("n1", 1, phase="Failed")],
            _pod(),
            scheduling.Placement("n1"),
            id="finished-pods-free-their-slot",
        ),
        pytest.param(
            [_node("n1", pods="1")],
            _on("n1", 1, terminating=True),
            _pod(),
            scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods."),
            id="terminating-pod-still-occupies",
        ),
        pytest.param(
            [_node("n1", pods="1")],
            [_pod(), _pod()],
            _pod(),
            scheduling.Placement("n1"),
            id="pending-pods-occupy-nothing",
        ),
        pytest.param(
            [_node("n1", pods="0")],
            [],
            _pod(),
            scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods."),
            id="zero-capacity",
        ),
        pytest.param(
            [_node("n1", pods=None)],
            _on("n1", 500),
            _pod(),
            scheduling.Placement("n1"),
            id="no-allocatable-no-limit",
        ),
        pytest.param(
            [_node("n1", pods="lots")],
            _on("n1", 5),
            _pod(),
            scheduling.Placement("n1"),
            id="unreadable-allocatable-no-limit",
        ),
        pytest.param(
            [_node("n1"), _node("n2", labels=ZONE_B)],
            [],
            _pod(selector=ZONE_B),
            scheduling.Placement("n2"),
            id="selector",
        ),
        pytest.param(
            [_node("n1", pods="1"), _node("n2", pods="1"), _node("n3", labels={"zone": "a"})],
            [*_on("n1", 1), *_on("n2", 1)],
            _pod(selector=ZONE_B),
            scheduling.Placement(
                None,
                "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.",
            ),
            id="selector-checked-before-capacity",
        ),
        pytest.param(
            [_node("n1", pods="1"), _node("n2", pods="1"), _node("n3", labels={"zone": "a"})],
            [*_on("n1", 1), *_on("n2", 1)],
            _pod(selector={"zone": "a"}),
            scheduling.Placement("n3"),
            id="selector-finds-the-free-node",
        ),
        pytest.param(
            [_node("n1", pods="1"), _node("n2", pods="1"), _node("n3", labels={"zone": "a"})],
            [*_on("n1", 1), *_on("n2", 1), *_on("n3", 110)],
            _pod(),
            scheduling.Placement(None, "0/3 nodes are available: 3 Too many pods."),
            id="all-full",
        ),
        pytest.param(
            [
                _node("n1", pods="1"),
                _node("n2", pods="1"),
                _node("n3", labels={"zone": "a"}),
                _node("n4", cordoned=True),
                _node("n5", ready="False"),
                _node("n6", ready="Unknown"),
            ],
            [*_on("n1", 1), *_on("n2", 1)],
            _pod(selector=ZONE_B),
            scheduling.Placement(
                None,
                "0/6 nodes are available: 1 node(s) had untolerated taint "
                "{node.kubernetes.io/not-ready: }, 1 node(s) had untolerated taint "
                "{node.kubernetes.io/unreachable: }, 1 node(s) were unschedulable, "
                "3 node(s) didn't match Pod's node affinity/selector.",
            ),
            id="every-reason-counted-and-sorted",
        ),
        pytest.param(
            [_node("n1", cordoned=True, ready="False", labels={"zone": "a"})],
            [],
            _pod(selector=ZONE_B),
            scheduling.Placement(None, "0/1 nodes are available: 1 node(s) were unschedulable."),
            id="first-failing-filter-only",
        ),
        pytest.param(
            [_node("n1", deleting=True), _node("n2", pods="1")],
            _on("n2", 1),
            _pod(),
            scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods."),
            id="deleted-node-not-counted",
        ),
        pytest.param(
            [],
            [],
            _pod(),
            scheduling.Placement(None, "no nodes available to schedule pods"),
            id="no-nodes",
        ),
        pytest.param(
            [_node("n1", deleting=True)],
            [],
            _pod(),
            scheduling.Placement(None, "no nodes available to schedule pods"),
            id="only-a-deleted-node",
        ),
        pytest.param(
            [{"metadata": {"name": "n1"}}],
            [],
            _pod(),
            scheduling.Placement(
                None,
                "0/1 nodes are available: 1 node(s) had untolerated taint "
                "{node.kubernetes.io/not-ready: }.",
            ),
            id="no-ready-condition",
        ),
    ],
)
def test_placement(
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    pod: dict[str, Any],
    expected: scheduling.Placement,
) -> None:
    assert scheduling.LeastPodsScheduler().build_placement(pod, nodes, pods) == expected


@pytest.mark.parametrize(
    ("total", "misfits", "expected"),
    [
        pytest.param(0, {}, "no nodes available to schedule pods", id="no-nodes"),
        pytest.param(
            2, {"Too many pods": 2}, "0/2 nodes are available: 2 Too many pods.", id="one-reason"
        ),
        pytest.param(
            3,
            {"Too many pods": 2, scheduling.SELECTOR_MISMATCH: 1},
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
            "2 Too many pods.",
            id="sorted-by-count-then-reason",
        ),
        pytest.param(
            12,
            {"Too many pods": 10, scheduling.SELECTOR_MISMATCH: 2},
            # kube-scheduler sorts the "<count> <reason>" strings as text: "10" < "2".
            "0/12 nodes are available: 10 Too many pods, "
            "2 node(s) didn't match Pod's node affinity/selector.",
            id="sorted-as-text",
        ),
        pytest.param(
            4,
            {"Too many pods": 2, scheduling.UNSCHEDULABLE_NODE: 2},
            "0/4 nodes are available: 2 Too many pods, 2 node(s) were unschedulable.",
            id="same-count-upper-case-first",
        ),
    ],
)
def test_unschedulable_message(total: int, misfits: dict[str, int], expected: str) -> None:
    assert scheduling.build_unschedulable_message(total, misfits) == expected


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        pytest.param({"status": {"allocatable": {"pods": "7"}}}, 7, id="string"),
        pytest.param({"status": {"allocatable": {"pods": " 7 "}}}, 7, id="spaces"),
        pytest.param({"status": {"allocatable": {"pods": 3}}}, 3, id="int"),
        pytest.param({"status": {"allocatable": {"pods": -3}}}, 0, id="negative-int"),
        pytest.param({"status": {"allocatable": {"pods": True}}}, None, id="bool"),
        pytest.param({"status": {"allocatable": {"pods": "1k"}}}, None, id="suffix"),
        pytest.param({"status": {"allocatable": {}}}, None, id="missing"),
        pytest.param({"status": {"allocatable": "110"}}, None, id="not-a-map"),
        pytest.param({}, None, id="no-status"),
    ],
)
def test_allocatable_pods(node: dict[str, Any], expected: int | None) -> None:
    assert scheduling.find_allocatable_pods(node) == expected


def test_choose_node_is_the_placements_node() -> None:
    scheduler = scheduling.LeastPodsScheduler()
    nodes = [_node("n1", pods="1")]
    assert scheduler.choose_node(_pod(), nodes, []) == "n1"
    assert scheduler.choose_node(_pod(), nodes, _on("n1", 1)) is None


# -- the PodScheduled condition --------------------------------------------------------------

WAITING = scheduling.Placement(None, "0/1 nodes are available: 1 Too many pods.")
BOUND = scheduling.Placement("n1")


def _false(message: str, since: str = EARLIER) -> dict[str, Any]:
    return {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
        "lastTransitionTime": since,
    }


def _true(since: str) -> dict[str, Any]:
    return {"type": "PodScheduled", "status": "True", "lastTransitionTime": since}


READY = {"type": "Ready", "status": "False"}


@pytest.mark.parametrize(
    ("status", "placement", "expected"),
    [
        pytest.param(
            {"phase": "Pending"},
            WAITING,
            {"phase": "Pending", "conditions": [_false(WAITING.message, NOW)]},
            id="first-unschedulable",
        ),
        pytest.param(
            None,
            WAITING,
            {"conditions": [_false(WAITING.message, NOW)]},
            id="no-status-yet",
        ),
        pytest.param(
            {"phase": "Pending", "conditions": [_false(WAITING.message)]},
            WAITING,
            {"phase": "Pending", "conditions": [_false(WAITING.message)]},
            id="unchanged",
        ),
        pytest.param(
            {"phase": "Pending", "conditions": [READY, _false("0/2 nodes are available: x.")]},
            WAITING,
            {"phase": "Pending", "conditions": [READY, _false(WAITING.message)]},
            id="new-message-keeps-transition-time",
        ),
        pytest.param(
            {"phase": "Pending", "conditions": [_false(WAITING.message)]},
            BOUND,
            {"phase": "Pending", "conditions": [_true(NOW)]},
            id="bound-after-waiting",
        ),
        pytest.param(
            {"phase": "Pending"},
            BOUND,
            {"phase": "Pending", "conditions": [_true(NOW)]},
            id="bound-at-once",
        ),
        pytest.param(
            {"conditions": [_true(EARLIER)]},
            BOUND,
            {"conditions": [_true(EARLIER)]},
            id="bound-unchanged",
        ),
    ],
)
def test_scheduled_status(
    status: dict[str, Any] | None, placement: scheduling.Placement, expected: dict[str, Any]
) -> None:
    assert scheduling.build_scheduled_status(status, placement, NOW) == expected


def test_scheduled_status_leaves_its_input_alone() -> None:
    status = {"phase": "Pending", "conditions": [_false("old")]}
    scheduling.build_scheduled_status(status, WAITING, NOW)
    assert status == {"phase": "Pending", "conditions": [_false("old")]}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(_pod("n1"), _pod("n1", phase="Succeeded"), True, id="finished"),
        pytest.param(_pod("n1"), _pod("n1", phase="Failed"), True, id="failed"),
        pytest.param(_pod("n1"), _pod("n1", terminating=True), False, id="terminating"),
        pytest.param(_pod("n1", phase="Pending"), _pod("n1"), False, id="started"),
        pytest.param(_pod(), _pod(), False, id="pending"),
    ],
)
def test_occupying(old: dict[str, Any], new: dict[str, Any], expected: bool) -> None:
    freed = scheduling.is_occupying(old) and not scheduling.is_occupying(new)
    assert freed is expected
