"""Type URLs of the delta xDS resources this mesh exchanges (spec 5.1)."""

from __future__ import annotations

# Workloads and services, as the oneof `istio.workload.Address`: what ztunnel subscribes to.
ADDRESS = "type.googleapis.com/istio.workload.Address"
# L4 authorization policies enforced by ztunnel.
AUTHORIZATION = "type.googleapis.com/istio.security.Authorization"
# Bare workloads (istiod serves them to waypoints and other consumers).
WORKLOAD = "type.googleapis.com/istio.workload.Workload"
# Traffic objects for waypoints (VirtualService, DestinationRule, HTTPRoute, AuthorizationPolicy
# with targetRefs), this mesh's own type (meshcore/proto/traffic.proto).
TRAFFIC = "type.googleapis.com/ambient.mesh.traffic.TrafficObject"
