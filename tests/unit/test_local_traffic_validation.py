"""The schemas of Istio's VirtualService and DestinationRule in the local API: Istio's own
examples pass as written; every error names its field path; the store refuses a bad object
whole and answers a good one with what the mesh does not act on."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.sources.local import kinds, store, trafficschemas, validation
from meshcore import durations
from meshcore.kube import errors, resources

CANARY_VS: dict[str, Any] = {
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
            {
                "match": [{"headers": {"cookie": {"regex": "^(.*?;)?(user=premium)(;.*)?$"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "premium"}}],
            },
            {
                "match": [{"uri": {"prefix": "/v2"}}, {"method": {"exact": "GET"}}],
                "rewrite": {"uri": "/"},
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            },
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                    {
                        "destination": {"host": "reviews", "subset": "v2", "port": {"number": 80}},
                        "weight": 10,
                        "headers": {"response": {"set": {"x-split": "yes"}, "remove": ["server"]}},
                    },
                ],
                "timeout": "2s",
                "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,reset,503"},
                "fault": {
                    "delay": {"percentage": {"value": 0.5}, "fixedDelay": "1.5s"},
                    "abort": {"percentage": {"value": 10}, "httpStatus": 503},
                },
                "headers": {"request": {"add": {"x-mesh": "ambient"}}},
            },
        ],
    },
}

REVIEWS_DR: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "host": "reviews.shop.svc.cluster.local",
        "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "connectionPool": {
                "tcp": {"maxConnections": 1, "connectTimeout": "30ms"},
                "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 10},
            },
            "outlierDetection": {
                "consecutive5xxErrors": 5,
                "interval": "1s",
                "baseEjectionTime": "3m",
                "maxEjectionPercent": 100,
            },
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}}}
                },
            },
            {"name": "premium", "labels": {"tier": "premium"}},
        ],
    },
}


def _errors(schema: validation.Schema, obj: dict[str, Any]) -> list[str]:
    return [str(e) for e in validation.validate(schema, obj)]


def _vs_with(path: list[str | int], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(CANARY_VS)
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def test_istio_examples_pass_as_written() -> None:
    assert _errors(trafficschemas.VIRTUAL_SERVICE, CANARY_VS) == []
    # The cookie TTL of 0s (a session cookie) passes: the 1ms floor is for timeouts.
    assert _errors(trafficschemas.DESTINATION_RULE, REVIEWS_DR) == []


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (
            ["spec", "http", 1, "match", 0, "headers", "cookie"],
            {"regex": "user=(premium"},
            "spec.http[1].match[0].headers[cookie].regex: Invalid value: "
            '"user=(premium": must be a valid RE2 regular expression',
        ),
        (
            ["spec", "http", 1, "match", 0, "headers", "cookie"],
            {"regex": "^(?!admin).*"},
            "lookahead is not supported",
        ),
        (
            ["spec", "http", 1, "match", 0, "headers", "cookie"],
            {"regex": "(a)\\1"},
            "backreference is not supported",
        ),
        # Refused by RE2 itself, the engine the waypoint matches with: exactly what passes here
        # can be matched there, in time linear in the request.
        (
            ["spec", "http", 2, "match", 0, "uri"],
            {"regex": "/(a)\\1"},
            'spec.http[2].match[0].uri.regex: Invalid value: "/(a)\\\\1": must be a valid RE2 '
            "regular expression: backreference is not supported (invalid escape sequence: \\1)",
        ),
        (
            ["spec", "http", 2, "match", 0, "queryParams"],
            {"q": {"regex": "(?<=a)b"}},
            'spec.http[2].match[0].queryParams[q].regex: Invalid value: "(?<=a)b": must be a '
            "valid RE2 regular expression: lookbehind is not supported",
        ),
        (
            ["spec", "http", 2, "match", 0, "uri"],
            {"regex": "/v2\\Z"},  # Python's end of text; RE2 writes it \z
            'spec.http[2].match[0].uri.regex: Invalid value: "/v2\\\\Z": must be a valid RE2 '
            "regular expression: invalid escape sequence: \\Z",
        ),
        (
            ["spec", "http", 2, "rewrite"],
            {"uriRegexRewrite": {"match": "^/v2/(?=x)", "rewrite": "/"}},
            'spec.http[2].rewrite.uriRegexRewrite.match: Invalid value: "^/v2/(?=x)": must be '
            "a valid RE2 regular expression: lookahead is not supported",
        ),
        (
            ["spec", "http", 2, "rewrite"],
            {"uriRegexRewrite": {"match": "^/v2/(.*)$", "rewrite": "/\\2"}},
            'spec.http[2].rewrite.uriRegexRewrite.rewrite: Invalid value: "/\\\\2": must be a '
            "valid RE2 rewrite: \\2 refers to a group the pattern does not have (it has 1)",
        ),
        (
            ["spec", "http", 2, "rewrite"],
            {"uriRegexRewrite": {"match": "^/v2/(.*)$", "rewrite": "/\\g<1>"}},
            'spec.http[2].rewrite.uriRegexRewrite.rewrite: Invalid value: "/\\\\g<1>": must '
            "be a valid RE2 rewrite: '\\' must be followed by a digit or '\\'",
        ),
        (
            ["spec", "http", 3, "route", 1, "weight"],
            20,
            "spec.http[3].route: Invalid value: [90, 20]: the weights of the destinations add up "
            "to 110: they must add up to 100",
        ),
        (
            ["spec", "http", 3, "route", 1, "weight"],
            101,
            "spec.http[3].route[1].weight: Invalid value: 101: must be between 0 and 100",
        ),
        (
            ["spec", "http", 2, "match", 0, "uri"],
            {"prefix": "/v2", "exact": "/v2"},
            "spec.http[2].match[0].uri: Forbidden: a string match: only one of exact, prefix, "
            "regex may be set",
        ),
        (
            ["spec", "http", 2, "match", 0, "uri"],
            {},
            "spec.http[2].match[0].uri: Required value: a string match: one of exact, prefix, "
            "regex is required",
        ),
        (["spec", "http", 3, "timeout"], "10", 'spec.http[3].timeout: Invalid value: "10"'),
        (["spec", "http", 3, "timeout"], "500us", "must be at least 1ms"),
        (
            ["spec", "http", 3, "retries", "retryOn"],
            "5xx,sometimes",
            "'sometimes' is not a retry condition",
        ),
        (
            ["spec", "http", 3, "fault", "abort", "httpStatus"],
            700,
            "spec.http[3].fault.abort.httpStatus: Invalid value: 700: must be between 200 and 599",
        ),
        (
            ["spec", "http", 3, "fault", "delay", "percentage"],
            {"value": 150},
            "spec.http[3].fault.delay.percentage.value: Invalid value: 150",
        ),
        (["spec", "http", 0, "route", 0, "destination", "host"], "", "Required value"),
        (
            ["spec", "http", 0, "match", 0, "headers"],
            {"X-Canary": {"exact": "true"}},
            "must be a lower-case HTTP header name",
        ),
        (["spec", "http", 0, "routes"], [], "spec.http[0].routes: Unknown field"),
        (["spec", "hosts"], [], "spec.hosts: Required value"),
        (["spec", "hosts"], ["Reviews"], "spec.hosts[0]: Invalid value"),
        (
            ["spec", "http", 0, "redirect"],
            {"uri": "/elsewhere"},
            "spec.http[0]: Forbidden: only one of route, redirect, directResponse",
        ),
    ],
)
def test_bad_virtual_services_name_the_field(
    path: list[str | int], value: Any, fragment: str
) -> None:
    found = _errors(trafficschemas.VIRTUAL_SERVICE, _vs_with(path, value))
    assert any(fragment in e for e in found), found


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda s: s["subsets"].append({"name": "v1"}),
            'spec.subsets[3].name: Duplicate value: "v1"',
        ),
        (
            lambda s: s["trafficPolicy"]["loadBalancer"].update(
                {"consistentHash": {"httpHeaderName": "x-user"}}
            ),
            "spec.trafficPolicy.loadBalancer: Forbidden: only one of simple, consistentHash",
        ),
        (
            lambda s: s["trafficPolicy"]["loadBalancer"].update({"simple": "FASTEST"}),
            'spec.trafficPolicy.loadBalancer.simple: Unsupported value: "FASTEST"',
        ),
        (
            lambda s: s["trafficPolicy"]["outlierDetection"].update({"baseEjectionTime": "3"}),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime: Invalid value",
        ),
        (
            lambda s: s["trafficPolicy"]["connectionPool"]["tcp"].update({"maxConnections": -1}),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections: Invalid value: -1",
        ),
        (
            lambda s: s["subsets"][1]["trafficPolicy"]["loadBalancer"].update(
                {"consistentHash": {"useSourceIp": True, "httpHeaderName": "x-user"}}
            ),
            "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash: Forbidden: a consistent "
            "hash: only one of",
        ),
        (lambda s: s.pop("host"), "spec.host: Required value"),
        (lambda s: s["subsets"][0].update({"name": "V_1"}), "spec.subsets[0].name: Invalid value"),
    ],
)
def test_bad_destination_rules_name_the_field(change: Any, fragment: str) -> None:
    obj = copy.deepcopy(REVIEWS_DR)
    change(obj["spec"])
    found = _errors(trafficschemas.DESTINATION_RULE, obj)
    assert any(fragment in e for e in found), found


def test_warnings_name_unenforced_fields() -> None:
    vs = _vs_with(["spec", "http", 0, "corsPolicy"], {"allowOrigins": [{"exact": "*"}]})
    vs["spec"]["exportTo"] = ["."]
    warnings = trafficschemas.find_unenforced(vs)
    assert "spec.exportTo: accepted, not acted on by this mesh" in warnings
    assert "spec.http[0].corsPolicy: accepted, not acted on by this mesh" in warnings
    dr = copy.deepcopy(REVIEWS_DR)
    dr["spec"]["subsets"][0]["trafficPolicy"] = {"tls": {"mode": "SIMPLE"}}
    assert trafficschemas.find_unenforced(dr) == [
        "spec.subsets[0].trafficPolicy.tls: accepted, not acted on by this mesh"
    ]


def test_the_store_refuses_a_bad_virtual_service_whole_and_keeps_a_good_one() -> None:
    objects = store.ObjectStore(kinds.build_registry())
    objects.create(
        resources.NAMESPACES,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
    )
    bad = _vs_with(["spec", "http", 3, "route", 1, "weight"], 20)
    with pytest.raises(errors.InvalidError) as raised:
        objects.create(resources.VIRTUAL_SERVICES, bad, "shop")
    assert 'VirtualService "reviews" is invalid' in str(raised.value)
    assert "spec.http[3].route" in str(raised.value)
    assert objects.list(resources.VIRTUAL_SERVICES, "shop").items == []

    stored = objects.create(resources.DESTINATION_RULES, copy.deepcopy(REVIEWS_DR), "shop")
    assert stored["spec"]["subsets"][2]["name"] == "premium"
    created = objects.create(resources.VIRTUAL_SERVICES, copy.deepcopy(CANARY_VS), "shop")
    assert created["metadata"]["generation"] == 1


def _route_to(host: str, subset: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "hosts": [host],
            "http": [{"route": [{"destination": {"host": host, "subset": subset}}]}],
        },
    }


def _rule(namespace: str, host: str, *subsets: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "d", "namespace": namespace},
        "spec": {"host": host, "subsets": [{"name": s} for s in subsets]},
    }


@pytest.mark.parametrize(
    ("rules", "host", "subset", "defined"),
    [
        ([_rule("shop", "reviews", "v1")], "reviews", "v1", True),
        ([_rule("shop", "reviews", "v1")], "reviews", "v2", False),
        ([_rule("shop", "ratings", "v2")], "reviews", "v2", False),  # another host's subsets
        # The host's own namespace, and the root namespace, are looked in as Istio does.
        ([_rule("other", "ratings", "v2")], "ratings.other.svc.cluster.local", "v2", True),
        ([_rule("istio-system", "*.svc.cluster.local", "v2")], "reviews", "v2", True),
        ([_rule("elsewhere", "reviews.shop.svc.cluster.local", "v2")], "reviews", "v2", False),
    ],
)
def test_subsets_are_looked_up_where_istio_looks(
    rules: list[dict[str, Any]], host: str, subset: str, defined: bool
) -> None:
    def lookup(rtype: resources.ResourceType, namespace: str) -> list[dict[str, Any]]:
        assert rtype == resources.DESTINATION_RULES
        return [r for r in rules if r["metadata"]["namespace"] == namespace]

    found = trafficschemas.check_subsets(_route_to(host, subset), lookup)
    assert (found == []) is defined, found
    if not defined:
        assert [e.path for e in found] == ["spec.http[0].route[0].destination.subset"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1.5s", 1.5), ("250ms", 0.25), ("3m", 180.0), ("1h30m", 5400.0), (".5s", 0.5)],
)
def test_durations_parse_as_go_writes_them(text: str, seconds: float) -> None:
    assert durations.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "-1s", "1d", "1s ", "1.5.5s"])
def test_non_durations_are_refused(text: str) -> None:
    with pytest.raises(durations.DurationError):
        durations.parse_duration(text)
