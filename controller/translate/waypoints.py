"""Which waypoint a Service or Pod uses: the `istio.io/use-waypoint` labels, as istiod reads them.

A Service's own label wins over its Namespace's; the value ``none`` on the Service opts it out
of the namespace's waypoint. A Pod takes a waypoint from its own label only (for calls to its
IP, which that waypoint then serves): a namespace's label is for its services, as Istio's
default ``istio.io/waypoint-for: service`` has it.
`istio.io/use-waypoint-namespace`, read from the same object as
`istio.io/use-waypoint`, names the waypoint's namespace (default: that object's namespace).

The waypoint is named whether or not its Gateway exists. Unlike istiod, which leaves such a
Service without a waypoint (so its traffic goes direct, around the L7 policy the label asked
for), this fails closed: ztunnel cannot resolve the waypoint and refuses the connection.

A waypoint's own Service and pods (label `gateway.networking.k8s.io/gateway-name`) never get a
waypoint, whatever their namespace says: the waypoint would send its traffic to itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshcore import ambient_labels
from meshcore.model import ids, workload

USE_WAYPOINT_LABEL = ambient_labels.USE_WAYPOINT
USE_WAYPOINT_NAMESPACE_LABEL = ambient_labels.USE_WAYPOINT_NAMESPACE
GATEWAY_NAME_LABEL = ambient_labels.GATEWAY_NAME
OPT_OUT = "none"
# The Namespace labels a waypoint depends on: a change to any other leaves every waypoint as is.
NAMESPACE_LABELS = (USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL)


def find_waypoint(
    labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    *,
    domain: str,
) -> workload.GatewayAddress | None:
    """The waypoint of an object in `namespace` with `labels`, whose Namespace has
    `namespace_labels`; None when it has none or opts out."""
    if GATEWAY_NAME_LABEL in labels:
        return None
    source = labels if USE_WAYPOINT_LABEL in labels else namespace_labels
    name = source.get(USE_WAYPOINT_LABEL)
    if name is None or name == OPT_OUT:
        return None
    waypoint_namespace = source.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace
    return workload.GatewayAddress(
        hostname=(waypoint_namespace, ids.service_hostname(name, waypoint_namespace, domain)),
        hbone_mtls_port=workload.HBONE_MTLS_PORT,
    )


def waypoint_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of a Namespace's labels its waypoint depends on, to compare old with new."""
    return tuple((key, labels[key]) for key in NAMESPACE_LABELS if key in labels)
