"""The resource names ``meshctl get/delete/label/scale`` accept (kubectl's plural, singular and
short forms), the ``KIND/NAME`` and ``KIND NAME`` references kubectl takes, and the
``workloads`` view that is meshctl's own."""

from __future__ import annotations

from collections.abc import Sequence

from meshcore.kube import resources
from meshctl import errors

WORKLOADS = "workloads"

# Not among meshcore's well-known types; the playground's API server serves them.
DEPLOYMENTS = resources.DEPLOYMENTS
AUTHORIZATION_POLICIES = resources.AUTHORIZATION_POLICIES
PEER_AUTHENTICATIONS = resources.PEER_AUTHENTICATIONS
VIRTUAL_SERVICES = resources.VIRTUAL_SERVICES
DESTINATION_RULES = resources.DESTINATION_RULES
SERVICE_ENTRIES = resources.SERVICE_ENTRIES
GATEWAYS = resources.GATEWAYS
HTTP_ROUTES = resources.HTTP_ROUTES
TELEMETRIES = resources.TELEMETRIES

_SHORT_NAMES = (
    (resources.NAMESPACES, "ns"),
    (resources.PODS, "po"),
    (resources.SERVICES, "svc"),
    (resources.NODES, "no"),
    (DEPLOYMENTS, "deploy"),
    (AUTHORIZATION_POLICIES, "ap"),
    (PEER_AUTHENTICATIONS, "pa"),
    (VIRTUAL_SERVICES, "vs"),
    (DESTINATION_RULES, "dr"),
    (SERVICE_ENTRIES, "se"),
    (GATEWAYS, "gtw"),
    (HTTP_ROUTES, "httproute"),
    (TELEMETRIES, "telemetry"),
)


def _aliases(rtype: resources.ResourceType, short: str) -> tuple[str, ...]:
    """kubectl's names for a type: plural, singular, short, and (named groups) the plural and
    singular qualified by the group (``authorizationpolicies.security.istio.io``)."""
    names = (rtype.plural, rtype.kind.lower())
    qualified = tuple(f"{n}.{rtype.group}" for n in names) if rtype.group else ()
    return (*names, short, *qualified)


_ALIASES: dict[str, resources.ResourceType] = {
    alias: rtype for rtype, short in _SHORT_NAMES for alias in _aliases(rtype, short)
}
# What `scale` can change: kinds with spec.replicas.
SCALABLE = (DEPLOYMENTS,)


class UnknownResourceError(errors.UsageError):
    """Not a resource type meshctl knows by that name."""


def find_resource(name: str) -> resources.ResourceType:
    rtype = _ALIASES.get(name.lower())
    if rtype is None:
        known = ", ".join(f"{rtype.plural} ({short})" for rtype, short in _SHORT_NAMES)
        known += ", workloads"
        raise UnknownResourceError(
            f'the server doesn\'t have a resource type "{name}" (meshctl knows: {known})'
        )
    return rtype


def is_workloads(name: str) -> bool:
    return name.lower() in (WORKLOADS, "workload", "wl")


def split_ref(args: Sequence[str]) -> tuple[str, str]:
    """(kind, name) of ``KIND/NAME`` or ``KIND NAME``, as kubectl accepts them; UsageError
    otherwise."""
    if len(args) == 1 and "/" in args[0]:
        kind, _, name = args[0].partition("/")
    elif len(args) == 2 and "/" not in args[0]:
        kind, name = args
    else:
        given = " ".join(args) or "nothing"
        raise errors.UsageError(f"expected KIND/NAME or KIND NAME, got {given!r}")
    if not kind or not name or "/" in name:
        raise errors.UsageError(f"expected KIND/NAME or KIND NAME, got {' '.join(args)!r}")
    return kind, name


def find_scalable(kind: str) -> resources.ResourceType:
    rtype = find_resource(kind)
    if rtype not in SCALABLE:
        raise errors.UsageError(
            f"cannot scale {rtype.plural}: only deployments (deploy) have replicas"
        )
    return rtype
