"""meshcore.policy.http: AuthorizationPolicy per HTTP request, as a waypoint evaluates it.
Table-driven over the match fields, their `not` forms, `when` keys and the DENY/ALLOW order."""

from __future__ import annotations

from typing import Any

import pytest

from meshcore.policy import http, spec

FRONTEND = "cluster.local/ns/shop/sa/frontend"
BACKEND = "cluster.local/ns/shop/sa/backend"


def _policy(rules: list[dict[str, Any]], action: str = "ALLOW", **meta: Any) -> spec.PolicySpec:
    return spec.parse_authorization_policy(
        {
            "metadata": {
                "name": meta.get("name", "p"),
                "namespace": "shop",
                **meta.get("extra", {}),
            },
            "spec": {
                "action": action,
                "targetRefs": [{"kind": "Service", "group": "", "name": "api"}],
                "rules": rules,
            },
        }
    )


def _request(
    method: str = "GET",
    path: str = "/api/items",
    principal: str | None = FRONTEND,
    **extra: Any,
) -> http.RequestInfo:
    return http.RequestInfo(
        source_principal=principal,
        source_ip=extra.get("source_ip", "10.244.1.5"),
        destination_ip="10.96.0.20",
        destination_port=extra.get("port", 8080),
        host=extra.get("host", "api.shop.svc.cluster.local"),
        method=method,
        path=path,
        headers=tuple(extra.get("headers", ())),
    )


# The example: GET /api/* from principal frontend.
API_READERS = _policy(
    [
        {
            "from": [{"source": {"principals": [FRONTEND]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
        }
    ]
)


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (_request(), True),
        (_request(path="/api/items?page=2"), True),  # the query string is not part of the path
        (_request("POST"), False),
        (_request(principal=BACKEND), False),
        (_request(principal=None), False),  # plaintext: no principal
        (_request(path="/admin"), False),
    ],
    ids=["get-api", "query", "post", "other-principal", "no-principal", "other-path"],
)
def test_get_api_from_frontend_only(request_: http.RequestInfo, allowed: bool) -> None:
    decision = http.evaluate([API_READERS], request_)
    assert decision.is_allowed is allowed
    if allowed:
        assert (decision.policy, decision.rule) == (API_READERS.ref, 0)
    else:
        assert decision.verdict is http.Verdict.NOT_ALLOWED


@pytest.mark.parametrize(
    ("field", "values", "request_", "matches"),
    [
        ("principals", ["*"], _request(), True),
        ("principals", ["*"], _request(principal=None), False),
        ("principals", ["*/sa/frontend"], _request(), True),
        ("principals", ["cluster.local/ns/shop/*"], _request(principal=BACKEND), True),
        ("notPrincipals", [FRONTEND], _request(principal=BACKEND), True),
        ("notPrincipals", [FRONTEND], _request(), False),
        ("namespaces", ["shop"], _request(), True),
        ("namespaces", ["other"], _request(), False),
        ("notNamespaces", ["other"], _request(), True),
        ("serviceAccounts", ["frontend"], _request(), True),  # the policy's own namespace
        ("serviceAccounts", ["shop/frontend"], _request(), True),
        ("serviceAccounts", ["other/frontend"], _request(), False),
        ("ipBlocks", ["10.244.0.0/16"], _request(), True),
        ("notIpBlocks", ["10.244.1.5"], _request(), False),
        ("requestPrincipals", ["*"], _request(), False),  # no JWT here
        ("notRequestPrincipals", ["*"], _request(), True),
    ],
)
def test_source_fields(
    field: str, values: list[str], request_: http.RequestInfo, matches: bool
) -> None:
    policy = _policy([{"from": [{"source": {field: values}}]}])
    assert http.evaluate([policy], request_).is_allowed is matches


@pytest.mark.parametrize(
    ("field", "values", "request_", "matches"),
    [
        ("hosts", ["API.shop.svc.cluster.local"], _request(), True),  # without case
        ("hosts", ["*.cluster.local"], _request(), True),
        ("notHosts", ["api.*"], _request(), False),
        ("ports", ["8080"], _request(), True),
        ("notPorts", ["8080"], _request(), False),
        ("methods", ["GET", "HEAD"], _request("HEAD"), True),
        ("notMethods", ["DELETE"], _request("DELETE"), False),
        ("paths", ["/api/items"], _request(), True),
        ("paths", ["*/items"], _request(), True),
        ("paths", ["/api/{*}"], _request(), True),
        ("paths", ["/api/{*}"], _request(path="/api/a/b"), False),
        ("paths", ["/api/{**}"], _request(path="/api/a/b"), True),
        ("paths", ["/{*}/items"], _request(), True),
        ("notPaths", ["/admin*"], _request(path="/admin/x"), False),
    ],
)
def test_operation_fields(
    field: str, values: list[str], request_: http.RequestInfo, matches: bool
) -> None:
    policy = _policy([{"to": [{"operation": {field: values}}]}])
    assert http.evaluate([policy], request_).is_allowed is matches


@pytest.mark.parametrize(
    ("condition", "request_", "matches"),
    [
        (
            {"key": "request.headers[x-role]", "values": ["admin"]},
            _request(headers=[("x-role", "admin")]),
            True,
        ),
        (
            {"key": "request.headers[X-Role]", "values": ["adm*"]},
            _request(headers=[("x-role", "admin")]),
            True,
        ),
        ({"key": "request.headers[x-role]", "values": ["admin"]}, _request(), False),
        (
            {"key": "request.headers[x-role]", "notValues": ["guest"]},
            _request(headers=[("x-role", "guest")]),
            False,
        ),
        ({"key": "source.ip", "values": ["10.244.1.0/24"]}, _request(), True),
        ({"key": "source.namespace", "values": ["shop"]}, _request(), True),
        ({"key": "source.principal", "values": [FRONTEND]}, _request(principal=BACKEND), False),
        ({"key": "destination.port", "values": ["8080"]}, _request(), True),
        ({"key": "destination.ip", "notValues": ["10.96.0.0/12"]}, _request(), False),
        ({"key": "request.auth.claims[iss]", "values": ["*"]}, _request(), False),
    ],
)
def test_when_conditions(
    condition: dict[str, Any], request_: http.RequestInfo, matches: bool
) -> None:
    policy = _policy([{"when": [condition]}])
    assert http.evaluate([policy], request_).is_allowed is matches


def test_deny_wins_then_allow_decides_and_no_allow_allows() -> None:
    deny_post = _policy([{"to": [{"operation": {"methods": ["POST"]}}]}], "DENY", name="deny")
    request = _request("POST")
    decision = http.evaluate([API_READERS, deny_post], request)
    assert decision.verdict is http.Verdict.EXPLICITLY_DENIED
    assert decision.policy == deny_post.ref
    assert http.evaluate([deny_post], _request()).is_allowed  # no ALLOW policy: allowed
    assert http.evaluate([], request).is_allowed


def test_rules_entries_and_conditions_combine_as_istio_says() -> None:
    # Entries of `from` OR; `from`, `to` and `when` AND.
    policy = _policy(
        [
            {
                "from": [
                    {"source": {"principals": [BACKEND]}},
                    {"source": {"namespaces": ["shop"], "notPrincipals": [BACKEND]}},
                ],
                "to": [{"operation": {"methods": ["GET"]}}],
                "when": [{"key": "request.headers[x-ok]", "values": ["1"]}],
            }
        ]
    )
    ok = [("x-ok", "1")]
    assert http.evaluate([policy], _request(headers=ok)).is_allowed
    assert http.evaluate([policy], _request(principal=BACKEND, headers=ok)).is_allowed
    assert not http.evaluate([policy], _request(headers=ok, method="PUT")).is_allowed
    assert not http.evaluate([policy], _request()).is_allowed
    # A rule `{}` matches everything; a policy without rules nothing.
    assert http.evaluate([_policy([{}])], _request(principal=None)).is_allowed
    assert not http.evaluate([_policy([])], _request()).is_allowed


def test_dry_run_audit_and_custom_policies_do_not_decide() -> None:
    dry = _policy([{}], "DENY", extra={"annotations": {"istio.io/dry-run": "true"}}, name="dry")
    audit = _policy([{}], "AUDIT", name="audit")
    custom = _policy([{}], "CUSTOM", name="custom")
    assert http.evaluate([dry, audit, custom], _request()).is_allowed
    assert http.evaluate([dry, API_READERS], _request("POST")).verdict is http.Verdict.NOT_ALLOWED
