"""Kubernetes Service -> model Service, plus the selector and port helpers workloads need. Pure.

Objects are the JSON dicts the API returns. The API server has validated them, so a malformed
field here means a bug elsewhere: it raises `TranslateError` naming the object and field rather
than guessing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from controller.translate import waypoints
from meshcore import digits
from meshcore.model import ids, workload

KubeObject = Mapping[str, Any]

_HEADLESS = "None"
_MAX_PORT = 65535


class TranslateError(ValueError):
    """A Kubernetes object has a field the translation cannot use. Root error of this package."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, reason: str) -> None:
        super().__init__(f"{kind} {namespace}/{name}: {field}: {reason}")
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.reason = reason


def build_service(
    svc: KubeObject,
    *,
    domain: str,
    namespace_labels: Mapping[str, str] | None = None,
    gateways: waypoints.GatewayTraffic | None = None,
) -> workload.Service:
    """The model Service; `namespace_labels` (its Namespace's) may name its waypoint, which
    `gateways` (the known waypoint Gateways) may say is not for services."""
    namespace, name = object_key(svc)
    meta = svc.get("metadata") or {}
    spec = svc.get("spec") or {}

    def fail(field: str, reason: str) -> TranslateError:
        return TranslateError("Service", namespace, name, field, reason)

    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    addresses = []
    for i, raw in enumerate(cluster_ips):
        if raw in (None, "", _HEADLESS):
            continue  # headless (or not allocated yet): no VIP
        try:
            if not isinstance(raw, str):
                raise ValueError(raw)  # ip_address() would also take an int
            addresses.append(ipaddress.ip_address(raw))
        except ValueError:
            raise fail(f"spec.clusterIPs[{i}]", f"not an IP address: {raw!r}") from None
    ports = []
    for i, port in enumerate(spec.get("ports") or ()):
        number = _port_number(port.get("port"))
        if number is None:
            raise fail(f"spec.ports[{i}].port", f"not a port number: {port.get('port')!r}")
        target = port.get("targetPort", number)
        if isinstance(target, str) and not digits.is_digits(target):
            # Named: each endpoint resolves it against its own containers (see `binding_ports`).
            ports.append(workload.PortMapping(number, 0))
            continue
        target_number = _port_number(target)
        if target_number is None:
            raise fail(f"spec.ports[{i}].targetPort", f"not a port: {target!r}")
        ports.append(workload.PortMapping(number, target_number))
    return workload.Service(
        name=name,
        namespace=namespace,
        hostname=ids.service_hostname(name, namespace, domain),
        addresses=tuple(addresses),
        ports=tuple(ports),
        waypoint=waypoints.find_waypoint(
            meta.get("labels") or {},
            namespace,
            namespace_labels or {},
            domain=domain,
            traffic=waypoints.SERVICE_TRAFFIC,
            gateways=gateways or {},
        ),
    )


def service_key(svc: KubeObject, *, domain: str) -> ids.ServiceKey:
    namespace, name = object_key(svc)
    return ids.service_key(namespace, ids.service_hostname(name, namespace, domain))


def selects(svc: KubeObject, labels: Mapping[str, str]) -> bool:
    """Whether `svc` selects a pod with `labels`; a Service without a selector selects nothing."""
    selector = (svc.get("spec") or {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def binding_ports(svc: KubeObject, pod: KubeObject) -> tuple[workload.PortMapping, ...]:
    """The Service's ports as they land on `pod`: named target ports resolved through the pod's
    container ports (by name and protocol, as the endpoints controller does). A name the pod does
    not declare drops that mapping only."""
    named: dict[tuple[str, str], int] = {}
    for container in (pod.get("spec") or {}).get("containers") or ():
        for cport in container.get("ports") or ():
            number = _port_number(cport.get("containerPort"))
            if cport.get("name") and number is not None:
                named.setdefault((cport["name"], cport.get("protocol", "TCP")), number)
    mappings = []
    for port in (svc.get("spec") or {}).get("ports") or ():
        number = _port_number(port.get("port"))
        if number is None:
            continue  # build_service reports it
        target = port.get("targetPort", number)
        if isinstance(target, str) and not digits.is_digits(target):
            resolved = named.get((target, port.get("protocol", "TCP")))
            if resolved is not None:
                mappings.append(workload.PortMapping(number, resolved))
            continue
        target_number = _port_number(target)
        if target_number is not None:
            mappings.append(workload.PortMapping(number, target_number))
    return tuple(mappings)


def object_key(obj: KubeObject) -> tuple[str, str]:
    """(namespace, name) of a namespaced object."""
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def _port_number(value: object) -> int | None:
    if isinstance(value, str) and digits.is_digits(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_PORT:
        return value
    return None
