"""What ztunnel does not enforce as written: the findings behind API warnings and the
ZtunnelAccepted status condition."""

from __future__ import annotations

from typing import Any

import pytest

from meshcore.policy import analysis, errors, spec
from meshcore.policy import authorization as authz
from tests.unit import policy_fixtures as f

HTTP_ALLOW = analysis.HTTP_IN_ALLOW
HTTP_DENY = analysis.HTTP_IN_DENY


def _found(obj: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    return [(u.path, u.reason) for u in analysis.find_unenforced(obj, **kwargs)]


CASES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    ("l4-only", f.ap(rules=[{"from": [f.source(principals=["a/ns/b/sa/c"])]}]), []),
    (
        "allow-methods",
        f.ap(rules=[{"to": [f.operation(methods=["GET"], ports=["80"])]}, {}]),
        [("spec.rules[0].to[0].operation.methods", HTTP_ALLOW)],
    ),
    (
        "deny-methods-beside-port",
        f.ap(action="DENY", rules=[{"to": [f.operation(methods=["GET"], ports=["80"])]}]),
        [("spec.rules[0].to[0].operation.methods", HTTP_DENY)],
    ),
    (
        "deny-http-only-entry",
        f.ap(action="DENY", rules=[{"to": [f.operation(paths=["/x"])]}]),
        [
            ("spec.rules[0].to[0].operation.paths", analysis.HTTP_EMPTIES_DENY_RULE),
            ("spec.rules", analysis.NO_RULE_LEFT_DENY),
        ],
    ),
    (
        "deny-http-only-entry-beside-l4-entry",
        f.ap(action="DENY", rules=[{"to": [f.operation(paths=["/x"]), f.operation(ports=["1"])]}]),
        [("spec.rules[0].to[0].operation.paths", analysis.HTTP_EMPTIES_DENY_ENTRY)],
    ),
    (
        "every-source-http-field",
        f.ap(
            rules=[
                {
                    "from": [
                        f.source(
                            requestPrincipals=["a"],
                            notRequestPrincipals=["b"],
                            remoteIpBlocks=["1.1.1.1"],
                            notRemoteIpBlocks=["2.2.2.2"],
                        )
                    ]
                }
            ]
        ),
        [
            ("spec.rules[0].from[0].source.requestPrincipals", HTTP_ALLOW),
            ("spec.rules[0].from[0].source.notRequestPrincipals", HTTP_ALLOW),
            ("spec.rules[0].from[0].source.remoteIpBlocks", HTTP_ALLOW),
            ("spec.rules[0].from[0].source.notRemoteIpBlocks", HTTP_ALLOW),
            ("spec.rules", analysis.NO_RULE_LEFT_ALLOW),
        ],
    ),
    (
        "every-operation-http-field",
        f.ap(
            rules=[
                {
                    "to": [
                        f.operation(
                            hosts=["a"],
                            notHosts=["b"],
                            methods=["GET"],
                            notMethods=["PUT"],
                            paths=["/"],
                            notPaths=["/x"],
                        )
                    ]
                },
                {},
            ]
        ),
        [
            (f"spec.rules[0].to[0].operation.{field}", HTTP_ALLOW)
            for field in ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
        ],
    ),
    (
        "http-condition-allow",
        f.ap(rules=[{"when": [f.when("request.headers[x-id]", ["1"])]}, {}]),
        [("spec.rules[0].when[0]", f"{HTTP_ALLOW} (key 'request.headers[x-id]')")],
    ),
    (
        "http-condition-deny",
        f.ap(action="DENY", rules=[{"when": [f.when("connection.sni", ["a"])]}, {}]),
        [("spec.rules[0].when[0]", f"{analysis.HTTP_CONDITION_IN_DENY} (key 'connection.sni')")],
    ),
    (
        "l4-conditions",
        f.ap(
            rules=[
                {
                    "when": [
                        f.when("source.ip", ["10.0.0.1"]),
                        f.when("source.namespace", ["a"]),
                        f.when("source.principal", ["td/ns/a/sa/b"]),
                        f.when("destination.ip", ["10.0.0.2"]),
                        f.when("destination.port", ["80"]),
                    ]
                }
            ]
        ),
        [],
    ),
    (
        "targetRefs-only-finding",
        f.ap(
            targetRefs=[{"kind": "Gateway", "name": "w"}],
            rules=[{"to": [f.operation(paths=["/"])]}],
        ),
        [("spec.targetRefs", analysis.TARGET_REFS)],
    ),
    (
        "targetRef",
        f.ap(targetRef={"kind": "Service", "name": "w"}),
        [("spec.targetRef", analysis.TARGET_REFS)],
    ),
    (
        "dry-run",
        f.ap(annotations={"istio.io/dry-run": "true"}, rules=[{}]),
        [("metadata.annotations['istio.io/dry-run']", analysis.DRY_RUN)],
    ),
    (
        "selector-without-labels",
        f.ap(selector={}),
        [("spec.selector", analysis.SELECTOR_WITHOUT_LABELS)],
    ),
    (
        "empty-entry",
        f.ap(rules=[{"from": [f.source()]}]),
        [
            ("spec.rules[0].from[0]", analysis.EMPTY_ENTRIES),
            ("spec.rules", analysis.NO_RULE_LEFT_ALLOW),
        ],
    ),
    (
        "empty-entry-beside-another",
        f.ap(rules=[{"from": [f.source(), f.source(namespaces=["a"])]}]),
        [("spec.rules[0].from[0]", analysis.EMPTY_ENTRY)],
    ),
    (
        "condition-without-values",
        f.ap(rules=[{"when": [f.when("source.ip")]}, {}]),
        [("spec.rules[0].when[0]", analysis.CONDITION_WITHOUT_VALUES)],
    ),
    (
        "spiffe-principal",
        f.ap(
            rules=[
                {
                    "from": [f.source(principals=["ok/ns/a/sa/b", "spiffe://td/ns/a/sa/b"])],
                    "when": [f.when("source.principal", not_values=["spiffe://x"])],
                }
            ]
        ),
        [
            ("spec.rules[0].from[0].source.principals[1]", analysis.SPIFFE_PRINCIPAL),
            ("spec.rules[0].when[0].notValues[0]", analysis.SPIFFE_PRINCIPAL),
        ],
    ),
    (
        "audit-is-rejected-not-warned",
        f.ap(action="AUDIT", rules=[{"to": [f.operation(paths=["/"])]}]),
        [],
    ),
]


@pytest.mark.parametrize(("obj", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_find_unenforced(obj: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert _found(obj, root_namespace=f.ROOT) == expected


@pytest.mark.parametrize(("obj", "_expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_never_match_summary_agrees_with_translation(obj: dict[str, Any], _expected: Any) -> None:
    """ "No rule left" is said exactly when the translation keeps none of several rules."""
    try:
        built = authz.build_authorization(obj, root_namespace=f.ROOT, dry_run_enabled=True)
    except errors.UnsupportedActionError:
        return
    if built is None:
        return
    said = any(u.path == "spec.rules" for u in analysis.find_unenforced(obj, dry_run_enabled=True))
    has_rules = bool((obj.get("spec") or {}).get("rules"))
    assert said == (has_rules and not built.rules)


def test_dry_run_not_reported_when_enabled() -> None:
    obj = f.ap(annotations={"istio.io/dry-run": "true"}, rules=[{}])
    assert analysis.find_unenforced(obj, dry_run_enabled=True) == []


def test_str_is_path_then_reason() -> None:
    [finding] = analysis.find_unenforced(f.ap(rules=[{"to": [f.operation(methods=["GET"])]}, {}]))
    assert str(finding) == f"spec.rules[0].to[0].operation.methods: {HTTP_ALLOW}"
    assert finding.category is analysis.Category.HTTP_ATTRIBUTE
    assert finding.attribute == "methods"
    assert finding.action is spec.PolicyAction.ALLOW


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (f.ap(action="AUDIT"), "ztunnel does not support the AUDIT action"),
        (
            f.ap(action="CUSTOM", provider={"name": "ext"}),
            "ztunnel does not support the CUSTOM action",
        ),
        (f.ap(action="CUSTOM", targetRefs=[{"kind": "Gateway", "name": "w"}]), None),
        (f.ap(action="DENY"), None),
        (f.ap(), None),
    ],
    ids=["audit", "custom", "custom-on-waypoint", "deny", "allow"],
)
def test_find_action_error(obj: dict[str, Any], message: str | None) -> None:
    assert analysis.find_action_error(obj) == message


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (f.ap(rules=[{"to": [f.operation(ports=["80"])]}]), ""),
        (
            f.ap(
                rules=[
                    {"to": [f.operation(paths=["/a"], methods=["GET"])]},
                    {"when": [f.when("request.auth.claims[iss]", ["x"])]},
                    {},
                ]
            ),
            "ztunnel does not support HTTP attributes (found: methods, paths, "
            "request.auth.claims[iss]). In ambient mode you must use a waypoint proxy to enforce "
            "HTTP rules. Within an ALLOW policy, rules matching HTTP attributes are omitted. "
            "This will be more restrictive than requested.",
        ),
        (
            f.ap(action="DENY", rules=[{"to": [f.operation(methods=["GET"], ports=["80"])]}]),
            "ztunnel does not support HTTP attributes (found: methods). In ambient mode you must "
            "use a waypoint proxy to enforce HTTP rules. DENY policy with HTTP attributes is "
            "enforced without the HTTP rules. This will be more restrictive than requested.",
        ),
        (
            f.ap(selector={}),
            f"spec.selector: {analysis.SELECTOR_WITHOUT_LABELS}.",
        ),
    ],
    ids=["nothing", "allow-http", "deny-http", "other-finding"],
)
def test_build_status_message(obj: dict[str, Any], message: str) -> None:
    assert analysis.build_status_message(analysis.find_unenforced(obj)) == message


def test_status_message_lists_http_first_then_the_rest() -> None:
    obj = f.ap(selector={}, rules=[{"to": [f.operation(methods=["GET"])]}])
    message = analysis.build_status_message(analysis.find_unenforced(obj))
    assert message.startswith("ztunnel does not support HTTP attributes (found: methods).")
    assert message.endswith(f"spec.rules: {analysis.NO_RULE_LEFT_ALLOW}.")
    assert f"spec.selector: {analysis.SELECTOR_WITHOUT_LABELS}." in message


def test_malformed_object_is_the_documented_error() -> None:
    with pytest.raises(errors.InvalidPolicyError) as invalid:
        analysis.find_unenforced({**f.ap(), "spec": {"rules": [{"to": "x"}]}})
    assert invalid.value.field == "spec.rules[0].to"
