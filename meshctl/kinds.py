"""The resource names ``meshctl get/delete/label`` accept (kubectl's plural, singular and short
forms), and the ``workloads`` view that is meshctl's own."""

from __future__ import annotations

from meshcore.kube import resources
from meshctl import errors

WORKLOADS = "workloads"

_SHORT_NAMES = (
    (resources.NAMESPACES, "ns"),
    (resources.PODS, "po"),
    (resources.SERVICES, "svc"),
    (resources.NODES, "no"),
)
_ALIASES: dict[str, resources.ResourceType] = {
    alias: rtype
    for rtype, short in _SHORT_NAMES
    for alias in (rtype.plural, rtype.kind.lower(), short)
}


class UnknownResourceError(errors.UsageError):
    """Not a resource type meshctl knows by that name."""


def find_resource(name: str) -> resources.ResourceType:
    rtype = _ALIASES.get(name.lower())
    if rtype is None:
        known = "namespaces (ns), pods (po), services (svc), nodes (no), workloads"
        raise UnknownResourceError(
            f'the server doesn\'t have a resource type "{name}" (meshctl knows: {known})'
        )
    return rtype


def is_workloads(name: str) -> bool:
    return name.lower() in (WORKLOADS, "workload", "wl")
