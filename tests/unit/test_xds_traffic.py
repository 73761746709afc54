"""meshcore.xds.traffic: traffic objects as waypoint resources and back, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from meshcore.proto import traffic_pb2
from meshcore.xds import resources, traffic

ROUTE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {
        "name": "reviews",
        "namespace": "shop",
        "labels": {"app": "reviews"},
        "resourceVersion": "17",
        "managedFields": [{"manager": "meshctl"}],
    },
    "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
    "status": {"conditions": []},
}


def test_an_object_round_trips_without_what_waypoints_do_not_read() -> None:
    name, resource = traffic.traffic_resource(ROUTE)
    assert name == "VirtualService/shop/reviews"
    decoded = traffic.decode_traffic_object(name, resource)
    assert decoded == {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "shop", "labels": {"app": "reviews"}},
        "spec": ROUTE["spec"],
    }
    # The same content gives the same bytes: the cache's version does not churn.
    assert traffic.traffic_resource(dict(ROUTE))[1] == resource


@pytest.mark.parametrize(
    ("obj", "for_waypoints"),
    [
        (ROUTE, True),
        ({"kind": "DestinationRule"}, True),
        ({"kind": "HTTPRoute"}, True),
        ({"kind": "AuthorizationPolicy", "spec": {"targetRefs": [{"name": "x"}]}}, True),
        ({"kind": "AuthorizationPolicy", "spec": {"selector": {}}}, False),
        ({"kind": "PeerAuthentication"}, False),
    ],
)
def test_which_objects_are_for_waypoints(obj: dict[str, Any], for_waypoints: bool) -> None:
    assert traffic.is_for_waypoints(obj) is for_waypoints


def _packed(message: Any) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        (_packed(wrappers_pb2.StringValue(value="{}")), "type_url"),
        (_packed(traffic_pb2.TrafficObject(kind="Pod", json="{}")), "kind"),
        (_packed(traffic_pb2.TrafficObject(kind="HTTPRoute", json="{not json")), "json"),
        (_packed(traffic_pb2.TrafficObject(kind="HTTPRoute", json='{"kind": "Gateway"}')), "json"),
    ],
)
def test_bad_resources_are_refused_naming_the_field(resource: any_pb2.Any, field: str) -> None:
    with pytest.raises(resources.ResourceError) as raised:
        traffic.decode_traffic_object("x/y/z", resource)
    assert raised.value.field == field
