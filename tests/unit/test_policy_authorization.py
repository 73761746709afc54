"""AuthorizationPolicy -> Authorization, field by field, as istiod converts it for ztunnel."""

from __future__ import annotations

from typing import Any

import pytest

from meshcore.model import authorization
from meshcore.policy import authorization as authz
from meshcore.policy import errors
from tests.unit import policy_fixtures as f

M = authorization.Match
ALLOW = authorization.Action.ALLOW
DENY = authorization.Action.DENY


def _rules(
    rules: list[dict[str, Any]], action: str | None = None
) -> tuple[authorization.Rule, ...]:
    built = authz.build_authorization(f.ap(action=action, rules=rules), root_namespace=f.ROOT)
    assert built is not None
    return built.rules


# --- every L4 field, on its own, in an ALLOW rule ---

SOURCE_CASES = [
    (
        "principals",
        {"principals": ["cluster.local/ns/default/sa/frontend"]},
        M(principals=(f.exact("cluster.local/ns/default/sa/frontend"),)),
    ),
    ("principals-presence", {"principals": ["*"]}, M(principals=(f.PRESENCE,))),
    (
        "principals-prefix",
        {"principals": ["cluster.local/ns/shop/*"]},
        M(principals=(f.prefix("cluster.local/ns/shop/"),)),
    ),
    ("principals-suffix", {"principals": ["*/sa/web"]}, M(principals=(f.suffix("/sa/web"),))),
    # istiod tests the leading star first: "*mid*" is a suffix match on "mid*".
    ("principals-both-stars", {"principals": ["*mid*"]}, M(principals=(f.suffix("mid*"),))),
    (
        "notPrincipals",
        {"notPrincipals": ["cluster.local/ns/a/sa/b", "*"]},
        M(not_principals=(f.exact("cluster.local/ns/a/sa/b"), f.PRESENCE)),
    ),
    (
        "namespaces",
        {"namespaces": ["shop", "prod-*"]},
        M(namespaces=(f.exact("shop"), f.prefix("prod-"))),
    ),
    ("notNamespaces", {"notNamespaces": ["*-test"]}, M(not_namespaces=(f.suffix("-test"),))),
    (
        "ipBlocks",
        {"ipBlocks": ["10.0.0.0/8", "192.168.1.7"]},
        M(source_ips=(f.net("10.0.0.0/8"), f.net("192.168.1.7/32"))),
    ),
    ("ipBlocks-host-bits", {"ipBlocks": ["10.1.2.3/16"]}, M(source_ips=(f.net("10.1.0.0/16"),))),
    (
        "ipBlocks-v6",
        {"ipBlocks": ["fd00::/8", "fe80::1%eth0"]},
        M(source_ips=(f.net("fd00::/8"), f.net("fe80::1/128"))),
    ),
    ("notIpBlocks", {"notIpBlocks": ["10.0.0.1"]}, M(not_source_ips=(f.net("10.0.0.1/32"),))),
    (
        "serviceAccounts",
        {"serviceAccounts": ["other/web", "api"]},
        M(
            service_accounts=(
                authorization.ServiceAccountMatch("other", "web"),
                authorization.ServiceAccountMatch("shop", "api"),
            )
        ),
    ),
    (
        "notServiceAccounts",
        {"notServiceAccounts": ["a/b"]},
        M(not_service_accounts=(authorization.ServiceAccountMatch("a", "b"),)),
    ),
]


@pytest.mark.parametrize(
    ("fields", "match"), [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES]
)
def test_source_field(fields: dict[str, list[str]], match: authorization.Match) -> None:
    assert _rules([{"from": [f.source(**fields)]}]) == (f.rule([match]),)


OPERATION_CASES = [
    ("ports", {"ports": ["80", "08080"]}, M(destination_ports=(80, 8080))),
    ("notPorts", {"notPorts": ["15021"]}, M(not_destination_ports=(15021,))),
    (
        "both",
        {"ports": ["80"], "notPorts": ["81"]},
        M(destination_ports=(80,), not_destination_ports=(81,)),
    ),
]


@pytest.mark.parametrize(
    ("fields", "match"), [c[1:] for c in OPERATION_CASES], ids=[c[0] for c in OPERATION_CASES]
)
def test_operation_field(fields: dict[str, list[str]], match: authorization.Match) -> None:
    assert _rules([{"to": [f.operation(**fields)]}]) == (f.rule([match]),)


WHEN_CASES = [
    (
        "source.ip",
        f.when("source.ip", ["10.0.0.0/24"], ["10.0.0.9"]),
        M(source_ips=(f.net("10.0.0.0/24"),), not_source_ips=(f.net("10.0.0.9/32"),)),
    ),
    (
        "source.namespace",
        f.when("source.namespace", ["shop"], ["*-dev"]),
        M(namespaces=(f.exact("shop"),), not_namespaces=(f.suffix("-dev"),)),
    ),
    ("source.principal", f.when("source.principal", ["*"]), M(principals=(f.PRESENCE,))),
    (
        "source.principal-not",
        f.when("source.principal", not_values=["td/ns/a/sa/b"]),
        M(not_principals=(f.exact("td/ns/a/sa/b"),)),
    ),
    (
        "destination.ip",
        f.when("destination.ip", ["10.244.0.0/16"]),
        M(destination_ips=(f.net("10.244.0.0/16"),)),
    ),
    (
        "destination.ip-not",
        f.when("destination.ip", not_values=["::1"]),
        M(not_destination_ips=(f.net("::1/128"),)),
    ),
    (
        "destination.port",
        f.when("destination.port", ["8080"], ["9090"]),
        M(destination_ports=(8080,), not_destination_ports=(9090,)),
    ),
]


@pytest.mark.parametrize(
    ("condition", "match"), [c[1:] for c in WHEN_CASES], ids=[c[0] for c in WHEN_CASES]
)
def test_when_condition(condition: dict[str, Any], match: authorization.Match) -> None:
    assert _rules([{"when": [condition]}]) == (f.rule([match]),)


def test_rule_shape_to_from_when_in_order() -> None:
    """to entries OR in one clause, from entries OR in the next, one clause per condition."""
    got = _rules(
        [
            {
                "when": [f.when("destination.port", ["80"]), f.when("source.namespace", ["shop"])],
                "from": [f.source(namespaces=["a"]), f.source(principals=["td/ns/b/sa/c"])],
                "to": [f.operation(ports=["80"]), f.operation(ports=["443"])],
            }
        ]
    )
    assert got == (
        f.rule(
            [M(destination_ports=(80,)), M(destination_ports=(443,))],
            [M(namespaces=(f.exact("a"),)), M(principals=(f.exact("td/ns/b/sa/c"),))],
            [M(destination_ports=(80,))],
            [M(namespaces=(f.exact("shop"),))],
        ),
    )


def test_seed_example_allow_one_principal() -> None:
    obj = f.ap(
        "allow-frontend",
        "default",
        selector={"app": "backend"},
        rules=[{"from": [f.source(principals=["cluster.local/ns/default/sa/frontend"])]}],
    )
    assert authz.build_authorization(obj, root_namespace=f.ROOT) == authorization.Authorization(
        name="allow-frontend",
        namespace="default",
        scope=authorization.Scope.WORKLOAD_SELECTOR,
        action=ALLOW,
        rules=(f.rule([M(principals=(f.exact("cluster.local/ns/default/sa/frontend"),))]),),
    )
    assert authz.selector_of(obj) == {"app": "backend"}
    assert authz.policy_key_of(obj) == "default/allow-frontend"


# --- HTTP attributes: ALLOW drops the rule, DENY drops the field ---

HTTP_CASES = [
    ("methods", {"to": [f.operation(methods=["GET"], ports=["80"])]}, [M(destination_ports=(80,))]),
    ("paths", {"to": [f.operation(paths=["/a"], ports=["80"])]}, [M(destination_ports=(80,))]),
    ("hosts", {"to": [f.operation(hosts=["a.com"], ports=["80"])]}, [M(destination_ports=(80,))]),
    ("notHosts", {"to": [f.operation(notHosts=["a"], ports=["80"])]}, [M(destination_ports=(80,))]),
    (
        "notMethods",
        {"to": [f.operation(notMethods=["PUT"], notPorts=["1"])]},
        [M(not_destination_ports=(1,))],
    ),
    (
        "notPaths",
        {"to": [f.operation(notPaths=["/x"], ports=["80"])]},
        [M(destination_ports=(80,))],
    ),
    (
        "requestPrincipals",
        {"from": [f.source(requestPrincipals=["iss/sub"], namespaces=["a"])]},
        [M(namespaces=(f.exact("a"),))],
    ),
    (
        "notRequestPrincipals",
        {"from": [f.source(notRequestPrincipals=["*"], namespaces=["a"])]},
        [M(namespaces=(f.exact("a"),))],
    ),
    (
        "remoteIpBlocks",
        {"from": [f.source(remoteIpBlocks=["1.2.3.4"], namespaces=["a"])]},
        [M(namespaces=(f.exact("a"),))],
    ),
    (
        "notRemoteIpBlocks",
        {"from": [f.source(notRemoteIpBlocks=["1.2.3.4"], namespaces=["a"])]},
        [M(namespaces=(f.exact("a"),))],
    ),
]


@pytest.mark.parametrize(
    ("rule", "deny_clause"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES]
)
def test_http_attribute_drops_allow_rule_but_only_field_in_deny(
    rule: dict[str, Any], deny_clause: list[authorization.Match]
) -> None:
    l4_only = {"to": [f.operation(ports=["9"])]}
    # ALLOW: the rule is gone, the policy keeps its other rules.
    assert _rules([rule, l4_only], "ALLOW") == (f.rule([M(destination_ports=(9,))]),)
    # DENY: the same rule stays with its L4 part only.
    assert _rules([rule, l4_only], "DENY") == (
        f.rule(deny_clause),
        f.rule([M(destination_ports=(9,))]),
    )


@pytest.mark.parametrize(
    "rule",
    [
        {"to": [f.operation(methods=["GET"])]},
        {"from": [f.source(requestPrincipals=["*"])], "to": [f.operation(ports=["80"])]},
        {"when": [f.when("request.headers[x-user]", ["me"])]},
        {"from": [f.source(namespaces=["a"])], "when": [f.when("source.serviceAccount", ["x"])]},
    ],
    ids=["only-http-to", "http-only-from-entry", "http-condition", "http-condition-with-l4"],
)
def test_deny_rule_with_an_entry_left_empty_never_matches(rule: dict[str, Any]) -> None:
    """ztunnel skips an empty Match, so the clause (and the rule) cannot match: dropped."""
    translation = authz.build_translation(
        f.ap(action="DENY", rules=[rule, {}]), root_namespace=f.ROOT
    )
    assert translation is not None
    assert translation.authorization.rules == (authorization.Rule(()),)
    assert translation.rule_sources == (1,)


def test_deny_keeps_an_entry_with_l4_beside_an_http_only_entry() -> None:
    rule = {"to": [f.operation(methods=["GET"]), f.operation(ports=["80"])]}
    assert _rules([rule], "DENY") == (f.rule([M(), M(destination_ports=(80,))]),)


def test_allow_rule_with_http_condition_is_dropped() -> None:
    rules = [{"when": [f.when("request.auth.claims[iss]", ["x"])]}]
    assert _rules(rules, "ALLOW") == ()


def test_rule_sources_map_kept_rules_to_spec_indexes() -> None:
    obj = f.ap(
        rules=[
            {"to": [f.operation(methods=["GET"])]},
            {"to": [f.operation(ports=["80"])]},
            {"from": [f.source(remoteIpBlocks=["1.1.1.1"])]},
            {},
        ]
    )
    translation = authz.build_translation(obj, root_namespace=f.ROOT)
    assert translation is not None
    assert translation.rule_sources == (1, 3)
    assert len(translation.authorization.rules) == 2


# --- empty policies and rules ---


@pytest.mark.parametrize(
    ("obj", "rules"),
    [
        (f.ap(), ()),  # spec: {}
        (f.ap(rules=[]), ()),
        (f.ap(rules=[{}]), (authorization.Rule(()),)),
        (f.ap(action="DENY", rules=[{}]), (authorization.Rule(()),)),
        (f.ap(rules=[{"to": [f.operation()]}]), ()),  # an empty entry never matches
        (f.ap(rules=[{"when": [f.when("source.ip")]}]), ()),  # a condition without values
    ],
    ids=[
        "empty-spec",
        "empty-rules",
        "one-empty-rule",
        "deny-empty-rule",
        "empty-entry",
        "no-values",
    ],
)
def test_empty_policies_and_rules(
    obj: dict[str, Any], rules: tuple[authorization.Rule, ...]
) -> None:
    built = authz.build_authorization(obj, root_namespace=f.ROOT)
    assert built is not None
    assert built.rules == rules


# --- scope, keys, what is not sent ---


@pytest.mark.parametrize(
    ("obj", "scope"),
    [
        (f.ap(namespace="shop"), authorization.Scope.NAMESPACE),
        (f.ap(namespace=f.ROOT), authorization.Scope.GLOBAL),
        (f.ap(namespace="shop", selector={"app": "x"}), authorization.Scope.WORKLOAD_SELECTOR),
        (f.ap(namespace=f.ROOT, selector={"app": "x"}), authorization.Scope.WORKLOAD_SELECTOR),
        (f.ap(namespace="shop", selector={}), authorization.Scope.WORKLOAD_SELECTOR),
    ],
    ids=["namespace", "root-namespace-global", "selector", "root-with-selector", "empty-selector"],
)
def test_scope(obj: dict[str, Any], scope: authorization.Scope) -> None:
    built = authz.build_authorization(obj, root_namespace=f.ROOT)
    assert built is not None
    assert built.scope is scope
    assert built.key == f"{obj['metadata']['namespace']}/p"


def test_root_namespace_is_configurable() -> None:
    built = authz.build_authorization(f.ap(namespace="mesh-root"), root_namespace="mesh-root")
    assert built is not None
    assert built.scope is authorization.Scope.GLOBAL
    other = authz.build_authorization(f.ap(namespace=f.ROOT), root_namespace="mesh-root")
    assert other is not None
    assert other.scope is authorization.Scope.NAMESPACE


@pytest.mark.parametrize(
    "obj",
    [
        f.ap(targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]),
        f.ap(targetRef={"kind": "Service", "group": "", "name": "web"}),
        f.ap(
            action="CUSTOM", targetRefs=[{"kind": "Gateway", "name": "wp"}], provider={"name": "x"}
        ),
        f.ap(annotations={"istio.io/dry-run": "true"}),
        f.ap(annotations={"istio.io/dry-run": "1"}),
    ],
    ids=["targetRefs", "targetRef", "custom-for-waypoint", "dry-run", "dry-run-go-bool"],
)
def test_not_sent_to_ztunnel(obj: dict[str, Any]) -> None:
    assert authz.build_authorization(obj, root_namespace=f.ROOT) is None


def test_dry_run_sent_marked_when_enabled() -> None:
    obj = f.ap(annotations={"istio.io/dry-run": "true"}, action="DENY", rules=[{}])
    built = authz.build_authorization(obj, root_namespace=f.ROOT, dry_run_enabled=True)
    assert built is not None
    assert built.dry_run
    not_dry = f.ap(annotations={"istio.io/dry-run": "yes"})  # not a Go bool: not dry run
    sent = authz.build_authorization(not_dry, root_namespace=f.ROOT)
    assert sent is not None
    assert not sent.dry_run


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_unsupported_action_is_refused_with_istiod_wording(action: str) -> None:
    with pytest.raises(errors.UnsupportedActionError) as refused:
        authz.build_authorization(f.ap(action=action, rules=[{}]), root_namespace=f.ROOT)
    assert refused.value.action == action
    assert refused.value.field == "spec.action"
    assert str(refused.value) == (
        f"AuthorizationPolicy shop/p: spec.action: ztunnel does not support the {action} action"
    )


@pytest.mark.parametrize(
    ("obj", "field", "reason"),
    [
        (
            f.ap(rules=[{"to": [f.operation(ports=["http"])]}]),
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port number",
        ),
        (
            f.ap(rules=[{}, {"to": [f.operation(notPorts=["70000"])]}]),
            "spec.rules[1].to[0].operation.notPorts[0]",
            "not a port number",
        ),
        (
            f.ap(rules=[{"from": [f.source(ipBlocks=["10.0.0.0/255.0.0.0"])]}]),
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not an IP address",
        ),
        (
            f.ap(rules=[{"when": [f.when("destination.port", ["-1"])]}]),
            "spec.rules[0].when[0].values[0]",
            "not a port number",
        ),
        (
            f.ap(rules=[{"when": [f.when("source.ip", not_values=["nope"])]}]),
            "spec.rules[0].when[0].notValues[0]",
            "not an IP address",
        ),
        (f.ap(action="REJECT"), "spec.action", "unknown action 'REJECT'"),
        ({**f.ap(), "spec": {"rules": "all"}}, "spec.rules", "must be a list"),
        (
            f.ap(rules=[{"from": [{"source": {"principals": [7]}}]}]),
            "spec.rules[0].from[0].source.principals[0]",
            "must be a string",
        ),
        (f.ap(rules=[{"when": [{"values": ["x"]}]}]), "spec.rules[0].when[0].key", "non-empty"),
    ],
    ids=[
        "port-name",
        "port-range",
        "netmask",
        "when-port",
        "when-ip",
        "action",
        "rules-type",
        "principal-type",
        "when-key",
    ],
)
def test_invalid_values_name_the_field(obj: dict[str, Any], field: str, reason: str) -> None:
    """A bad value would silently shorten a DENY if skipped (istiod's webhook rejects these)."""
    with pytest.raises(errors.InvalidPolicyError) as invalid:
        authz.build_authorization(obj, root_namespace=f.ROOT)
    assert invalid.value.field == field
    assert reason in invalid.value.reason
    assert str(invalid.value).startswith(f"AuthorizationPolicy shop/p: {field}: ")


def test_v1beta1_object_translates_the_same() -> None:
    rules = [{"from": [f.source(namespaces=["a"])]}]
    v1 = authz.build_authorization(f.ap(rules=rules), root_namespace=f.ROOT)
    beta = authz.build_authorization(
        f.ap(rules=rules, api_version="security.istio.io/v1beta1"), root_namespace=f.ROOT
    )
    assert v1 == beta
    assert v1 is not None


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("*", f.PRESENCE),
        ("a*", f.prefix("a")),
        ("*a", f.suffix("a")),
        ("*a*", f.suffix("a*")),
        ("a", f.exact("a")),
        ("", f.exact("")),
    ],
    ids=["presence", "prefix", "suffix", "both", "exact", "empty"],
)
def test_string_match_follows_istiod(pattern: str, match: authorization.StringMatch) -> None:
    assert authz.build_string_match(pattern) == match
