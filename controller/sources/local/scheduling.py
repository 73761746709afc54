"""Choosing a node for a pod that names none (what kube-scheduler does, minus everything).

`Scheduler` is the seam; `LeastPodsScheduler` runs kube-scheduler's filters that mean something
here, in kube-scheduler's default plugin order, and picks among the nodes that pass the one
running the fewest active pods (ties by name, so the choice is deterministic):

1. NodeUnschedulable: `spec.unschedulable` is not set;
2. TaintToleration: the node is Ready (kube-scheduler sees a NotReady node through the
   `node.kubernetes.io/not-ready` or `/unreachable` taint, and names it so);
3. NodeAffinity: the node's labels match the pod's `nodeSelector`;
4. NodeResourcesFit: fewer active pods are bound to it than `status.allocatable.pods`.

A node being deleted is no candidate and is not counted, as it is gone from kube-scheduler's
cache. When no node passes, the `Placement` carries kube-scheduler's message
(``0/3 nodes are available: 1 node(s) were unschedulable, 2 Too many pods.``): per reason the
number of nodes it ruled out, "<count> <reason>" strings sorted as kube-scheduler sorts them
(byte order of the whole string). There is no preemption, so no ``preemption:`` part.

Invariant: a pod occupies its node from binding until it reaches a terminal phase or is removed
(a terminating pod still runs, so it still counts); `is_occupying` is that rule, and the store
retries pending pods whenever something stops occupying a node.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from meshcore import digits
from meshcore.kube import objects

POD_SCHEDULED = "PodScheduled"
REASON_UNSCHEDULABLE = "Unschedulable"
NO_NODES_MESSAGE = "no nodes available to schedule pods"

# kube-scheduler's filter reasons, word for word (its plugins' ErrReason strings).
UNSCHEDULABLE_NODE = "node(s) were unschedulable"
NOT_READY_TAINT = "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
UNREACHABLE_TAINT = "node(s) had untolerated taint {node.kubernetes.io/unreachable: }"
SELECTOR_MISMATCH = "node(s) didn't match Pod's node affinity/selector"
TOO_MANY_PODS = "Too many pods"

_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """The decision for one pod: the node to bind it to, or (node None) why none fits."""

    node: str | None
    message: str = ""

    @property
    def is_bound(self) -> bool:
        return self.node is not None


class Scheduler(Protocol):
    def build_placement(
        self,
        pod: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> Placement:
        """Where `pod` goes among `nodes`, given every pod in the store (`pods`)."""
        ...


# -- facts about nodes and pods --------------------------------------------------------------


def _ready_status(node: Mapping[str, Any]) -> str:
    """The Ready condition's status ("True", "False", "Unknown"), "" when there is none."""
    status = node.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    if not isinstance(conditions, list):
        return ""
    for c in conditions:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            value = c.get("status")
            return value if isinstance(value, str) else ""
    return ""


def is_node_ready(node: Mapping[str, Any]) -> bool:
    return _ready_status(node) == "True"


def _is_cordoned(node: Mapping[str, Any]) -> bool:
    spec = node.get("spec")
    return isinstance(spec, Mapping) and spec.get("unschedulable") is True


def is_node_schedulable(node: Mapping[str, Any]) -> bool:
    return is_node_ready(node) and not _is_cordoned(node) and not objects.is_terminating(node)


def find_allocatable_pods(node: Mapping[str, Any]) -> int | None:
    """`status.allocatable.pods` as a count; None when the node states no usable limit.

    The Kubernetes API server only accepts quantities, so a node always has one there; ours
    are written by hand in tests too, and a missing or unreadable value means "no limit"
    rather than "no room" (which would leave every pod pending for a typo).
    """
    status = node.get("status")
    allocatable = status.get("allocatable") if isinstance(status, Mapping) else None
    value = allocatable.get("pods") if isinstance(allocatable, Mapping) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str) and digits.is_digits(value.strip()):
        return int(value.strip())
    return None


def is_pod_active(pod: Mapping[str, Any]) -> bool:
    """Still occupying its node: not in a terminal phase."""
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return phase not in _TERMINAL_PHASES


def find_pod_node(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    return node if isinstance(node, str) else ""


def is_occupying(pod: Mapping[str, Any]) -> bool:
    """Bound to a node and counted against its capacity."""
    return bool(find_pod_node(pod)) and is_pod_active(pod)


def count_active_pods(pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Occupying pods per node name."""
    load: collections.Counter[str] = collections.Counter()
    for pod in pods:
        if is_occupying(pod):
            load[find_pod_node(pod)] += 1
    return dict(load)


def _node_selector(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = pod.get("spec")
    selector = spec.get("nodeSelector") if isinstance(spec, Mapping) else None
    return selector if isinstance(selector, Mapping) else {}


# -- the decision ----------------------------------------------------------------------------


def find_node_misfit(pod: Mapping[str, Any], node: Mapping[str, Any], used: int) -> str | None:
    """The reason of the first filter `node` fails for `pod` (`used` pods already occupy it),
    None when the pod fits. Filters run in kube-scheduler's order, and like it we report only
    the first failure per node."""
    if _is_cordoned(node):
        return UNSCHEDULABLE_NODE
    ready = _ready_status(node)
    if ready == "Unknown":
        return UNREACHABLE_TAINT
    if ready != "True":
        return NOT_READY_TAINT
    labels = objects.labels(node)
    if any(labels.get(k) != v for k, v in _node_selector(pod).items()):
        return SELECTOR_MISMATCH
    capacity = find_allocatable_pods(node)
    if capacity is not None and used + 1 > capacity:
        return TOO_MANY_PODS
    return None


def build_unschedulable_message(total: int, misfits: Mapping[str, int]) -> str:
    """kube-scheduler's FitError text for `total` nodes ruled out by `misfits` (reason: count)."""
    if total == 0:
        return NO_NODES_MESSAGE
    histogram = sorted(f"{count} {reason}" for reason, count in misfits.items())
    return f"0/{total} nodes are available: {', '.join(histogram)}."


class LeastPodsScheduler:
    def build_placement(
        self,
        pod: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> Placement:
        load = count_active_pods(pods)
        live = [n for n in nodes if not objects.is_terminating(n)]
        fitting: list[tuple[int, str]] = []
        misfits: collections.Counter[str] = collections.Counter()
        for node in live:
            name = objects.name(node)
            used = load.get(name, 0)
            misfit = find_node_misfit(pod, node, used)
            if misfit is None:
                fitting.append((used, name))
            else:
                misfits[misfit] += 1
        if fitting:
            return Placement(min(fitting)[1])
        return Placement(None, build_unschedulable_message(len(live), misfits))

    def choose_node(
        self,
        pod: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> str | None:
        """The node name alone (None: pending)."""
        return self.build_placement(pod, nodes, pods).node


# -- the PodScheduled condition --------------------------------------------------------------


def build_scheduled_status(
    status: Mapping[str, Any] | None, placement: Placement, now: str
) -> dict[str, Any]:
    """`status` with the PodScheduled condition `placement` calls for: True once bound (what the
    API server's binding writes), False/Unschedulable with the message while pending.

    The condition keeps its lastTransitionTime while its status stays the same, and the result
    equals `status` when the condition already says this: the caller writes only on a change,
    so re-running the scheduler on every node heartbeat sends watchers nothing.
    """
    out = dict(status) if isinstance(status, Mapping) else {}
    raw = out.get("conditions")
    conditions = [c for c in raw if isinstance(c, Mapping)] if isinstance(raw, list) else []
    old = next((c for c in conditions if c.get("type") == POD_SCHEDULED), None)
    wanted: dict[str, Any] = {"type": POD_SCHEDULED}
    if placement.is_bound:
        wanted["status"] = "True"
    else:
        wanted.update(status="False", reason=REASON_UNSCHEDULABLE, message=placement.message)
    same_status = old is not None and old.get("status") == wanted["status"]
    if same_status and old is not None and old.get("lastTransitionTime"):
        wanted["lastTransitionTime"] = old["lastTransitionTime"]
    else:
        wanted["lastTransitionTime"] = now
    if old is not None and dict(old) == wanted:
        return out
    if old is None:
        out["conditions"] = [*conditions, wanted]
    else:
        out["conditions"] = [wanted if c is old else c for c in conditions]
    return out
