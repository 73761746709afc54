"""meshcore.traffic: a VirtualService and a DestinationRule translated to frozen values, and the
route a request takes through them (Envoy's matching semantics)."""

from __future__ import annotations

import collections
import copy
import random
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest

from meshcore.traffic import destinations, matching, routes

VS: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews", "reviews.example.com"],
        "http": [
            {
                "name": "canary",
                "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            },
            {
                "match": [{"headers": {"cookie": {"regex": "^(.*?;)?(user=premium)(;.*)?$"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "premium"}}],
            },
            {
                "match": [{"uri": {"prefix": "/v2/"}}, {"uri": {"exact": "/v2"}}],
                "rewrite": {"uri": "/"},
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            },
            {
                "match": [
                    {"method": {"exact": "DELETE"}, "queryParams": {"force": {"exact": "1"}}}
                ],
                "directResponse": {"status": 403, "body": {"string": "no"}},
            },
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                    {
                        "destination": {
                            "host": "ratings.other.svc.cluster.local",
                            "port": {"number": 9080},
                        },
                        "weight": 10,
                    },
                ],
                "timeout": "2s",
                "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx, reset"},
                "fault": {"abort": {"percentage": {"value": 2.5}, "httpStatus": 503}},
                "headers": {"request": {"set": {"X-Mesh": "on"}, "remove": ["x-debug"]}},
            },
        ],
    },
}

TABLE = routes.build_route_table(VS)


def _request(path: str = "/", method: str = "GET", **headers: str) -> matching.Request:
    pairs = tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return matching.Request(method, path, "reviews", headers=pairs, port=9080)


def _route_of(request: matching.Request) -> str:
    selected = matching.select(TABLE, request)
    assert selected is not None
    return selected.route.name


def test_translation_qualifies_hosts_and_keeps_every_setting() -> None:
    assert TABLE.hosts == ("reviews.shop.svc.cluster.local", "reviews.example.com")
    assert [r.name for r in TABLE.routes] == [
        "canary",
        "reviews.1",
        "reviews.2",
        "reviews.3",
        "reviews.4",
    ]
    split = TABLE.routes[4]
    assert [(d.host, d.subset, d.port, d.weight) for d in split.destinations] == [
        ("reviews.shop.svc.cluster.local", "v1", None, 90),
        ("ratings.other.svc.cluster.local", None, 9080, 10),
    ]
    assert split.timeout == 2.0
    assert split.retries == routes.Retries(3, 0.5, ("5xx", "reset"))
    assert split.fault == routes.Fault(abort_status=503, abort_percent=2.5, delay_percent=0.0)
    assert split.request_headers == routes.HeaderOps(set=(("x-mesh", "on"),), remove=("x-debug",))
    assert TABLE.routes[3].direct_response == routes.DirectResponse(403, b"no")
    assert TABLE.routes[3].destinations == ()


@pytest.mark.parametrize(
    ("request_", "route"),
    [
        (_request(x_canary="true"), "canary"),
        (_request(x_canary="false"), "reviews.4"),
        (_request(cookie="user=premium; session=1"), "reviews.1"),
        (_request(cookie="session=1;user=premium"), "reviews.1"),
        # As in Envoy, Istio's documented regex wants no space before the cookie.
        (_request(cookie="session=1; user=premium"), "reviews.4"),
        (_request(cookie="user=premiumX"), "reviews.4"),
        # Two cookie headers (HTTP/2 splits them) are joined with "; " before matching.
        (
            matching.Request(
                "GET", "/", "reviews", headers=(("cookie", "user=premium"), ("cookie", "a=1"))
            ),
            "reviews.1",
        ),
        (_request("/v2/items?x=1"), "reviews.2"),
        (_request("/v2?x=1"), "reviews.2"),  # exact compares the path without its query
        (_request("/v2x"), "reviews.4"),
        (_request("/?force=1", "DELETE"), "reviews.3"),
        (_request("/?force=0", "DELETE"), "reviews.4"),
        (_request("/", "DELETE"), "reviews.4"),
    ],
)
def test_requests_take_the_first_route_that_matches(request_: matching.Request, route: str) -> None:
    assert _route_of(request_) == route


def test_no_route_is_none_and_a_regex_must_match_whole() -> None:
    table = routes.build_route_table(
        {
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "hosts": ["r"],
                "http": [
                    {
                        "match": [{"uri": {"regex": "/api/[0-9]+"}}],
                        "route": [{"destination": {"host": "r"}}],
                    }
                ],
            },
        }
    )
    assert matching.select(table, _request("/api/12")) is not None
    assert matching.select(table, _request("/api/12/more")) is None
    assert matching.select(table, _request("/x/api/12")) is None


@pytest.mark.parametrize(
    ("path", "rewritten"),
    [("/v2/items?x=1", "/items?x=1"), ("/v2?x=1", "/?x=1")],
)
def test_rewrite_replaces_the_matched_prefix_or_the_exact_path(path: str, rewritten: str) -> None:
    selected = matching.select(TABLE, _request(path))
    assert selected is not None
    assert matching.rewrite_path(selected, path) == rewritten


def test_regex_rewrite_substitutes_in_the_path_only() -> None:
    spec = copy.deepcopy(VS)
    spec["spec"]["http"][2]["rewrite"] = {
        "uriRegexRewrite": {"match": "^/v2/(.*)$", "rewrite": "/api/\\1"}
    }
    table = routes.build_route_table(spec)
    selected = matching.select(table, _request("/v2/items?x=1"))
    assert selected is not None
    assert matching.rewrite_path(selected, "/v2/items?x=1") == "/api/items?x=1"


# The audit's finding: a regex that makes a backtracking engine take ~2**n steps. With 40 'a's
# Python's `re` would run for hours, so a regression hangs (pytest-timeout fails it) instead of
# pinning the waypoint's CPU for every service behind it.
_MANY_A = "a" * 40


def _regex_table(match: dict[str, Any], rewrite: dict[str, Any] | None = None) -> routes.RouteTable:
    route: dict[str, Any] = {"match": [match], "route": [{"destination": {"host": "r"}}]}
    if rewrite is not None:
        route["rewrite"] = rewrite
    return routes.build_route_table(
        {"metadata": {"name": "r", "namespace": "shop"}, "spec": {"hosts": ["r"], "http": [route]}}
    )


@pytest.mark.parametrize(
    ("match", "refused", "taken"),
    [
        pytest.param(
            {"uri": {"regex": "/(a+)+$"}},
            _request(f"/{_MANY_A}!"),
            _request(f"/{_MANY_A}"),
            id="uri",
        ),
        pytest.param(
            {"uri": {"regex": "/(A+)+$"}, "ignoreUriCase": True},
            _request(f"/{_MANY_A}!"),
            _request(f"/{_MANY_A}"),
            id="uri-ignoring-case",
        ),
        pytest.param(
            {"headers": {"x-id": {"regex": "(a+)+$"}}},
            _request(x_id=f"{_MANY_A}!"),
            _request(x_id=_MANY_A),
            id="header",
        ),
        pytest.param(
            {"queryParams": {"q": {"regex": "(a+)+$"}}},
            _request(f"/?q={_MANY_A}!"),
            _request(f"/?q={_MANY_A}"),
            id="query-parameter",
        ),
    ],
)
def test_a_regex_that_backtracks_exponentially_is_matched_in_linear_time(
    match: dict[str, Any], refused: matching.Request, taken: matching.Request
) -> None:
    table = _regex_table(match)
    assert matching.select(table, refused) is None
    assert matching.select(table, taken) is not None


def test_a_regex_rewrite_that_backtracks_exponentially_runs_in_linear_time() -> None:
    table = _regex_table(
        {"uri": {"prefix": "/"}}, {"uriRegexRewrite": {"match": "/(a+)+b", "rewrite": "/x"}}
    )
    path = f"/{_MANY_A}!?q=1"
    selected = matching.select(table, _request(path))
    assert selected is not None
    assert matching.rewrite_path(selected, path) == path
    assert matching.rewrite_path(selected, f"/{_MANY_A}b/c") == "/x/c"


@pytest.mark.parametrize(
    ("rewrite", "path", "rewritten"),
    [
        pytest.param(r"/\2/\1", "/v2/a/b?x=1", "/b/a?x=1", id="groups"),
        pytest.param(r"/api\\\1", "/v2/a/b", "/api\\a", id="backslash"),
        pytest.param("/ü/\\1", "/v2/a/b", "/ü/a", id="utf8"),
    ],
)
def test_a_regex_rewrite_uses_re2s_syntax_as_envoy_does(
    rewrite: str, path: str, rewritten: str
) -> None:
    table = _regex_table(
        {"uri": {"prefix": "/v2/"}},
        {"uriRegexRewrite": {"match": "^/v2/([^/]*)/?(.*)$", "rewrite": rewrite}},
    )
    selected = matching.select(table, _request(path))
    assert selected is not None
    assert matching.rewrite_path(selected, path) == rewritten


def test_header_operations_remove_then_set_then_add() -> None:
    ops = routes.HeaderOps(set=(("x-a", "1"),), add=(("x-b", "2"),), remove=("x-c",))
    assert ops.apply([("x-a", "0"), ("x-b", "1"), ("x-c", "9"), ("host", "h")]) == [
        ("x-b", "1"),
        ("host", "h"),
        ("x-a", "1"),
        ("x-b", "2"),
    ]


@hypothesis.given(st.lists(st.integers(0, 100), min_size=2, max_size=5))
def test_each_destination_gets_as_many_rolls_as_its_weight(raw: list[int]) -> None:
    hypothesis.assume(sum(raw) > 0)
    weights = [w * 100 // sum(raw) for w in raw]
    weights[0] += 100 - sum(weights)
    route = routes.HttpRoute(
        "r",
        (),
        tuple(routes.Destination(f"h{i}", None, None, w) for i, w in enumerate(weights)),
    )
    counts = collections.Counter(matching.choose(route, roll).host for roll in range(100))
    assert {f"h{i}": w for i, w in enumerate(weights) if w} == dict(counts)


def test_a_ninety_ten_split_over_a_thousand_requests_lands_within_five_points() -> None:
    rng = random.Random(7)
    route = TABLE.routes[4]
    hits = collections.Counter(
        matching.choose(route, rng.randrange(100)).subset for _ in range(1000)
    )
    assert abs(hits["v1"] / 1000 - 0.9) <= 0.05


def test_rolls_outside_the_range_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        matching.choose(TABLE.routes[4], 100)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda h: h[4]["route"][1].update({"weight": 20}),
            "spec.http[4].route: weights add up to 110",
        ),
        (
            lambda h: h[1]["match"][0]["headers"]["cookie"].update({"regex": "("}),
            "spec.http[1].match[0].headers[cookie].regex: invalid regular expression",
        ),
        (
            lambda h: h[1]["match"][0]["headers"]["cookie"].update({"regex": "(a)\\1"}),
            "spec.http[1].match[0].headers[cookie].regex: invalid regular expression: "
            "backreference is not supported",
        ),
        (
            lambda h: h[2].update(
                {"rewrite": {"uriRegexRewrite": {"match": "^/v2/(.*)$", "rewrite": "/\\2"}}}
            ),
            "spec.http[2].rewrite.uriRegexRewrite.rewrite: \\2 refers to a group",
        ),
        (
            lambda h: h[4].update({"timeout": "soon"}),
            "spec.http[4].timeout: 'soon' is not a duration",
        ),
        (lambda h: h[0].pop("route"), "spec.http[0].route: needs at least one destination"),
    ],
)
def test_what_the_schema_would_refuse_is_a_translation_error_naming_the_field(
    change: Any, fragment: str
) -> None:
    spec = copy.deepcopy(VS)
    change(spec["spec"]["http"])
    with pytest.raises(routes.TrafficConfigError, match="VirtualService shop/reviews") as raised:
        routes.build_route_table(spec)
    assert fragment in str(raised.value)


DR: dict[str, Any] = {
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "host": "reviews",
        "trafficPolicy": {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1},
            },
            "outlierDetection": {
                "consecutive5xxErrors": 5,
                "interval": "1s",
                "baseEjectionTime": "30s",
            },
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {
                "name": "v2",
                "labels": {"version": "v2", "tier": "canary"},
                "trafficPolicy": {
                    "loadBalancer": {
                        "consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}
                    }
                },
            },
        ],
    },
}


def test_destination_rule_subsets_override_the_top_level_policy_part_by_part() -> None:
    rule = destinations.build_destination_rule(DR)
    assert rule.host == "reviews.shop.svc.cluster.local"
    top = rule.policy_for(None)
    assert top.load_balancer == destinations.LoadBalancer(destinations.Balancing.ROUND_ROBIN)
    assert top.connection_pool.max_connections == 1
    assert top.connection_pool.max_pending_requests == 1
    assert top.outlier_detection == destinations.OutlierDetection(5, 0, 1.0, 30.0, 10)
    v2 = rule.policy_for("v2")
    assert v2.load_balancer == destinations.LoadBalancer(
        destinations.Balancing.HASH, destinations.HashOn.COOKIE, "user"
    )
    assert v2.connection_pool == top.connection_pool  # not overridden: inherited
    assert rule.policy_for("v1") == top
    assert rule.policy_for("unknown") == top
    v2_subset = rule.subset("v2")
    assert v2_subset is not None
    assert v2_subset.selects({"version": "v2", "tier": "canary", "app": "reviews"})
    assert not v2_subset.selects({"version": "v2"})


def test_defaults_are_envoys() -> None:
    rule = destinations.build_destination_rule(
        {"metadata": {"name": "d", "namespace": "shop"}, "spec": {"host": "d.example.com"}}
    )
    assert rule.host == "d.example.com"
    assert rule.policy == destinations.TrafficPolicy()
    assert rule.policy.load_balancer.balancing is destinations.Balancing.LEAST_REQUEST
    assert rule.policy.outlier_detection is None
    assert rule.policy.connection_pool.max_connections == destinations.DEFAULT_MAX_CONNECTIONS
