"""ServiceEntry -> model Services and their endpoint Workloads, as istiod builds them for ztunnel
and waypoints. Pure.

- Each host that is not a wildcard becomes a Service named after the ServiceEntry, with that
  hostname (a wildcard host names no address to send to: it gets nothing, as in Istio's
  ambient mode). Its addresses are `spec.addresses` (single IPs; CIDR ranges are left out), or
  else the address the controller allocated for that host (``status.addresses``, Istio's
  auto-allocation). Its ports are `spec.ports`, number to targetPort (or number).
- A waypoint comes from the ServiceEntry's ``istio.io/use-waypoint`` label or its Namespace's,
  as for a Service: egress through a waypoint is how it is routed and observed.
- Endpoints: with resolution STATIC or DNS, one Workload per `spec.endpoints` entry (an IP
  address, or a DNS name a waypoint resolves when it dials); with DNS and no endpoints, each
  host resolves itself; with NONE, none (the destination is not known here). An endpoint's port
  for a service port is its own ``ports[<port name>]``, else the port's targetPort, else its
  number. Endpoints are outside the mesh (no HBONE): the waypoint dials them in plain TCP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from controller.translate import services as svc_translate
from controller.translate import waypoints
from meshcore.identity import spiffe
from meshcore.kube import serviceentries as kube_entries
from meshcore.model import ids, workload

KIND = "ServiceEntry"
_RESOLVED = ("STATIC", "DNS", "DNS_ROUND_ROBIN")
_DNS = ("DNS", "DNS_ROUND_ROBIN")

KubeObject = Mapping[str, Any]


def _ip(text: str) -> ids.IpAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _port_mappings(entry: KubeObject) -> tuple[workload.PortMapping, ...]:
    """The ports; a port the API would have refused fails the whole entry (named)."""
    meta, spec = entry.get("metadata") or {}, entry.get("spec") or {}
    out = []
    for i, p in enumerate(spec.get("ports") or ()):
        try:
            out.append(
                workload.PortMapping(int(p["number"]), int(p.get("targetPort") or p["number"]))
            )
        except (KeyError, TypeError, ValueError):
            raise svc_translate.TranslateError(
                KIND,
                str(meta.get("namespace", "")),
                str(meta.get("name", "")),
                f"spec.ports[{i}]",
                f"not a port: {p!r}",
            ) from None
    return tuple(out)


def _own_port(value: object, default: int) -> int:
    """An endpoint's own port for a service port, when it gives a usable one."""
    try:
        port = int(str(value))
    except ValueError:
        return default
    return port if 0 < port < 65536 else default


def build_services(
    entry: KubeObject,
    *,
    namespace_labels: Mapping[str, str],
    domain: str,
    gateways: waypoints.GatewayTraffic | None = None,
) -> tuple[workload.Service, ...]:
    meta = entry.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    waypoint = waypoints.find_waypoint(
        meta.get("labels") or {},
        namespace,
        namespace_labels,
        domain=domain,
        traffic=waypoints.SERVICE_TRAFFIC,
        gateways=gateways or {},
    )
    ports = _port_mappings(entry)
    out = []
    for host, addresses in kube_entries.find_host_addresses(entry).items():
        out.append(
            workload.Service(
                name=name,
                namespace=namespace,
                hostname=host,
                addresses=addresses,
                ports=ports,
                waypoint=waypoint,
            )
        )
    return tuple(out)


def build_endpoints(
    entry: KubeObject, services: tuple[workload.Service, ...], *, cluster_id: str
) -> tuple[workload.Workload, ...]:
    meta = entry.get("metadata") or {}
    spec = entry.get("spec") or {}
    resolution = spec.get("resolution") or "NONE"
    if resolution not in _RESOLVED or not services:
        return ()
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    mapped = [
        (p.get("name"), m) for p, m in zip(spec.get("ports") or (), services[0].ports, strict=True)
    ]
    listed: list[Mapping[str, Any]] = list(spec.get("endpoints") or ())
    # Listed endpoints serve every host; without them a DNS entry's hosts resolve themselves,
    # each its own endpoint of its own host only (binding each to all N hosts made N^2).
    bound: dict[str, tuple[workload.Service, ...]] = {}
    if not listed and resolution in _DNS:
        listed = [{"address": s.hostname} for s in services]
        bound = {s.hostname: (s,) for s in services}
    out = []
    seen: set[str] = set()
    for endpoint in listed:
        address = str(endpoint.get("address", ""))
        if address in seen:
            continue  # one endpoint per address (the first)
        seen.add(address)
        own_ports = endpoint.get("ports") or {}
        mappings = tuple(
            workload.PortMapping(m.service_port, _own_port(own_ports.get(port_name), m.target_port))
            for port_name, m in mapped
        )
        ip = _ip(address)
        out.append(
            workload.Workload(
                uid=ids.WorkloadUid(
                    f"{cluster_id}/networking.istio.io/ServiceEntry/{namespace}/{name}/{address}"
                ),
                name=name,
                namespace=namespace,
                addresses=(ip,) if ip is not None else (),
                hostname="" if ip is not None else address,
                node="",
                service_account=str(
                    endpoint.get("serviceAccount") or spiffe.DEFAULT_SERVICE_ACCOUNT
                ),
                canonical_name=name,
                workload_name=name,
                services=tuple(
                    workload.ServiceBinding(s.key, mappings) for s in bound.get(address, services)
                ),
                cluster_id=cluster_id,
                network=str(endpoint.get("network") or ""),
                labels=tuple(sorted((endpoint.get("labels") or {}).items())),
            )
        )
    return tuple(out)
