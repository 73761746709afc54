"""meshcore.traffic.httproutes: a Gateway API HTTPRoute translated to the routes a VirtualService
becomes, and requests taken through them with `matching` as Gateway API says they go."""

from __future__ import annotations

import collections
import copy
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest

from controller.sources.local import gatewayschemas, validation
from meshcore.traffic import httproutes, matching, routes

EXACT, PREFIX, REGEX = routes.MatchKind.EXACT, routes.MatchKind.PREFIX, routes.MatchKind.REGEX


def _filter(kind: str, **config: Any) -> dict[str, Any]:
    return {"type": kind, gatewayschemas.FILTER_CONFIG[kind]: config}


def _modify(kind: str, value: str) -> dict[str, str]:
    """A path modifier: ReplaceFullPath or ReplacePrefixMatch, to `value`."""
    return {"type": kind, kind[0].lower() + kind[1:]: value}


def _path(kind: str, value: str) -> dict[str, Any]:
    return {"path": {"type": kind, "value": value}}


def _ones(*names: str) -> list[dict[str, str]]:
    """Header or query parameter conditions: each name equal to "1"."""
    return [{"name": name, "value": "1"} for name in names]


ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "parentRefs": [
            {"group": "", "kind": "Service", "name": "reviews", "port": 9080},
            {"group": "core", "kind": "Service", "name": "ratings", "namespace": "other"},
            {"name": "waypoint"},  # a Gateway: it gives no host
        ],
        "hostnames": ["reviews.example.com"],
        "rules": [
            # Written first but ranked last: a prefix "/" is the least specific match.
            {"name": "default", "backendRefs": [{"name": "reviews-v1", "port": 9080}]},
            {
                "name": "canary",
                "matches": [
                    {
                        **_path("PathPrefix", "/v2"),
                        "headers": [{"name": "X-Canary", "value": "true"}],
                    }
                ],
                "filters": [
                    _filter(
                        "URLRewrite",
                        hostname="reviews.internal",
                        path=_modify("ReplacePrefixMatch", "/"),
                    ),
                    _filter(
                        "RequestHeaderModifier",
                        set=[{"name": "X-Mesh", "value": "ambient"}],
                        remove=["X-Debug"],
                    ),
                ],
                "backendRefs": [
                    {"name": "reviews-v2", "port": 9080, "weight": 90},
                    {"name": "reviews-v3", "namespace": "beta", "port": 9080, "weight": 10},
                ],
                "timeouts": {"request": "10s"},
            },
            {
                "name": "items",
                "matches": [
                    {**_path("Exact", "/items"), "method": "DELETE"},
                    {
                        **_path("RegularExpression", "/items/[0-9]+"),
                        "queryParams": _ones("force"),
                    },
                ],
                "filters": [
                    _filter("ResponseHeaderModifier", add=[{"name": "X-Items", "value": "1"}])
                ],
                "backendRefs": [
                    {
                        "name": "items",
                        "port": 8080,
                        "filters": [
                            _filter("RequestHeaderModifier", add=[{"name": "X-B", "value": "b"}])
                        ],
                    }
                ],
            },
            {
                "name": "moved",
                "matches": [_path("PathPrefix", "/old/")],
                "filters": [
                    _filter(
                        "RequestRedirect",
                        scheme="https",
                        hostname="reviews.example.com",
                        path=_modify("ReplaceFullPath", "/new"),
                    )
                ],
            },
        ],
    },
}

TABLE = httproutes.build_route_table(ROUTE)


def _request(path: str = "/", method: str = "GET", **headers: str) -> matching.Request:
    pairs = tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return matching.Request(method, path, "reviews", headers=pairs, port=9080)


def _selected(table: routes.RouteTable, request: matching.Request) -> matching.Selected:
    selected = matching.select(table, request)
    assert selected is not None
    return selected


def _route(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "r", "namespace": "shop"}, "spec": spec}


def _rules(*rules: dict[str, Any]) -> dict[str, Any]:
    return _route({"rules": list(rules)})


def _rule(**fields: Any) -> dict[str, Any]:
    return _rules({"backendRefs": [{"name": "b", "port": 80}], **fields})


def test_the_example_passes_the_schema() -> None:
    assert validation.validate(gatewayschemas.HTTP_ROUTE, ROUTE) == []


def test_parent_services_and_hostnames_give_the_hosts() -> None:
    assert TABLE.namespace == "shop"
    assert TABLE.name == "reviews"
    assert TABLE.hosts == (
        "reviews.shop.svc.cluster.local",
        "ratings.other.svc.cluster.local",
        "reviews.example.com",
    )
    other = httproutes.build_route_table(ROUTE, domain="mesh.test")
    assert other.hosts[0] == "reviews.shop.svc.mesh.test"


def test_a_service_without_group_is_gateway_apis_kind_and_gives_no_host() -> None:
    table = httproutes.build_route_table(
        _route({"parentRefs": [{"kind": "Service", "name": "reviews"}], "rules": []})
    )
    assert table.hosts == ()


def test_rules_become_routes_ranked_as_gateway_api_says() -> None:
    # Exact first, then prefixes longest first, then regexes, each match a route of its own.
    assert [r.name for r in TABLE.routes] == ["items", "moved", "canary", "default", "items"]
    items_exact, moved, canary, default, items_regex = TABLE.routes
    match = routes.RequestMatch
    assert items_exact.matches == (
        match(uri=routes.StringMatch(EXACT, "/items"), method=routes.StringMatch(EXACT, "DELETE")),
    )
    force = (("force", routes.StringMatch(EXACT, "1")),)
    assert items_regex.matches == (
        match(uri=routes.StringMatch(REGEX, "/items/[0-9]+"), query_params=force),
    )
    # A PathPrefix compares whole segments: exact "/v2" or prefix "/v2/".
    canary_header = (("x-canary", routes.StringMatch(EXACT, "true")),)
    assert canary.matches == (
        match(uri=routes.StringMatch(EXACT, "/v2"), headers=canary_header),
        match(uri=routes.StringMatch(PREFIX, "/v2/"), headers=canary_header),
    )
    assert moved.matches[0].uri == routes.StringMatch(EXACT, "/old")
    # No matches: Gateway API's default, PathPrefix "/".
    assert default.matches == (match(uri=routes.StringMatch(PREFIX, "/")),)
    assert default.name == "default"


def test_a_rule_without_a_name_is_named_after_the_route_and_its_index() -> None:
    table = httproutes.build_route_table(
        _rules(
            {"backendRefs": [{"name": "a", "port": 80}]},
            {"name": "b", "backendRefs": [{"name": "b", "port": 80}]},
            {"backendRefs": [{"name": "c", "port": 80}]},
        )
    )
    # All three match the same (prefix "/"), so they keep their written order.
    assert [r.name for r in table.routes] == ["r.0", "b", "r.2"]
    assert [r.destinations[0].host[:2] for r in table.routes] == ["a.", "b.", "c."]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (_path("PathPrefix", "/"), _path("Exact", "/")),
        ({"path": {"value": "/a"}}, {"path": {"value": "/a/b"}}),
        (_path("RegularExpression", "/a.*"), {"path": {"value": "/a"}}),
        ({}, {"method": "GET"}),
        ({"method": "GET"}, {"method": "GET", "headers": _ones("x")}),
        ({"headers": _ones("x")}, {"headers": _ones("y"), "queryParams": _ones("q")}),
        ({"headers": _ones("x")}, {"headers": _ones("x", "y")}),
    ],
)
def test_the_more_specific_match_wins_whatever_the_order(
    earlier: dict[str, Any], later: dict[str, Any]
) -> None:
    table = httproutes.build_route_table(
        _rules(
            {"name": "earlier", "matches": [earlier], "backendRefs": [{"name": "a"}]},
            {"name": "later", "matches": [later], "backendRefs": [{"name": "b"}]},
        )
    )
    request = matching.Request("GET", "/a/b?q=1", "r", headers=(("x", "1"), ("y", "1")))
    if later.get("path", {}).get("type") == "Exact":
        request = matching.Request("GET", "/", "r")
    assert [r.name for r in table.routes] == ["later", "earlier"]
    assert _selected(table, request).route.name == "later"


def test_filters_and_timeouts_are_translated() -> None:
    canary = TABLE.routes[2]
    assert canary.timeout == 10.0
    assert canary.request_headers == routes.HeaderOps(
        set=(("x-mesh", "ambient"),), remove=("x-debug",)
    )
    assert canary.rewrite is not None
    assert canary.rewrite.authority == "reviews.internal"
    items = TABLE.routes[0]
    assert items.response_headers == routes.HeaderOps(add=(("x-items", "1"),))
    assert items.destinations[0].request_headers == routes.HeaderOps(add=(("x-b", "b"),))
    assert items.timeout is None


def test_a_redirect_rule_answers_with_the_redirect() -> None:
    moved = TABLE.routes[1]
    assert moved.redirect == routes.Redirect(
        uri="/new", authority="reviews.example.com", scheme="https", port=None, status=302
    )
    assert moved.destinations == ()
    assert moved.direct_response is None
    prefix = httproutes.build_route_table(
        _rule(
            filters=[
                _filter(
                    "RequestRedirect",
                    statusCode=301,
                    port=8443,
                    path=_modify("ReplacePrefixMatch", "/v2"),
                )
            ]
        )
    )
    # A redirect's uri replaces the whole path; a prefix redirect keeps the path as it came
    # (find_unenforced says so).
    assert prefix.routes[0].redirect == routes.Redirect(
        uri=None, authority=None, scheme=None, port=8443, status=301
    )


@pytest.mark.parametrize(
    ("timeouts", "seconds"),
    [({"request": "500ms"}, 0.5), ({"request": "1h30m"}, 5400.0), ({"request": "0s"}, None)],
)
def test_request_timeouts_in_seconds_and_0s_is_none(
    timeouts: dict[str, str], seconds: float | None
) -> None:
    table = httproutes.build_route_table(_rule(timeouts=timeouts))
    assert table.routes[0].timeout == seconds


@pytest.mark.parametrize(
    ("weights", "percentages"),
    [
        ([90, 10], [90, 10]),
        ([None, None], [50, 50]),  # the default weight is 1
        ([1, 1, 1], [34, 33, 33]),
        ([1, 2], [33, 67]),
        ([2, 1, 1], [50, 25, 25]),
        ([1, 1, 1, 1, 1, 1, 1], [15, 15, 14, 14, 14, 14, 14]),
        ([5], [100]),
        ([1, 0], [100, 0]),
        ([0, 3, 0, 1], [0, 75, 0, 25]),
        ([999_999, 1], [100, 0]),
    ],
)
def test_weights_become_percentages_adding_up_to_100(
    weights: list[int | None], percentages: list[int]
) -> None:
    refs = [{"name": f"b{i}", "port": 80} for i in range(len(weights))]
    for ref, weight in zip(refs, weights, strict=True):
        if weight is not None:
            ref["weight"] = weight
    table = httproutes.build_route_table(_rules({"backendRefs": refs}))
    route = table.routes[0]
    assert [d.weight for d in route.destinations] == percentages
    assert sum(d.weight for d in route.destinations) == routes.FULL_WEIGHT
    assert route.direct_response is None
    counts = collections.Counter(matching.choose(route, roll).host for roll in range(100))
    assert {f"b{i}.shop.svc.cluster.local": p for i, p in enumerate(percentages) if p} == counts


@pytest.mark.parametrize("backend_refs", [[{"name": "a", "weight": 0}] * 2, []])
def test_a_rule_with_nowhere_to_send_answers_500(backend_refs: list[dict[str, Any]]) -> None:
    table = httproutes.build_route_table(_rules({"backendRefs": backend_refs}))
    route = table.routes[0]
    assert route.destinations == ()
    assert route.direct_response == routes.DirectResponse(500)


@hypothesis.given(st.lists(st.integers(0, 1_000_000), min_size=1, max_size=16))
def test_percentages_add_up_and_stay_within_a_point_of_the_share(weights: list[int]) -> None:
    shares = httproutes.percentages(weights)
    total = sum(weights)
    if total == 0:
        assert shares == [0] * len(weights)
        return
    assert sum(shares) == routes.FULL_WEIGHT
    for weight, share in zip(weights, shares, strict=True):
        assert abs(share - weight * routes.FULL_WEIGHT / total) < 1
        if weight == 0:
            assert share == 0


@pytest.mark.parametrize(
    ("request_", "rule"),
    [
        (_request("/v2", x_canary="true"), "canary"),
        (_request("/v2/", x_canary="true"), "canary"),
        (_request("/v2/items?x=1", x_canary="true"), "canary"),
        (_request("/v2?x=1", x_canary="true"), "canary"),
        # Path segments: /v2 does not take /v2x.
        (_request("/v2x", x_canary="true"), "default"),
        (_request("/v2/items", x_canary="false"), "default"),
        (_request("/items", "DELETE"), "items"),
        (_request("/items?force=1", "DELETE"), "items"),
        (_request("/items", "GET"), "default"),
        # As in Istio, any prefix outranks a regex: the catch-all "/" takes these.
        (_request("/items/12?force=1"), "default"),
        (_request("/old/page"), "moved"),
        (_request("/old"), "moved"),  # "/old/" and "/old" are the same prefix
        (_request("/older"), "default"),
        (_request("/"), "default"),
    ],
)
def test_requests_take_the_rule_gateway_api_gives_them(
    request_: matching.Request, rule: str
) -> None:
    assert _selected(TABLE, request_).route.name == rule


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/items/12?force=1", "items"),
        ("/items/12?force=0", None),
        ("/items/12/more?force=1", None),  # a regex matches the whole path
        ("/x/items/12?force=1", None),
    ],
)
def test_a_regex_match_takes_what_no_prefix_takes(path: str, rule: str | None) -> None:
    spec = copy.deepcopy(ROUTE["spec"])
    del spec["rules"][0]  # the catch-all
    table = httproutes.build_route_table(_route(spec))
    selected = matching.select(table, _request(path))
    assert (selected.route.name if selected else None) == rule


# The audit's finding: with 40 'a's Python's backtracking `re` would take hours on these, so a
# regression hangs (pytest-timeout fails it) rather than stalling the waypoint.
_MANY_A = "a" * 40


@pytest.mark.parametrize(
    ("match", "refused", "taken"),
    [
        pytest.param(
            _path("RegularExpression", "/(a+)+$"),
            _request(f"/{_MANY_A}!"),
            _request(f"/{_MANY_A}"),
            id="path",
        ),
        pytest.param(
            {"headers": [{"type": "RegularExpression", "name": "X-Id", "value": "(a+)+$"}]},
            _request(x_id=f"{_MANY_A}!"),
            _request(x_id=_MANY_A),
            id="header",
        ),
        pytest.param(
            {"queryParams": [{"type": "RegularExpression", "name": "q", "value": "(a+)+$"}]},
            _request(f"/?q={_MANY_A}!"),
            _request(f"/?q={_MANY_A}"),
            id="query-parameter",
        ),
    ],
)
def test_a_regex_that_backtracks_exponentially_is_matched_in_linear_time(
    match: dict[str, Any], refused: matching.Request, taken: matching.Request
) -> None:
    table = httproutes.build_route_table(_rule(matches=[match]))
    assert matching.select(table, refused) is None
    assert matching.select(table, taken) is not None


def test_a_ninety_ten_split_sends_each_roll_to_its_backend() -> None:
    route = _selected(TABLE, _request("/v2", x_canary="true")).route
    counts = collections.Counter(matching.choose(route, roll).host for roll in range(100))
    assert counts == {
        "reviews-v2.shop.svc.cluster.local": 90,
        "reviews-v3.beta.svc.cluster.local": 10,
    }
    assert [d.port for d in route.destinations] == [9080, 9080]
    assert {d.subset for d in route.destinations} == {None}


# Gateway API's table for ReplacePrefixMatch (HTTPPathModifier), and a query string kept.
@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "rewritten"),
    [
        ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz", "/foo", "/xyz"),
        ("/foo", "/xyz", "/foo/", "/xyz/"),
        ("/foo", "", "/foo/bar", "/bar"),
        ("/foo", "", "/foo/", "/"),
        ("/foo", "", "/foo", "/"),
        ("/foo", "/", "/foo/", "/"),
        ("/foo", "/", "/foo", "/"),
        ("/foo", "/", "/foo/bar?x=1", "/bar?x=1"),
        ("/", "/xyz", "/bar", "/xyz/bar"),
        ("/a.b", "/c", "/a.b/d", "/c/d"),  # the prefix is literal, not a regex
    ],
)
def test_replace_prefix_match_follows_gateway_apis_table(
    prefix: str, replacement: str, path: str, rewritten: str
) -> None:
    table = httproutes.build_route_table(
        _rule(
            matches=[_path("PathPrefix", prefix)],
            filters=[_filter("URLRewrite", path=_modify("ReplacePrefixMatch", replacement))],
        )
    )
    assert matching.rewrite_path(_selected(table, _request(path)), path) == rewritten


@pytest.mark.parametrize(
    ("match", "path", "rewritten"),
    [
        (_path("PathPrefix", "/v2"), "/v2/items?x=1", "/new\\path?x=1"),
        (_path("Exact", "/v2"), "/v2", "/new\\path"),
        (_path("RegularExpression", "/v[0-9]/.*"), "/v3/a/b", "/new\\path"),
    ],
)
def test_replace_full_path_replaces_the_whole_path_and_keeps_the_query(
    match: dict[str, Any], path: str, rewritten: str
) -> None:
    table = httproutes.build_route_table(
        _rule(
            matches=[match],
            filters=[_filter("URLRewrite", path=_modify("ReplaceFullPath", "/new\\path"))],
        )
    )
    assert matching.rewrite_path(_selected(table, _request(path)), path) == rewritten


def test_the_canary_rewrite_drops_the_prefix_end_to_end() -> None:
    selected = _selected(TABLE, _request("/v2/items?x=1", x_canary="true"))
    assert matching.rewrite_path(selected, "/v2/items?x=1") == "/items?x=1"
    assert selected.route.request_headers.apply([("x-debug", "1"), ("x-mesh", "off")]) == [
        ("x-mesh", "ambient")
    ]


def test_a_repeated_header_condition_counts_once_the_first() -> None:
    table = httproutes.build_route_table(
        _rule(matches=[{"headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}])
    )
    assert table.routes[0].matches[0].headers == (("x-a", routes.StringMatch(EXACT, "1")),)


_R0 = "HTTPRoute shop/r: spec.rules[0]"
_PREFIX_REWRITE = _filter("URLRewrite", path=_modify("ReplacePrefixMatch", "/"))


def _r(**rule: Any) -> dict[str, Any]:
    return {"rules": [rule]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            _r(matches=[_path("RegularExpression", "(a")]),
            f"{_R0}.matches[0].path.value: invalid regular expression",
        ),
        (
            _r(matches=[_path("RegularExpression", "/(a)\\1")]),
            f"{_R0}.matches[0].path.value: invalid regular expression: backreference is not",
        ),
        (_r(matches=[_path("Prefix", "/")]), f"{_R0}.matches[0].path.type: unsupported"),
        (_r(backendRefs=[{"port": 80}]), f"{_R0}.backendRefs[0].name: required"),
        (_r(backendRefs=[{"name": "a", "weight": -1}]), f"{_R0}.backendRefs[0].weight: must be"),
        (_r(timeouts={"request": "soon"}), f"{_R0}.timeouts.request: 'soon' is not a duration"),
        (
            _r(matches=[_path("Exact", "/a")], filters=[_PREFIX_REWRITE]),
            f"{_R0}.filters[0].urlRewrite.path: ReplacePrefixMatch needs a PathPrefix match",
        ),
        (
            {"parentRefs": [{"group": "", "kind": "Service"}]},
            "HTTPRoute shop/r: spec.parentRefs[0].name: required",
        ),
        ({"rules": "all"}, "HTTPRoute shop/r: malformed spec (AttributeError"),
    ],
)
def test_malformed_routes_raise_naming_the_object_and_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(routes.TrafficConfigError) as caught:
        httproutes.build_route_table(_route(spec))
    assert str(caught.value).startswith(message), str(caught.value)


def test_translation_leaves_the_input_alone() -> None:
    before = copy.deepcopy(ROUTE)
    httproutes.build_route_table(ROUTE)
    assert before == ROUTE
