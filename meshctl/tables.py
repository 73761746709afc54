"""kubectl-like output: column tables, ages, and one row builder per kind. Pure functions of
API objects, the current time and (for nodes) the playground's process states."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from meshcore.identity import spiffe
from meshcore.kube import objects, resources
from meshctl import kinds, podfields

HBONE = "HBONE"
TCP = "TCP"
# The ZTUNNEL column of `get nodes`: the node's ztunnel process, from the playground record.
PROCESS_RUNNING = "Running"
PROCESS_EXITED = "Exited"
PROCESS_UNKNOWN = "-"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned, three spaces apart, no trailing spaces (kubectl's layout)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def human_duration(seconds: float) -> str:
    """kubectl's HumanDuration: 45s, 2m30s, 15m, 3h20m, 2d5h, 40d, 2y10d."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def parse_time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(obj: Mapping[str, Any], now: datetime.datetime) -> str:
    created = parse_time(objects.metadata(obj).get("creationTimestamp"))
    if created is None:
        return "<unknown>"
    return human_duration((now - created).total_seconds())


# -- per kind ---------------------------------------------------------------------------------


def pod_status_text(pod: Mapping[str, Any]) -> str:
    """The STATUS column: Terminating, the pod's own reason (e.g. FailedCreatePodSandBox),
    a container's waiting or terminated reason, or the phase."""
    if objects.is_terminating(pod):
        return "Terminating"
    reason = podfields.status(pod).get("reason")
    if isinstance(reason, str) and reason:
        return reason
    text = podfields.phase(pod)
    for cs in podfields.container_statuses(pod):
        state = cs.get("state") or {}
        waiting = state.get("waiting") if isinstance(state, Mapping) else None
        terminated = state.get("terminated") if isinstance(state, Mapping) else None
        if isinstance(waiting, Mapping) and waiting.get("reason"):
            text = str(waiting["reason"])
        elif isinstance(terminated, Mapping) and terminated.get("reason"):
            text = str(terminated["reason"])
    return text


def pod_ready_text(pod: Mapping[str, Any]) -> str:
    total = len(podfields.containers(pod))
    ready = sum(1 for cs in podfields.container_statuses(pod) if cs.get("ready") is True)
    return f"{ready}/{total}"


def pod_restarts(pod: Mapping[str, Any]) -> int:
    total = 0
    for cs in podfields.container_statuses(pod):
        count = cs.get("restartCount")
        if isinstance(count, int):
            total += count
    return total


def pod_message(pod: Mapping[str, Any]) -> str:
    """The pod's own message, else why the scheduler could not place it."""
    message = podfields.status(pod).get("message")
    if isinstance(message, str) and message:
        return message
    cond = podfields.find_condition(pod, "PodScheduled")
    if cond is not None and cond.get("status") == "False" and isinstance(cond.get("message"), str):
        return str(cond["message"])
    return ""


def workload_protocol(pod: Mapping[str, Any]) -> str:
    return HBONE if podfields.is_captured(pod) else TCP


def workload_identity(pod: Mapping[str, Any], trust_domain: str = "cluster.local") -> str:
    try:
        return str(
            spiffe.SpiffeId(trust_domain, objects.namespace(pod), podfields.service_account(pod))
        )
    except spiffe.InvalidSpiffeIdError:
        return "<invalid>"


def build_rows(
    rtype: resources.ResourceType | None,
    items: Sequence[Mapping[str, Any]],
    *,
    now: datetime.datetime,
    wide: bool = False,
    all_namespaces: bool = False,
    ztunnel_states: Mapping[str, str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for a list of one kind (rtype None: the workloads view).

    `ztunnel_states` maps a node name to the state of its ztunnel process (`PROCESS_RUNNING`,
    `PROCESS_EXITED`); a node it does not name shows `PROCESS_UNKNOWN`.
    """
    if rtype is None:
        headers = ["NAMESPACE", "NAME", "NODE", "IP", "PROTOCOL", "IDENTITY"]
        rows = [
            [
                objects.namespace(p),
                objects.name(p),
                podfields.node_name(p) or "<none>",
                podfields.pod_ip(p) or "<none>",
                workload_protocol(p),
                workload_identity(p),
            ]
            for p in items
        ]
        return headers, rows
    if rtype == resources.PODS:
        headers = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        if wide:
            headers += ["IP", "NODE"]
        show_message = any(pod_message(p) for p in items)
        if show_message:
            headers.append("MESSAGE")
        rows = []
        for p in items:
            row = [
                objects.name(p),
                pod_ready_text(p),
                pod_status_text(p),
                str(pod_restarts(p)),
                age(p, now),
            ]
            if wide:
                row += [podfields.pod_ip(p) or "<none>", podfields.node_name(p) or "<none>"]
            if show_message:
                row.append(pod_message(p))
            rows.append(row)
    elif rtype == resources.SERVICES:
        headers = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
        if wide:
            headers.append("SELECTOR")
        rows = []
        for s in items:
            ports = ",".join(
                f"{p.get('port')}/{p.get('protocol') or 'TCP'}" for p in podfields.service_ports(s)
            )
            row = [
                objects.name(s),
                str(podfields.spec(s).get("type") or "ClusterIP"),
                str(podfields.spec(s).get("clusterIP") or "<none>"),
                "<none>",
                ports or "<none>",
                age(s, now),
            ]
            if wide:
                sel = podfields.selector(s)
                row.append(",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>")
            rows.append(row)
    elif rtype == resources.NODES:
        headers, rows = build_node_rows(items, now, wide=wide, ztunnel_states=ztunnel_states or {})
    elif rtype == kinds.DEPLOYMENTS:
        headers, rows = build_deployment_rows(items, now, wide=wide)
    elif rtype == kinds.AUTHORIZATION_POLICIES:
        headers = ["NAME", "ACTION", "AGE"]
        rows = [[objects.name(p), podfields.policy_action(p), age(p, now)] for p in items]
    elif rtype == kinds.PEER_AUTHENTICATIONS:
        headers = ["NAME", "MODE", "AGE"]
        rows = [[objects.name(p), podfields.mtls_mode(p), age(p, now)] for p in items]
    elif rtype == kinds.SERVICE_ENTRIES:
        headers, rows = build_service_entry_rows(items, now)
    elif rtype == resources.NAMESPACES:
        headers = ["NAME", "STATUS", "AGE"]
        if wide:
            headers.append("LABELS")
        rows = []
        for ns in items:
            row = [
                objects.name(ns),
                str(podfields.status(ns).get("phase") or "Active"),
                age(ns, now),
            ]
            if wide:
                labels = objects.labels(ns)
                row.append(",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>")
            rows.append(row)
    else:
        headers = ["NAME", "AGE"]
        rows = [[objects.name(o), age(o, now)] for o in items]
    if all_namespaces and rtype.namespaced:
        headers = ["NAMESPACE", *headers]
        rows = [[objects.namespace(o), *row] for o, row in zip(items, rows, strict=True)]
    return headers, rows


def build_node_rows(
    items: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
    *,
    wide: bool,
    ztunnel_states: Mapping[str, str],
) -> tuple[list[str], list[list[str]]]:
    """NAME STATUS ADDRESS POD-CIDR ZTUNNEL AGE (wide: VERSION, the kubelet's)."""
    headers = ["NAME", "STATUS", "ADDRESS", "POD-CIDR", "ZTUNNEL", "AGE"]
    if wide:
        headers.append("VERSION")
    rows = []
    for n in items:
        name = objects.name(n)
        row = [
            name,
            "Ready" if podfields.is_condition_true(n, "Ready") else "NotReady",
            podfields.node_internal_ip(n) or "<none>",
            podfields.node_pod_cidr(n) or "<none>",
            ztunnel_states.get(name, PROCESS_UNKNOWN),
            age(n, now),
        ]
        if wide:
            info = podfields.status(n).get("nodeInfo")
            version = info.get("kubeletVersion") if isinstance(info, Mapping) else None
            row.append(str(version) if isinstance(version, str) and version else "<none>")
        rows.append(row)
    return headers, rows


def build_deployment_rows(
    items: Sequence[Mapping[str, Any]], now: datetime.datetime, *, wide: bool
) -> tuple[list[str], list[list[str]]]:
    """kubectl's NAME READY UP-TO-DATE AVAILABLE AGE (wide: CONTAINERS IMAGES SELECTOR)."""
    headers = ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    if wide:
        headers += ["CONTAINERS", "IMAGES", "SELECTOR"]
    rows = []
    for d in items:
        ready = podfields.status_count(d, "readyReplicas")
        row = [
            objects.name(d),
            f"{ready}/{podfields.desired_replicas(d)}",
            str(podfields.status_count(d, "updatedReplicas")),
            str(podfields.status_count(d, "availableReplicas")),
            age(d, now),
        ]
        if wide:
            containers = podfields.template_containers(d)
            selector = podfields.match_labels(d)
            row += [
                ",".join(str(c.get("name") or "") for c in containers) or "<none>",
                ",".join(podfields.container_image(c) for c in containers) or "<none>",
                ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>",
            ]
        rows.append(row)
    return headers, rows


def build_service_entry_rows(
    items: Sequence[Mapping[str, Any]], now: datetime.datetime
) -> tuple[list[str], list[list[str]]]:
    """Istio's printer columns: NAME HOSTS LOCATION RESOLUTION AGE. HOSTS is the list as JSON,
    as kubectl prints an array column; an unset LOCATION or RESOLUTION is blank, as there."""
    headers = ["NAME", "HOSTS", "LOCATION", "RESOLUTION", "AGE"]
    rows = []
    for entry in items:
        spec = podfields.spec(entry)
        hosts = spec.get("hosts")
        rows.append(
            [
                objects.name(entry),
                json.dumps(hosts, separators=(",", ":")) if isinstance(hosts, list) else "",
                str(spec.get("location") or ""),
                str(spec.get("resolution") or ""),
                age(entry, now),
            ]
        )
    return headers, rows
