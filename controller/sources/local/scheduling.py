"""Choosing a node for a pod that names none (what kube-scheduler does, minus everything).

`Scheduler` is the seam; `LeastPodsScheduler` picks, among Ready and schedulable nodes whose
labels match the pod's `nodeSelector`, the one running the fewest pods (ties by name, so the
choice is deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from meshcore.kube import objects


class Scheduler(Protocol):
    def choose_node(
        self,
        pod: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> str | None:
        """The node name for `pod`, or None to leave it pending until the nodes change."""
        ...


_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def is_node_ready(node: Mapping[str, Any]) -> bool:
    status = node.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    if not isinstance(conditions, list):
        return False
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )


def is_node_schedulable(node: Mapping[str, Any]) -> bool:
    spec = node.get("spec")
    unschedulable = isinstance(spec, Mapping) and spec.get("unschedulable") is True
    return is_node_ready(node) and not unschedulable and not objects.is_terminating(node)


def is_pod_active(pod: Mapping[str, Any]) -> bool:
    """Still occupying its node: not in a terminal phase."""
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return phase not in _TERMINAL_PHASES


def find_pod_node(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    return node if isinstance(node, str) else ""


def _node_selector(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = pod.get("spec")
    selector = spec.get("nodeSelector") if isinstance(spec, Mapping) else None
    return selector if isinstance(selector, Mapping) else {}


class LeastPodsScheduler:
    def choose_node(
        self,
        pod: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> str | None:
        wanted = _node_selector(pod)
        load: dict[str, int] = {}
        for other in pods:
            bound = find_pod_node(other)
            if bound and is_pod_active(other):
                load[bound] = load.get(bound, 0) + 1
        candidates = []
        for node in nodes:
            labels = objects.labels(node)
            if not is_node_schedulable(node):
                continue
            if any(labels.get(k) != v for k, v in wanted.items()):
                continue
            name = objects.name(node)
            candidates.append((load.get(name, 0), name))
        return min(candidates)[1] if candidates else None
