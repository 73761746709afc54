"""The label names and values of Istio's ambient mode that several components read or write:
one definition, so the controller, the node agent and meshctl cannot disagree on a spelling."""

from __future__ import annotations

# On a namespace or pod: `ambient` enrols it, `none` on a pod keeps it out.
DATAPLANE_MODE = "istio.io/dataplane-mode"
# On a namespace, service or pod: the name of the waypoint its traffic goes through (`none`:
# none), and optionally the waypoint's namespace.
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
# On a waypoint's Gateway: what traffic it is for (service, workload, all, none).
WAYPOINT_FOR = "istio.io/waypoint-for"
WAYPOINT_FOR_SERVICE = "service"  # the default: calls to its services' addresses
WAYPOINT_FOR_WORKLOAD = "workload"  # calls to its pods' own addresses
WAYPOINT_FOR_ALL = "all"
WAYPOINT_FOR_NONE = "none"
WAYPOINT_FOR_VALUES = (
    WAYPOINT_FOR_ALL,
    WAYPOINT_FOR_NONE,
    WAYPOINT_FOR_SERVICE,
    WAYPOINT_FOR_WORKLOAD,
)
# On every object made for a Gateway (Gateway API's own label).
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
# The gatewayClassName of a waypoint.
WAYPOINT_CLASS = "istio-waypoint"
