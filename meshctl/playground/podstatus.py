"""A pod's status subresource as the playground kubelet reports it: pure functions of what the
worker observed (sandbox, containers, readiness), so they are tested without processes; and the
kubelet's admission check, which fails a pod its node has no room for before anything starts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# kubelet's default --max-pods: what a node admits, and what its Node reports as capacity.
DEFAULT_MAX_PODS = 110
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def is_terminal_phase(phase: str) -> bool:
    """The pod is done for good: it no longer occupies its node and is never started again."""
    return phase in TERMINAL_PHASES


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """Why the kubelet refuses a pod: the pod's final status.reason and status.message."""

    reason: str
    message: str


def find_rejection(used: int, capacity: int) -> Rejection | None:
    """kubelet's admission check for the pod count: a new pod needs one slot; `used` slots are
    taken by the active pods already admitted on this node. Words as kubelet's
    (``OutOfpods``, ``Node didn't have enough resource: pods, ...``)."""
    if used + 1 <= capacity:
        return None
    return Rejection(
        reason="OutOfpods",
        message=(
            "Pod was rejected: Node didn't have enough resource: pods, requested: 1, "
            f"used: {used}, capacity: {capacity}"
        ),
    )


def build_rejected_status(rejection: Rejection, start_time: str) -> dict[str, Any]:
    """The status a rejected pod ends with: Failed for good, never started (no IP, no
    containers), the reason shown in the STATUS column and the message next to it."""
    return {
        "phase": "Failed",
        "reason": rejection.reason,
        "message": rejection.message,
        "startTime": start_time,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerView:
    """A container's observable state: the input of `build_pod_status`."""

    name: str
    running: bool
    ready: bool
    started_at: str
    restarts: int
    waiting_reason: str = ""
    waiting_message: str = ""
    exit_code: int | None = None
    finished_at: str = ""
    pid: int = 0


def build_pod_status(
    *,
    phase: str,
    pod_ip: str,
    host_ip: str,
    start_time: str,
    sandbox_error: str,
    views: list[ContainerView],
    transitions: Mapping[str, str],
) -> dict[str, Any]:
    """The status subresource for the current state (pure; `transitions` holds each condition's
    lastTransitionTime, computed by the caller)."""
    sandbox_ok = not sandbox_error and bool(pod_ip)
    all_ready = sandbox_ok and bool(views) and all(v.ready for v in views)

    def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        c: dict[str, Any] = {
            "type": kind,
            "status": "True" if ok else "False",
            "lastTransitionTime": transitions.get(kind, ""),
        }
        if not ok and reason:
            c["reason"] = reason
        if not ok and message:
            c["message"] = message
        return c

    not_ready = [v.name for v in views if not v.ready]
    unready_msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else ""
    out: dict[str, Any] = {
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}] if host_ip else [],
        "podIP": pod_ip or None,
        "podIPs": [{"ip": pod_ip}] if pod_ip else [],
        "startTime": start_time,
        "conditions": [
            cond("PodScheduled", True),
            cond(
                "PodReadyToStartContainers",
                sandbox_ok,
                "FailedCreatePodSandBox" if sandbox_error else "",
                sandbox_error,
            ),
            cond("Initialized", True),
            cond("ContainersReady", all_ready, "ContainersNotReady", unready_msg),
            cond("Ready", all_ready, "ContainersNotReady", unready_msg),
        ],
        "containerStatuses": [_container_status(v) for v in views],
        "reason": "FailedCreatePodSandBox" if sandbox_error else None,
        "message": sandbox_error or None,
    }
    return out


def _container_status(v: ContainerView) -> dict[str, Any]:
    state: dict[str, Any]
    if v.running:
        state = {"running": {"startedAt": v.started_at}}
    elif v.waiting_reason or v.exit_code is None:
        waiting: dict[str, Any] = {"reason": v.waiting_reason or "ContainerCreating"}
        if v.waiting_message:
            waiting["message"] = v.waiting_message
        state = {"waiting": waiting}
    else:
        state = {
            "terminated": {
                "exitCode": v.exit_code,
                "reason": "Completed" if v.exit_code == 0 else "Error",
                "finishedAt": v.finished_at,
            }
        }
    status: dict[str, Any] = {
        "name": v.name,
        "ready": v.ready,
        "started": v.running,
        "restartCount": v.restarts,
        "image": "",
        "imageID": "",
        "state": state,
    }
    if v.pid:
        status["containerID"] = f"playground://{v.pid}"
    if v.exit_code is not None and (v.running or v.waiting_reason):
        status["lastState"] = {
            "terminated": {
                "exitCode": v.exit_code,
                "reason": "Completed" if v.exit_code == 0 else "Error",
                "finishedAt": v.finished_at,
            }
        }
    return status


def build_phase(policy: str, views: list[ContainerView], sandbox_ok: bool) -> str:
    if not sandbox_ok or not views:
        return "Pending"
    if any(v.running for v in views):
        return "Running"
    finished = [v for v in views if v.exit_code is not None and not v.waiting_reason]
    if policy != "Always" and len(finished) == len(views):
        return "Succeeded" if all(v.exit_code == 0 for v in finished) else "Failed"
    return "Running" if any(v.restarts or v.exit_code is not None for v in views) else "Pending"
