"""Schema of Istio's ServiceEntry (networking.istio.io v1, also v1beta1 and v1alpha3).

Strict, as the CRD's structural schema plus Istio's validating webhook would be together
(istio/pkg/config/validation: `ValidateServiceEntry`): unknown fields and wrong types are errors
naming their field path, then Istio's semantic checks, each pinned to its field:

- ``spec.hosts``: DNS names, optionally with a ``*.`` prefix, never ``*`` alone, each once;
- ``spec.addresses``: IPs or CIDRs, a CIDR only with resolution NONE or STATIC;
- ``spec.ports``: numbers and names unique, protocols Istio knows (in any case, as Istio parses
  them);
- ``spec.endpoints``: every port an endpoint names is one of ``spec.ports``; with resolution
  STATIC each address is an IP (and there are endpoints, or a workloadSelector); with DNS or
  DNS_ROUND_ROBIN an address may be a DNS name, DNS_ROUND_ROBIN takes at most one endpoint, and
  without endpoints every host is resolved itself, so none may be a wildcard. Unix domain
  socket endpoints (``unix://``) are refused: this mesh has nothing to send to them.

`status` is left free: controllers write it (`serviceentries` allocates the addresses there).
``workloadSelector`` and ``exportTo`` are accepted and reported by `find_unenforced`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from controller.sources.local import schemas, validation

V = validation

PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS", "MONGO", "REDIS", "MYSQL")
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
DEFAULT_LOCATION = "MESH_EXTERNAL"
DEFAULT_RESOLUTION = "NONE"
# Resolutions that resolve a DNS name: an endpoint's, or each host's when there are none.
DNS_RESOLUTIONS = frozenset({"DNS", "DNS_ROUND_ROBIN"})
UNIX_PREFIX = "unix://"
WILDCARD_PREFIX = "*."
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_HOST_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_DNS_NAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
# Istio's port names are DNS-1123 labels in either case.
_PORT_NAME_RE = re.compile(r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_UINT32_MAX = 2**32 - 1


# -- rules on strings (None: fine, else the detail) -----------------------------------------


def host(value: str) -> str | None:
    """A ServiceEntry host: a DNS name, optionally with a leading ``*.``, but not ``*``."""
    if value == "*":
        return "the full wildcard '*' is not allowed in a ServiceEntry (use a '*.' prefix)"
    if len(value) > 253 or not _HOST_RE.match(value):
        return (
            "must be a lower-case DNS name (e.g. api.example.com), optionally with a leading '*.'"
        )
    return None


def address(value: str) -> str | None:
    """An IP or a CIDR (``spec.addresses``)."""
    if "/" in value:
        return V.cidr(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IP address or a CIDR (e.g. 10.0.0.1 or 10.0.0.0/24)"
    return None


def port_name(value: str) -> str | None:
    if len(value) > 63 or not _PORT_NAME_RE.match(value):
        return (
            "must be a DNS-1123 label: alphanumeric characters or '-', starting and ending "
            "with an alphanumeric character (e.g. http, tls-443)"
        )
    return None


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_dns_name(value: str) -> bool:
    """A resolvable name: no wildcard, a trailing dot allowed (as Istio's ValidateFQDN)."""
    return len(value) <= 254 and bool(_DNS_NAME_RE.match(value))


def is_wildcard(value: str) -> bool:
    return value.startswith(WILDCARD_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class Protocol:
    """A port protocol, in any case (Istio parses ``http`` as HTTP)."""

    def check(self, value: Any, path: str) -> list[V.FieldError]:
        if not isinstance(value, str):
            return [V.invalid(path, value, "must be of type string")]
        if value.upper() not in PROTOCOLS:
            return [V.unsupported(path, value, PROTOCOLS)]
        return []


# -- the spec ---------------------------------------------------------------------------------


def _check_unique_hosts(hosts: list[str], path: str) -> list[V.FieldError]:
    seen: set[str] = set()
    found = []
    for i, value in enumerate(hosts):
        if value in seen:
            found.append(V.duplicate(V.item(path, i), value))
        seen.add(value)
    return found


def _check_unique_ports(ports: list[dict[str, Any]], path: str) -> list[V.FieldError]:
    names: set[str] = set()
    numbers: set[int] = set()
    found = []
    for i, port in enumerate(ports):
        if port["name"] in names:
            found.append(V.duplicate(V.child(V.item(path, i), "name"), port["name"]))
        if port["number"] in numbers:
            found.append(V.duplicate(V.child(V.item(path, i), "number"), port["number"]))
        names.add(port["name"])
        numbers.add(port["number"])
    return found


PORT = V.Obj(
    {
        "number": V.Int(1, 65535),
        "name": V.Str(port_name, non_empty=True),
        "protocol": Protocol(),
        "targetPort": V.Int(1, 65535),
    },
    required=frozenset({"number", "name"}),
)
ENDPOINT = V.Obj(
    {
        "address": V.Str(non_empty=True),
        "ports": V.MapOf(V.Int(1, 65535)),
        "labels": V.StrMap(V.label_key, V.label_value),
        "network": V.Str(),
        "locality": V.Str(),
        "weight": V.Int(0, _UINT32_MAX),
        "serviceAccount": V.Str(),
    },
    required=frozenset({"address"}),
)
# A ServiceEntry's selector names labels directly (not matchLabels, as policies do).
WORKLOAD_SELECTOR = V.Obj({"labels": V.StrMap(V.label_key, V.label_value)})


def _check_endpoint(
    endpoint: dict[str, Any], path: str, resolution: str, port_names: list[str]
) -> list[V.FieldError]:
    found = []
    known = ", ".join(port_names) or "none"
    for name in endpoint.get("ports") or {}:
        if name not in port_names:
            found.append(
                V.invalid(
                    V.child(path, "ports"),
                    name,
                    f"not the name of a port in spec.ports (names: {known})",
                )
            )
    value = endpoint["address"]
    where = V.child(path, "address")
    if value.startswith(UNIX_PREFIX):
        found.append(V.forbidden(where, "unix domain socket endpoints are not supported"))
    elif resolution == "STATIC":
        if not is_ip(value):
            found.append(V.invalid(where, value, "resolution STATIC needs an IP address"))
    elif not is_ip(value) and not is_dns_name(value):
        found.append(
            V.invalid(where, value, "must be an IP address or a DNS name (e.g. api.example.com)")
        )
    return found


def _check_spec(spec: dict[str, Any], path: str) -> list[V.FieldError]:
    """Istio's checks across fields; the fields themselves are well-typed here."""
    resolution = spec.get("resolution", DEFAULT_RESOLUTION)
    endpoints: list[dict[str, Any]] = spec.get("endpoints") or []
    port_names = [p["name"] for p in spec.get("ports") or ()]
    has_selector = "workloadSelector" in spec
    found = []
    for i, value in enumerate(spec.get("addresses") or ()):
        if "/" in value and resolution not in ("NONE", "STATIC"):
            found.append(
                V.invalid(
                    V.item(V.child(path, "addresses"), i),
                    value,
                    f"a CIDR is allowed only with resolution NONE or STATIC, not {resolution}",
                )
            )
    for i, endpoint in enumerate(endpoints):
        where = V.item(V.child(path, "endpoints"), i)
        found.extend(_check_endpoint(endpoint, where, resolution, port_names))
    if has_selector and endpoints:
        found.append(
            V.forbidden(
                V.child(path, "workloadSelector"),
                "only one of workloadSelector, endpoints may be set",
            )
        )
    if resolution == "STATIC" and not endpoints and not has_selector:
        found.append(
            V.required(
                V.child(path, "endpoints"),
                "resolution STATIC needs endpoints or a workloadSelector",
            )
        )
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        found.append(
            V.forbidden(
                V.child(path, "endpoints"),
                f"resolution DNS_ROUND_ROBIN takes at most one endpoint, got {len(endpoints)}",
            )
        )
    if resolution in DNS_RESOLUTIONS and not endpoints:
        for i, value in enumerate(spec["hosts"]):
            if is_wildcard(value):
                found.append(
                    V.invalid(
                        V.item(V.child(path, "hosts"), i),
                        value,
                        f"resolution {resolution} without endpoints resolves each host, and a "
                        "wildcard host cannot be resolved: add endpoints or use resolution NONE",
                    )
                )
    return found


SERVICE_ENTRY_SPEC = V.Obj(
    {
        "hosts": V.ListOf(
            V.Str(host, non_empty=True), non_empty=True, check_list=_check_unique_hosts
        ),
        "addresses": V.ListOf(V.Str(address, non_empty=True)),
        "ports": V.ListOf(PORT, check_list=_check_unique_ports),
        "location": V.Str(enum=LOCATIONS),
        "resolution": V.Str(enum=RESOLUTIONS),
        "endpoints": V.ListOf(ENDPOINT),
        "workloadSelector": WORKLOAD_SELECTOR,
        "exportTo": V.ListOf(V.Str(non_empty=True)),
        "subjectAltNames": V.ListOf(V.Str(non_empty=True)),
    },
    required=frozenset({"hosts"}),
    check_obj=_check_spec,
)
SERVICE_ENTRY = schemas.build_object(V.dns_subdomain, SERVICE_ENTRY_SPEC, V.AnyObject())


# -- what is accepted but not acted on --------------------------------------------------------

_UNENFORCED_SPEC = ("workloadSelector", "exportTo")


def find_unenforced(obj: dict[str, Any]) -> list[str]:
    """One warning per field the mesh accepts but will not act on, by field path."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    return [
        f"spec.{field}: accepted, not acted on by this mesh"
        for field in _UNENFORCED_SPEC
        if field in spec
    ]
