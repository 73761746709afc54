"""Typed, tolerant reads of Pod, Service, Node, Deployment and Istio policy fields (API objects
are plain JSON dicts).

Every accessor returns a safe default for a missing or mistyped field, so the kubelet, the
kube-proxy role and the CLI tables never crash on an object someone else wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
DEFAULT_GRACE_SECONDS = 30


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _map(obj.get("spec"))


def status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _map(obj.get("status"))


def node_name(pod: Mapping[str, Any]) -> str:
    return _str(spec(pod).get("nodeName"))


def service_account(pod: Mapping[str, Any]) -> str:
    return _str(spec(pod).get("serviceAccountName")) or "default"


def pod_ip(pod: Mapping[str, Any]) -> str:
    return _str(status(pod).get("podIP"))


def phase(pod: Mapping[str, Any]) -> str:
    return _str(status(pod).get("phase")) or "Pending"


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(spec(pod).get("containers"))


def pre_stop_handler(container: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A container's `lifecycle.preStop` handler (`exec` or `sleep`), when it has one."""
    handler = _map(_map(container.get("lifecycle")).get("preStop"))
    return handler if ("exec" in handler or "sleep" in handler) else None


def container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(status(pod).get("containerStatuses"))


def conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(status(obj).get("conditions"))


def find_condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions(obj) if c.get("type") == kind), None)


def is_condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    cond = find_condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    return is_condition_true(pod, "Ready")


def is_captured(pod: Mapping[str, Any]) -> bool:
    annotations = _map(_map(pod.get("metadata")).get("annotations"))
    return annotations.get(REDIRECTION_ANNOTATION) == "enabled"


def grace_period(pod: Mapping[str, Any]) -> int:
    """Seconds the containers get between SIGTERM and SIGKILL for this deletion."""
    meta = _map(pod.get("metadata"))
    for value in (
        meta.get("deletionGracePeriodSeconds"),
        spec(pod).get("terminationGracePeriodSeconds"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return DEFAULT_GRACE_SECONDS


def restart_policy(pod: Mapping[str, Any]) -> str:
    return _str(spec(pod).get("restartPolicy")) or "Always"


def container_ports(container: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """(name, port, protocol) of each declared containerPort."""
    out = []
    for port in _list(container.get("ports")):
        number = port.get("containerPort")
        if isinstance(number, int) and not isinstance(number, bool):
            out.append((_str(port.get("name")), number, _str(port.get("protocol")) or "TCP"))
    return out


def find_named_port(pod: Mapping[str, Any], name: str, protocol: str = "TCP") -> int | None:
    for container in containers(pod):
        for port_name, number, proto in container_ports(container):
            if port_name == name and proto == protocol:
                return number
    return None


def service_ports(service: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(spec(service).get("ports"))


def cluster_ip(service: Mapping[str, Any]) -> str:
    ip = _str(spec(service).get("clusterIP"))
    return "" if ip == "None" else ip


def selector(service: Mapping[str, Any]) -> dict[str, str]:
    sel = _map(spec(service).get("selector"))
    return {str(k): str(v) for k, v in sel.items()}


def is_headless(service: Mapping[str, Any]) -> bool:
    return spec(service).get("clusterIP") == "None"


def is_serving(pod: Mapping[str, Any]) -> bool:
    """An endpoint a service may send to: running, Ready, with an IP, not being deleted."""
    return (
        bool(pod_ip(pod))
        and is_pod_ready(pod)
        and not _map(pod.get("metadata")).get("deletionTimestamp")
        and phase(pod) == "Running"
    )


def find_service_members(
    service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The serving pods the service's selector picks in its namespace (none without one)."""
    sel = selector(service)
    if not sel:
        return []
    ns = _map(service.get("metadata")).get("namespace")
    return [
        p
        for p in pods
        if _map(p.get("metadata")).get("namespace") == ns
        and is_serving(p)
        and all(_map(_map(p.get("metadata")).get("labels")).get(k) == v for k, v in sel.items())
    ]


def node_internal_ip(node: Mapping[str, Any]) -> str:
    for addr in _list(status(node).get("addresses")):
        if addr.get("type") == "InternalIP":
            return _str(addr.get("address"))
    return ""


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def node_pod_cidr(node: Mapping[str, Any]) -> str:
    return _str(spec(node).get("podCIDR"))


def desired_replicas(deployment: Mapping[str, Any]) -> int:
    """`spec.replicas` (1 when unset, as the API server defaults it)."""
    return _int(spec(deployment).get("replicas"), 1)


def status_count(deployment: Mapping[str, Any], field: str) -> int:
    """A replica count of the status (readyReplicas, updatedReplicas, ...); 0 when unset."""
    return _int(status(deployment).get(field))


def match_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels = _map(_map(spec(deployment).get("selector")).get("matchLabels"))
    return {str(k): str(v) for k, v in labels.items()}


def template_containers(deployment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    template = _map(spec(deployment).get("template"))
    return _list(_map(template.get("spec")).get("containers"))


def container_image(container: Mapping[str, Any]) -> str:
    """The image, or in the playground (where a container is its command) the program run."""
    image = _str(container.get("image"))
    if image:
        return image
    command = container.get("command")
    return _str(command[0]) if isinstance(command, list) and command else ""


def is_deployment_ready(deployment: Mapping[str, Any]) -> bool:
    """The controller has seen the current spec, and every wanted pod is of the current
    template and Ready, with no older pod left (what ``kubectl rollout status`` waits for)."""
    meta = _map(deployment.get("metadata"))
    wanted = desired_replicas(deployment)
    return (
        status_count(deployment, "observedGeneration") >= _int(meta.get("generation"), 1)
        and status_count(deployment, "updatedReplicas") == wanted
        and status_count(deployment, "replicas") == wanted
        and status_count(deployment, "readyReplicas") == wanted
    )


def policy_action(policy: Mapping[str, Any]) -> str:
    """An AuthorizationPolicy's `spec.action`; ALLOW when unset, as Istio reads it."""
    return _str(spec(policy).get("action")) or "ALLOW"


def mtls_mode(peer_authentication: Mapping[str, Any]) -> str:
    """A PeerAuthentication's `spec.mtls.mode`; UNSET (inherit from the parent) when unset."""
    return _str(_map(spec(peer_authentication).get("mtls")).get("mode")) or "UNSET"
