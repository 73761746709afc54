"""waypoint.state: services, workloads and traffic objects from xDS, as the engine reads them:
VIPs to services, default routes, subsets by pod labels, bound policies, all-or-nothing batches."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from meshcore.model import ids, workload
from meshcore.xds import resources, traffic, types
from waypoint import state as state_mod

HOST = "reviews.shop.svc.cluster.local"
KEY = ids.service_key("shop", HOST)
VIP = ipaddress.ip_address("10.96.0.20")

REVIEWS = workload.Service(
    name="reviews",
    namespace="shop",
    hostname=HOST,
    addresses=(VIP,),
    ports=(workload.PortMapping(9080, 8080),),
)


def _pod(name: str, ip: str, version: str, *, healthy: bool = True) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("shop", name),
        name=name,
        namespace="shop",
        addresses=(ipaddress.ip_address(ip),),
        node="n1",
        service_account="reviews",
        canonical_name="reviews",
        canonical_revision=version,
        services=(workload.ServiceBinding(KEY, (workload.PortMapping(9080, 8080),)),),
        status=workload.WorkloadStatus.HEALTHY if healthy else workload.WorkloadStatus.UNHEALTHY,
        labels=(("app", "reviews"), ("version", version)),
    )


PODS = [
    _pod("reviews-v1", "10.244.1.5", "v1"),
    _pod("reviews-v2", "10.244.2.6", "v2"),
    _pod("reviews-v2-sick", "10.244.2.7", "v2", healthy=False),
]
RULE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "host": "reviews",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
}
ROUTE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews"],
        "http": [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}],
    },
}


def _policy(name: str, ref: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"targetRefs": [ref], "rules": [{}]},
    }


def _loaded(*objects: dict[str, Any]) -> state_mod.WaypointState:
    state = state_mod.WaypointState(namespace="shop", name="waypoint")
    known: list[workload.Workload | workload.Service] = [REVIEWS, *PODS]
    addresses = [resources.address_resource(o) for o in known]
    assert state.apply(types.ADDRESS, addresses, []) == []
    assert state.apply(types.TRAFFIC, [traffic.traffic_resource(o) for o in objects], []) == []
    return state


def test_a_vip_names_its_service_and_a_service_without_routes_goes_to_itself() -> None:
    state = _loaded()
    assert state.resolve("10.96.0.20", 9080) == HOST
    assert state.resolve("10.96.0.20", 80) is None
    assert state.resolve("10.96.0.99", 9080) is None
    table = state.find_route_table(HOST, 9080)
    assert table is not None
    [route] = table.routes
    assert [(d.host, d.subset, d.port) for d in route.destinations] == [(HOST, None, 9080)]
    assert state.find_route_table("ratings.shop.svc.cluster.local", 9080) is None
    # Every healthy endpoint, at its target port.
    assert state.find_endpoints(HOST, None, 9080) == [("10.244.1.5", 8080), ("10.244.2.6", 8080)]
    assert state.find_endpoints(HOST, None, 80) == ()


def test_subsets_pick_endpoints_by_pod_labels_and_routes_come_from_the_virtual_service() -> None:
    state = _loaded(RULE, ROUTE)
    table = state.find_route_table(HOST, 9080)
    assert table is not None
    assert table.name == "reviews"
    assert state.find_endpoints(HOST, "v1", 9080) == [("10.244.1.5", 8080)]
    assert state.find_endpoints(HOST, "v2", 9080) == [("10.244.2.6", 8080)]  # not the sick one
    assert state.find_endpoints(HOST, "v3", 9080) == ()  # unknown subset: no endpoints
    rule = state.find_destination_rule(HOST)
    assert rule is not None
    assert rule.name == "reviews"
    assert state.describe_endpoint(("10.244.2.6", 8080))[:2] == ("reviews-v2", "reviews")


def test_policies_bound_to_the_service_or_to_this_waypoint_apply() -> None:
    state = _loaded(
        _policy("on-service", {"kind": "Service", "group": "", "name": "reviews"}),
        _policy("on-waypoint", {"kind": "Gateway", "name": "waypoint"}),
        _policy("on-other", {"kind": "Service", "group": "", "name": "ratings"}),
        _policy("on-other-gateway", {"kind": "Gateway", "name": "ingress"}),
    )
    names = [p.ref.name for p in state.find_policies(HOST, 9080)]
    assert names == ["on-service", "on-waypoint"]


def test_a_batch_with_a_bad_object_is_refused_whole_and_removals_apply() -> None:
    state = _loaded(RULE)
    bad_route = {
        **ROUTE,
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "r"}, "weight": 5},
                        {"destination": {"host": "q"}, "weight": 5},
                    ]
                }
            ],
        },
    }
    errors = state.apply(
        types.TRAFFIC, [traffic.traffic_resource(ROUTE), traffic.traffic_resource(bad_route)], []
    )
    assert len(errors) == 1
    assert "VirtualService shop/broken" in errors[0]
    assert "weights add up to 10" in errors[0]
    table = state.find_route_table(HOST, 9080)
    assert table is not None
    assert table.name == "default"  # the good route in the same batch was not applied either

    assert state.apply(types.TRAFFIC, [], ["DestinationRule/shop/reviews"]) == []
    assert state.find_destination_rule(HOST) is None
    uid = PODS[0].uid
    assert state.apply(types.ADDRESS, [], [uid]) == []
    assert state.find_endpoints(HOST, None, 9080) == [("10.244.2.6", 8080)]
    assert state.apply("type.googleapis.com/other", [], []) != []


def _telemetry(namespace: str, percent: float, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": f"t-{namespace}-{percent}", "namespace": namespace},
        "spec": {"tracing": [{"randomSamplingPercentage": percent}], **spec},
    }


def test_tracing_sampling_comes_from_the_most_specific_telemetry() -> None:
    assert _loaded().tracing_sample_percent() == state_mod.DEFAULT_SAMPLE_PERCENT
    mesh = _telemetry("istio-system", 10.0)
    namespace = _telemetry("shop", 50.0)
    bound = _telemetry("shop", 100.0, targetRefs=[{"kind": "Gateway", "name": "waypoint"}])
    other = _telemetry("shop", 0.0, targetRefs=[{"kind": "Gateway", "name": "ingress"}])
    selected = _telemetry("shop", 0.0, selector={"matchLabels": {"app": "web"}})
    assert _loaded(mesh).tracing_sample_percent() == 10.0
    assert _loaded(mesh, namespace, other, selected).tracing_sample_percent() == 50.0
    assert _loaded(mesh, namespace, bound).tracing_sample_percent() == 100.0
    silenced = _telemetry("shop", 100.0)
    silenced["spec"]["tracing"][0]["disableSpanReporting"] = True
    assert _loaded(mesh, silenced).tracing_sample_percent() == 0.0


def test_external_endpoints_are_dialled_by_name_and_outside_the_mesh() -> None:
    """A ServiceEntry's DNS endpoint is dialled by its name over plain TCP; mesh pods over
    HBONE; an address nobody knows is tried over HBONE (no identity can match it)."""
    host = "api.example.com"
    key = ids.service_key("shop", host)
    external = workload.Service(
        name="api",
        namespace="shop",
        hostname=host,
        addresses=(ipaddress.ip_address("240.240.0.1"),),
        ports=(workload.PortMapping(80, 8080),),
    )
    endpoint = workload.Workload(
        uid=ids.WorkloadUid("Kubernetes/networking.istio.io/ServiceEntry/shop/api/api.internal"),
        name="api",
        namespace="shop",
        addresses=(),
        hostname="api.internal",
        node="",
        services=(workload.ServiceBinding(key, (workload.PortMapping(80, 8080),)),),
    )
    meshed = dataclasses.replace(PODS[0], tunnel_protocol=workload.TunnelProtocol.HBONE)
    state = state_mod.WaypointState(namespace="shop", name="waypoint")
    known: list[workload.Workload | workload.Service] = [
        external,
        endpoint,
        REVIEWS,
        meshed,
        PODS[1],
    ]
    assert state.apply(types.ADDRESS, [resources.address_resource(o) for o in known], []) == []
    assert state.resolve("240.240.0.1", 80) == host
    assert state.find_endpoints(host, None, 80) == [("api.internal", 8080)]
    assert not state.is_in_mesh(("api.internal", 8080))
    assert state.is_in_mesh(("10.244.1.5", 8080))  # captured: HBONE
    assert not state.is_in_mesh(("10.244.2.6", 8080))  # known, not captured: plain TCP
    assert state.is_in_mesh(("10.9.9.9", 80))  # unknown: HBONE, which fails closed


def test_a_pod_naming_this_waypoint_has_its_own_traffic_routed_to_it() -> None:
    """`istio.io/use-waypoint` on a pod: calls to its IP reach the waypoint, which serves them
    (policies bound to the waypoint apply) and sends them on to that pod; a pod naming another
    waypoint, or none, is not served here."""
    mine = workload.GatewayAddress(hostname=("shop", "waypoint.shop.svc.cluster.local"))
    other = workload.GatewayAddress(hostname=("shop", "other.shop.svc.cluster.local"))
    labelled = dataclasses.replace(PODS[0], waypoint=mine)
    elsewhere = dataclasses.replace(PODS[1], waypoint=other)
    state = state_mod.WaypointState(namespace="shop", name="waypoint")
    known: list[workload.Workload | workload.Service] = [REVIEWS, labelled, elsewhere]
    assert state.apply(types.ADDRESS, [resources.address_resource(o) for o in known], []) == []
    assert state.resolve("10.244.1.5", 9999) == "10.244.1.5"
    assert state.resolve("10.244.2.6", 8080) is None
    table = state.find_route_table("10.244.1.5", 9999)
    assert table is not None
    [route] = table.routes
    assert [(d.host, d.port) for d in route.destinations] == [("10.244.1.5", 9999)]
    assert state.find_endpoints("10.244.1.5", None, 9999) == [("10.244.1.5", 9999)]
    assert state.find_endpoints("10.244.1.5", "v1", 9999) == ()  # no subsets for a pod
    assert state.find_route_table("10.244.2.6", 8080) is None
