"""Which waypoint a Service, ServiceEntry or Pod uses: the `istio.io/use-waypoint` labels and
the waypoint Gateway's `istio.io/waypoint-for`, as istiod reads them.

An object's own label wins over its Namespace's; the value ``none`` on the object opts it out
of the namespace's waypoint. `istio.io/use-waypoint-namespace`, read from the same object as
`istio.io/use-waypoint`, names the waypoint's namespace (default: that object's namespace).

The Gateway so named says what it is for (label `istio.io/waypoint-for`): ``service`` (the
default) for calls to service addresses, ``workload`` for calls to pods' own IPs, ``all`` or
``none``. A Service or ServiceEntry binds only to a ``service`` or ``all`` waypoint, a Pod only
to a ``workload`` or ``all`` one; otherwise the object has no waypoint. A value that is not one
of the four counts as ``all``: traffic meant for the waypoint's L7 policy is never sent around
it by a typo (the Gateway's write warns about it).

The waypoint is named whether or not its Gateway exists (and then for either kind of traffic).
Unlike istiod, which leaves such an object without a waypoint (so its traffic goes direct,
around the L7 policy the label asked for), this fails closed: ztunnel cannot resolve the
waypoint and refuses the connection.

A waypoint's own Service and pods (label `gateway.networking.k8s.io/gateway-name`) never get a
waypoint, whatever their namespace says: the waypoint would send its traffic to itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshcore import ambient_labels
from meshcore.model import ids, workload

USE_WAYPOINT_LABEL = ambient_labels.USE_WAYPOINT
USE_WAYPOINT_NAMESPACE_LABEL = ambient_labels.USE_WAYPOINT_NAMESPACE
GATEWAY_NAME_LABEL = ambient_labels.GATEWAY_NAME
WAYPOINT_FOR = ambient_labels.WAYPOINT_FOR
SERVICE_TRAFFIC = ambient_labels.WAYPOINT_FOR_SERVICE
WORKLOAD_TRAFFIC = ambient_labels.WAYPOINT_FOR_WORKLOAD
ALL_TRAFFIC = ambient_labels.WAYPOINT_FOR_ALL
OPT_OUT = "none"
# The Namespace labels a waypoint depends on: a change to any other leaves every waypoint as is.
NAMESPACE_LABELS = (USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL)


# What each known Gateway is a waypoint for, by (namespace, name): one of WAYPOINT_FOR_VALUES.
GatewayTraffic = Mapping[tuple[str, str], str]


def traffic_of(gateway: Mapping[str, Any]) -> str:
    """What `gateway` is a waypoint for (`istio.io/waypoint-for`; see the module docstring)."""
    labels = (gateway.get("metadata") or {}).get("labels") or {}
    value = labels.get(WAYPOINT_FOR, SERVICE_TRAFFIC)
    return value if value in ambient_labels.WAYPOINT_FOR_VALUES else ALL_TRAFFIC


def named_waypoint(
    labels: Mapping[str, str], namespace: str, namespace_labels: Mapping[str, str]
) -> tuple[str, str] | None:
    """(namespace, name) of the waypoint an object in `namespace` with `labels` names, whose
    Namespace has `namespace_labels`, whatever that waypoint is for; None when it names none."""
    if GATEWAY_NAME_LABEL in labels:
        return None
    source = labels if USE_WAYPOINT_LABEL in labels else namespace_labels
    name = source.get(USE_WAYPOINT_LABEL)
    if name is None or name == OPT_OUT:
        return None
    return source.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name


def find_waypoint(
    labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    *,
    domain: str,
    traffic: str,
    gateways: GatewayTraffic,
) -> workload.GatewayAddress | None:
    """The waypoint `named_waypoint` gives, for `traffic` (SERVICE_TRAFFIC or
    WORKLOAD_TRAFFIC); None also when its Gateway in `gateways` is not for that traffic."""
    key = named_waypoint(labels, namespace, namespace_labels)
    if key is None:
        return None
    serves = gateways.get(key)
    if serves is not None and serves not in (traffic, ALL_TRAFFIC):
        return None
    waypoint_namespace, name = key
    return workload.GatewayAddress(
        hostname=(waypoint_namespace, ids.service_hostname(name, waypoint_namespace, domain)),
        hbone_mtls_port=workload.HBONE_MTLS_PORT,
    )


def waypoint_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of a Namespace's labels its waypoint depends on, to compare old with new."""
    return tuple((key, labels[key]) for key in NAMESPACE_LABELS if key in labels)
