"""Istio's traffic kinds through `meshctl apply` and the real local API server: a route to a
subset no DestinationRule defines is refused naming the field, a file holding both kinds applies
in any order, and every write says that nothing routes by them yet."""

from __future__ import annotations

import yaml

from controller.sources.local import kinds
from tests.direct import meshctl_harness

playground = meshctl_harness.playground

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
ROUTE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews"],
        "http": [
            {
                "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            },
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        ],
    },
}
RULE = {
    "apiVersion": "networking.istio.io/v1beta1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "host": "reviews.shop.svc.cluster.local",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
}


def test_a_route_to_an_undefined_subset_is_refused_naming_the_field(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl("apply", "-f", "-", stdin=NAMESPACE)
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=yaml.safe_dump(ROUTE))
    assert (code, out) == (1, "")
    assert (
        'spec.http[0].route[0].destination.subset: Invalid value: "v2": no DestinationRule for '
        "host reviews.shop.svc.cluster.local defines this subset (subsets defined: none)"
    ) in err
    assert "spec.http[1].route[0].destination.subset" in err
    assert playground.store.find(kinds.VIRTUAL_SERVICES, "reviews", "shop") is None


def test_both_kinds_in_one_file_apply_in_any_order(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl("apply", "-f", "-", stdin=NAMESPACE)
    both = yaml.safe_dump_all([ROUTE, RULE])  # the route first, as users often write them
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=both)
    assert code == 0, err
    assert out.splitlines() == [
        "destinationrule.networking.istio.io/reviews created",
        "virtualservice.networking.istio.io/reviews created",
    ]
    assert err == ""  # every field of the example is acted on
    assert playground.store.find(kinds.VIRTUAL_SERVICES, "reviews", "shop") is not None

    # A subset the rule does not define is refused on update too; the stored route is kept.
    changed = yaml.safe_load(yaml.safe_dump(ROUTE))
    changed["spec"]["http"][1]["route"][0]["destination"]["subset"] = "v3"
    code, _, err = playground.meshctl("apply", "-f", "-", stdin=yaml.safe_dump(changed))
    assert code == 1
    assert '"v3": no DestinationRule for host reviews.shop.svc.cluster.local' in err
    assert "(subsets defined: v1, v2)" in err
    stored = playground.store.find(kinds.VIRTUAL_SERVICES, "reviews", "shop")
    assert stored is not None
    assert stored["spec"]["http"][1]["route"][0]["destination"]["subset"] == "v1"


WAYPOINT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: shop
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - headers: [{name: x-canary, value: "true"}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"""


def test_a_waypoint_gateway_and_an_http_route_apply_as_istio_writes_them(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl("apply", "-f", "-", stdin=NAMESPACE)
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=WAYPOINT)
    assert code == 0, err
    assert out.splitlines() == [
        "gateway.gateway.networking.k8s.io/waypoint created",
        "httproute.gateway.networking.k8s.io/reviews created",
    ]
    assert "Warning: spec.parentRefs[0].port: accepted, not acted on by this mesh" in err
    assert playground.store.find(kinds.GATEWAYS, "waypoint", "shop") is not None

    broken = WAYPOINT.split("---")[0].replace("protocol: HBONE", "protocol: HTTP")
    code, _, err = playground.meshctl("apply", "-f", "-", stdin=broken)
    assert code == 1
    assert "spec.listeners" in err
    assert "needs a listener with protocol HBONE on port 15008" in err
