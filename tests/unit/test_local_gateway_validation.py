"""The schemas of Gateway API's Gateway and HTTPRoute in the local API: a waypoint Gateway and an
HTTPRoute as Istio's docs write them pass; every error names its exact field path; the
warnings say nothing is acted on yet and name each field the translation leaves out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from controller.sources.local import gatewayschemas, validation

WAYPOINT: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "shop"},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}

_COOKIE_MATCH = {"type": "RegularExpression", "name": "cookie", "value": ".*u=1.*"}
REVIEWS_ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "rules": [
            {
                "name": "canary",
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/v2"},
                        "headers": [{"name": "X-Canary", "value": "true"}],
                    }
                ],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
                        },
                    },
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "X-Mesh", "value": "ambient"}],
                            "add": [{"name": "x-route", "value": "canary"}],
                            "remove": ["x-debug"],
                        },
                    },
                ],
                "backendRefs": [{"name": "reviews-v2", "port": 9080}],
            },
            {
                "matches": [{"headers": [_COOKIE_MATCH]}],
                "backendRefs": [
                    {"name": "reviews-v1", "port": 9080, "weight": 90},
                    {"kind": "Service", "name": "reviews-v2", "port": 9080, "weight": 10},
                ],
                "timeouts": {"request": "10s", "backendRequest": "500ms"},
            },
        ],
    },
}


def _errors(schema: validation.Schema, obj: dict[str, Any]) -> list[str]:
    return [str(e) for e in validation.validate(schema, obj)]


def _with(obj: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(obj)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def test_a_waypoint_gateway_and_an_http_route_as_istio_writes_them_pass() -> None:
    assert _errors(gatewayschemas.GATEWAY, WAYPOINT) == []
    assert _errors(gatewayschemas.HTTP_ROUTE, REVIEWS_ROUTE) == []


@pytest.mark.parametrize(
    "spec",
    [
        # An ingress-style Gateway of another class needs no HBONE listener.
        {
            "gatewayClassName": "istio",
            "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
                {"name": "https", "port": 443, "protocol": "HTTPS", "tls": {"mode": "Terminate"}},
            ],
            "addresses": [{"value": "10.0.0.1"}],
        },
        # A waypoint may have other listeners besides the HBONE one.
        {
            "gatewayClassName": "istio-waypoint",
            "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "mesh", "port": 15008, "protocol": "HBONE"},
            ],
        },
    ],
)
def test_other_gateways_pass(spec: dict[str, Any]) -> None:
    assert _errors(gatewayschemas.GATEWAY, _with(WAYPOINT, ["spec"], spec)) == []


def test_status_written_by_a_controller_passes() -> None:
    gateway = _with(
        WAYPOINT,
        ["status"],
        {
            "conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed"}],
            "addresses": [{"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}],
            "listeners": [{"name": "mesh", "attachedRoutes": 0}],
        },
    )
    route = _with(REVIEWS_ROUTE, ["status"], {"parents": [{"controllerName": "istio.io/x"}]})
    assert _errors(gatewayschemas.GATEWAY, gateway) == []
    assert _errors(gatewayschemas.HTTP_ROUTE, route) == []


_L0: list[str | int] = ["spec", "listeners", 0]


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (
            ["spec", "listeners"],
            [{"name": "http", "port": 80, "protocol": "HTTP"}],
            'spec.listeners: Invalid value: ["HTTP/80"]: a Gateway of class istio-waypoint '
            "needs a listener with protocol HBONE on port 15008 (Istio writes {name: mesh, "
            "port: 15008, protocol: HBONE})",
        ),
        ([*_L0, "port"], 15009, 'spec.listeners: Invalid value: ["HBONE/15009"]: a Gateway'),
        (
            ["spec", "listeners"],
            [
                {"name": "mesh", "port": 15008, "protocol": "HBONE"},
                {"name": "mesh", "port": 80, "protocol": "HTTP"},
            ],
            'spec.listeners[1].name: Duplicate value: "mesh"',
        ),
        (["spec", "listeners"], [], "spec.listeners: Required value"),
        (["spec", "gatewayClassName"], "", "spec.gatewayClassName: Required value"),
        ([*_L0, "name"], "Mesh_1", "spec.listeners[0].name: Invalid value"),
        ([*_L0, "port"], 0, "spec.listeners[0].port: Invalid value: 0: must be between 1 and"),
        ([*_L0, "protocol"], "GRPC", 'spec.listeners[0].protocol: Unsupported value: "GRPC"'),
        ([*_L0, "hostname"], "Bad_Host", "spec.listeners[0].hostname: Invalid"),
        ([*_L0, "tls"], "on", "spec.listeners[0].tls: Invalid value"),
        (["spec", "listener"], [], "spec.listener: Unknown field"),
        ([*_L0, "ports"], 1, "spec.listeners[0].ports: Unknown field"),
        (["spec", "addresses"], [{}] * 17, "spec.addresses: Too many: 17"),
    ],
)
def test_bad_gateways_name_the_field(path: list[str | int], value: Any, fragment: str) -> None:
    found = _errors(gatewayschemas.GATEWAY, _with(WAYPOINT, path, value))
    assert any(fragment in e for e in found), found


def test_a_gateway_without_its_required_fields_names_each() -> None:
    found = _errors(gatewayschemas.GATEWAY, _with(WAYPOINT, ["spec"], {}))
    assert found == ["spec.gatewayClassName: Required value", "spec.listeners: Required value"]


_RULE0: list[str | int] = ["spec", "rules", 0]
_RULE1: list[str | int] = ["spec", "rules", 1]
_MATCH0: list[str | int] = [*_RULE0, "matches", 0]
_MATCH1: list[str | int] = [*_RULE1, "matches", 0]
R0, R1, M0 = "spec.rules[0]", "spec.rules[1]", "spec.rules[0].matches[0]"
_MODIFIER = [*_RULE0, "filters", 1, "requestHeaderModifier"]


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (
            [*_MATCH0, "path"],
            {"type": "RegularExpression", "value": "/v2/(.*"},
            f'{M0}.path.value: Invalid value: "/v2/(.*": must be a valid RE2 regular expression',
        ),
        (
            [*_MATCH0, "path"],
            {"type": "RegularExpression", "value": "/(?!a).*"},
            f'{M0}.path.value: Invalid value: "/(?!a).*": must be a valid RE2 regular '
            "expression: lookahead is not supported",
        ),
        (
            [*_MATCH0, "headers", 0],
            {"type": "RegularExpression", "name": "x-canary", "value": "(a)\\1"},
            f'{M0}.headers[0].value: Invalid value: "(a)\\\\1": must be a valid RE2 regular '
            "expression: backreference is not supported (invalid escape sequence: \\1)",
        ),
        (
            [*_MATCH0, "path", "value"],
            "v2",
            f'{M0}.path.value: Invalid value: "v2": must be an absolute path, starting with '
            "'/', for PathPrefix",
        ),
        (
            [*_MATCH0, "path"],
            {"type": "Exact", "value": "items"},
            f'{M0}.path.value: Invalid value: "items": must be an absolute path',
        ),
        (
            [*_MATCH0, "path", "value"],
            "/v2//a",
            f"{M0}.path.value: Invalid value: \"/v2//a\": must not contain '//'",
        ),
        (
            [*_MATCH0, "path", "value"],
            "/v2/..",
            f"{M0}.path.value: Invalid value: \"/v2/..\": must not end with '/..'",
        ),
        (
            [*_MATCH0, "path", "value"],
            "/v 2",
            f'{M0}.path.value: Invalid value: "/v 2": must be a valid URL path',
        ),
        ([*_MATCH0, "path", "type"], "Prefix", f'{M0}.path.type: Unsupported value: "Prefix"'),
        (
            [*_MATCH0, "headers", 0],
            {"type": "RegularExpression", "name": "x-canary", "value": "tr(ue"},
            f'{M0}.headers[0].value: Invalid value: "tr(ue": must be a valid RE2 regular',
        ),
        (
            [*_MATCH0, "headers", 0, "name"],
            "x a",
            f'{M0}.headers[0].name: Invalid value: "x a": must be an HTTP header name',
        ),
        (
            [*_MATCH0, "headers"],
            [{"name": "X-Canary", "value": "1"}, {"name": "x-canary", "value": "2"}],
            f'{M0}.headers[1].name: Duplicate value: "x-canary"',
        ),
        ([*_MATCH0, "headers", 0], {"name": "x-canary"}, f"{M0}.headers[0].value: Required value"),
        (
            [*_MATCH0, "queryParams"],
            [{"type": "Prefix", "name": "q", "value": "1"}],
            f'{M0}.queryParams[0].type: Unsupported value: "Prefix"',
        ),
        ([*_MATCH0, "method"], "get", f'{M0}.method: Unsupported value: "get"'),
        (
            [*_RULE1, "backendRefs", 0],
            {"name": "reviews-v1", "weight": 90},
            f"{R1}.backendRefs[0].port: Required value: a backendRef to a Service needs a port",
        ),
        (
            [*_RULE1, "backendRefs", 0, "weight"],
            1_000_001,
            f"{R1}.backendRefs[0].weight: Invalid value: 1000001: must be between 0 and 1000000",
        ),
        (
            [*_RULE1, "backendRefs", 0, "weight"],
            "9",
            f'{R1}.backendRefs[0].weight: Invalid value: "9": must be of type integer',
        ),
        ([*_RULE1, "backendRefs", 0, "subset"], "v1", f"{R1}.backendRefs[0].subset: Unknown field"),
        ([*_RULE0, "match"], [], f"{R0}.match: Unknown field"),
        (["spec", "parentRefs", 0, "service"], "x", "spec.parentRefs[0].service: Unknown field"),
        (["spec", "parentRefs", 0], {"kind": "Service"}, "spec.parentRefs[0].name: Required"),
        (["spec", "hostnames"], ["Reviews.Example.com"], "spec.hostnames[0]: Invalid value"),
        (
            [*_RULE0, "filters", 1],
            {"type": "RequestHeaderModifier", "responseHeaderModifier": {"remove": ["server"]}},
            f"{R0}.filters[1].responseHeaderModifier: Forbidden: must not be set when type is "
            "RequestHeaderModifier",
        ),
        (
            [*_RULE0, "filters", 1],
            {"type": "RequestHeaderModifier"},
            f"{R0}.filters[1].requestHeaderModifier: Required value: type is RequestHeaderModifier",
        ),
        (
            [*_RULE0, "filters", 1],
            {"type": "Rewrite"},
            f'{R0}.filters[1].type: Unsupported value: "Rewrite"',
        ),
        (
            [*_RULE0, "filters", 1],
            {"type": "RequestRedirect", "requestRedirect": {"statusCode": 305}},
            f"{R0}.filters[1].requestRedirect.statusCode: Unsupported value: 305: supported "
            'values: "301", "302", "303", "307", "308"',
        ),
        (
            [*_RULE0, "filters", 1],
            {"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}},
            f"{R0}.filters[1].type: Forbidden: URLRewrite and RequestRedirect cannot both be used",
        ),
        (
            [*_RULE0, "filters", 1],
            {"type": "URLRewrite", "urlRewrite": {"hostname": "elsewhere.example.com"}},
            f'{R0}.filters[1].type: Duplicate value: "URLRewrite"',
        ),
        (
            [*_RULE0, "filters", 0, "urlRewrite", "path"],
            {"type": "ReplaceFullPath", "replacePrefixMatch": "/"},
            f"{R0}.filters[0].urlRewrite.path.replaceFullPath: Required value",
        ),
        (
            [*_RULE0, "filters", 0, "urlRewrite", "hostname"],
            "*.example.com",
            f"{R0}.filters[0].urlRewrite.hostname: Invalid value",
        ),
        (
            [*_MATCH0, "path"],
            {"type": "Exact", "value": "/v2"},
            f"{R0}.filters[0].urlRewrite.path.replacePrefixMatch: Forbidden: needs exactly one "
            "match in the rule, a PathPrefix",
        ),
        (
            [*_MODIFIER, "set"],
            [{"name": "x-a", "value": "1"}, {"name": "X-A", "value": "2"}],
            f'{R0}.filters[1].requestHeaderModifier.set[1].name: Duplicate value: "X-A"',
        ),
        (
            [*_MODIFIER, "remove"],
            ["x-debug", "X-Debug"],
            f'{R0}.filters[1].requestHeaderModifier.remove[1]: Duplicate value: "X-Debug"',
        ),
        (
            [*_RULE1, "timeouts", "request"],
            "1.5s",
            f'{R1}.timeouts.request: Invalid value: "1.5s": must be a duration',
        ),
        (
            [*_RULE1, "timeouts", "backendRequest"],
            "11s",
            f'{R1}.timeouts.backendRequest: Invalid value: "11s": must not be longer than the '
            "request timeout (10s)",
        ),
        ([*_RULE1, "name"], "canary", f'{R1}.name: Duplicate value: "canary"'),
        (["spec", "rules"], [{}] * 17, "spec.rules: Too many: 17: must have at most 16 items"),
        (
            [*_RULE0, "matches"],
            [{}] * 65,
            f"{R0}.matches: Too many: 65: must have at most 64 items",
        ),
        (
            ["spec", "rules"],
            [{"matches": [{}] * 60}] * 3,
            "spec.rules: Too many: 180: must have at most 128 matches in all",
        ),
    ],
)
def test_bad_http_routes_name_the_field(path: list[str | int], value: Any, fragment: str) -> None:
    found = _errors(gatewayschemas.HTTP_ROUTE, _with(REVIEWS_ROUTE, path, value))
    assert any(fragment in e for e in found), found


@pytest.mark.parametrize(
    "changes",
    [
        # A backendRef to another kind needs no port (the Gateway API rule is for Services).
        [([*_RULE1, "backendRefs", 0], {"group": "example.com", "kind": "Bucket", "name": "b"})],
        # A backend with weight 0 is valid: it gets no traffic.
        [([*_RULE1, "backendRefs", 0, "weight"], 0)],
        # 0s turns the request timeout off, so any backendRequest timeout is within it.
        [([*_RULE1, "timeouts"], {"request": "0s", "backendRequest": "1h30m"})],
        # A rule with no matches has the default match, PathPrefix "/", so a prefix rewrite fits.
        [([*_RULE0, "matches"], [])],
        # An exact match may be rewritten as a whole.
        [
            ([*_MATCH0, "path"], {"type": "Exact", "value": "/v2/items"}),
            (
                [*_RULE0, "filters", 0, "urlRewrite", "path"],
                {"type": "ReplaceFullPath", "replaceFullPath": "/items"},
            ),
        ],
        [([*_RULE0, "filters", 1], {"type": "RequestMirror", "requestMirror": {"backendRef": {}}})],
        [([*_MATCH1, "path"], {"type": "RegularExpression", "value": "/v[0-9]+/.*"})],
        [([*_MATCH1, "path"], {"type": "Exact"})],  # the value defaults to "/"
        [([*_MATCH0, "method"], "PATCH"), ([*_MATCH0, "headers", 0, "name"], "X-Request-Id")],
    ],
)
def test_edge_cases_gateway_api_allows_pass(changes: list[tuple[list[str | int], Any]]) -> None:
    route = REVIEWS_ROUTE
    for path, value in changes:
        route = _with(route, path, value)
    assert _errors(gatewayschemas.HTTP_ROUTE, route) == []


def test_a_redirect_rule_passes_with_each_status_code() -> None:
    for code in gatewayschemas.REDIRECT_CODES:
        config = {"scheme": "https", "hostname": "a.example.com", "port": 8443, "statusCode": code}
        config["path"] = {"type": "ReplaceFullPath", "replaceFullPath": "/moved"}
        redirect = {"type": "RequestRedirect", "requestRedirect": config}
        route = _with(REVIEWS_ROUTE, [*_RULE1, "filters"], [redirect])
        assert _errors(gatewayschemas.HTTP_ROUTE, route) == [], code


_OUT = ": accepted, not acted on by this mesh"
_NO_HOSTS = f'{_OUT} (only a parent Service, group "", gives hosts)'
_PREFIX_TO_ROOT = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}


def _warnings_for(change: Callable[[dict[str, Any]], None]) -> list[str]:
    route = copy.deepcopy(REVIEWS_ROUTE)
    change(route["spec"])
    return gatewayschemas.find_unenforced(route)


def test_route_warnings_name_the_fields_left_out() -> None:
    warnings = gatewayschemas.find_unenforced(REVIEWS_ROUTE)
    # The example's own fields are all translated, but for what a parentRef port and the
    # backendRequest timeout ask.
    assert warnings == [
        f"spec.parentRefs[0].port{_OUT}",
        f"spec.rules[1].timeouts.backendRequest{_OUT}",
    ]


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            lambda s: s["rules"][0]["filters"].append(
                {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}
            ),
            f"spec.rules[0].filters[2].requestMirror{_OUT}",
        ),
        (
            lambda s: s["rules"][1].update(
                {"filters": [{"type": "ExtensionRef", "extensionRef": {"name": "x"}}]}
            ),
            f"spec.rules[1].filters[0].extensionRef{_OUT}",
        ),
        (
            lambda s: s["rules"][1]["backendRefs"][0].update(
                {"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "a.example"}}]}
            ),
            f"spec.rules[1].backendRefs[0].filters[0].urlRewrite{_OUT}",
        ),
        (
            lambda s: s["rules"][1]["backendRefs"][1].update(
                {"group": "networking.istio.io", "kind": "Hostname"}
            ),
            f"spec.rules[1].backendRefs[1].kind{_OUT}",
        ),
        (lambda s: s["parentRefs"].append({"name": "waypoint"}), f"spec.parentRefs[1]{_NO_HOSTS}"),
        # Without group "", kind Service means gateway.networking.k8s.io's (the default).
        (
            lambda s: s["parentRefs"].append({"kind": "Service", "name": "ratings"}),
            f"spec.parentRefs[1]{_NO_HOSTS}",
        ),
        (
            lambda s: s["rules"][1].update(
                {"filters": [{"type": "RequestRedirect", "requestRedirect": {"port": 8443}}]}
            ),
            f"spec.rules[1].backendRefs{_OUT}",
        ),
        (
            lambda s: s["rules"][0]["filters"].__setitem__(
                0, {"type": "RequestRedirect", "requestRedirect": {"path": _PREFIX_TO_ROOT}}
            ),
            f"spec.rules[0].filters[0].requestRedirect.path{_OUT}",
        ),
    ],
)
def test_route_warnings_name_each_field_left_out(
    change: Callable[[dict[str, Any]], None], line: str
) -> None:
    assert line in _warnings_for(change)


def test_translated_fields_get_no_warning() -> None:
    """Header modifiers on a backend, query parameters, method matches and hostnames are
    translated, so they are not reported."""

    def change(spec: dict[str, Any]) -> None:
        spec["hostnames"] = ["reviews.example.com"]
        spec["parentRefs"][0].pop("port")
        spec["rules"][1].pop("timeouts")
        spec["rules"][0]["matches"][0].update(
            {"method": "GET", "queryParams": [{"name": "v", "value": "2"}]}
        )
        spec["rules"][1]["backendRefs"][0]["filters"] = [
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["server"]}}
        ]

    assert _warnings_for(change) == []


def test_gateway_warnings_name_fields_left_out() -> None:
    assert gatewayschemas.find_unenforced(WAYPOINT) == []  # a waypoint Gateway runs as written
    ingress = _with(WAYPOINT, ["spec", "gatewayClassName"], "istio")
    ingress["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": {"from": "All"}}
    ingress["spec"]["infrastructure"] = {"labels": {"a": "b"}}
    assert gatewayschemas.find_unenforced(ingress) == [
        f"spec.gatewayClassName{_OUT} (only istio-waypoint is)",
        f"spec.infrastructure{_OUT}",
        f"spec.listeners[0].allowedRoutes{_OUT}",
    ]


def test_a_waypoint_for_value_that_is_not_one_of_the_four_is_named() -> None:
    gateway = copy.deepcopy(WAYPOINT)
    for value in ("service", "workload", "all", "none"):
        gateway["metadata"]["labels"] = {"istio.io/waypoint-for": value}
        assert gatewayschemas.find_unenforced(gateway) == []
    gateway["metadata"]["labels"] = {"istio.io/waypoint-for": "workloads"}
    assert gatewayschemas.find_unenforced(gateway) == [
        "metadata.labels[istio.io/waypoint-for]: 'workloads' is not one of all, none, service,"
        " workload; this mesh takes it as 'all'"
    ]
