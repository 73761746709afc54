"""Translate Istio objects, then decide connections with meshcore.rbac as ztunnel does: the
verdicts an operator gets for what they wrote."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, store, workload
from meshcore.policy import authorization as authz
from meshcore.policy import peerauthentication as pa_mod
from tests.unit import policy_fixtures as f

FRONTEND = "cluster.local/ns/default/sa/frontend"
ALLOWED = rbac.Verdict.ALLOWED
DENIED = rbac.Verdict.EXPLICITLY_DENIED
NOT_ALLOWED = rbac.Verdict.NOT_ALLOWED
WEB = {"app": "web"}


def conn(
    identity: str | None = FRONTEND, *, src: str = "10.0.0.1", dst: str = "10.0.0.2", port: int = 80
) -> rbac.ConnectionInfo:
    return rbac.ConnectionInfo(
        source_identity=None if identity is None else spiffe.SpiffeId.parse(f"spiffe://{identity}"),
        source_ip=ipaddress.ip_address(src),
        destination_ip=ipaddress.ip_address(dst),
        destination_port=port,
    )


def decide(
    objs: Sequence[dict[str, Any]],
    connection: rbac.ConnectionInfo,
    *,
    namespace: str = "shop",
    labels: Mapping[str, str] = WEB,
) -> rbac.Decision:
    """What the destination ztunnel decides for a workload with `labels` in `namespace`: the
    policies are translated and attached as the controller does, then gathered as ztunnel
    gathers them (global, namespace, the workload's keys)."""
    policies = store.PolicyStore()
    keys: list[ids.PolicyKey] = []
    peer_auths = [
        pa_mod.parse_peer_authentication(o) for o in objs if o["kind"] == "PeerAuthentication"
    ]
    for obj in objs:
        if obj["kind"] != "AuthorizationPolicy":
            continue
        built = authz.build_authorization(obj, root_namespace=f.ROOT)
        if built is None:
            continue
        policies.insert(built)
        selector = authz.selector_of(obj)
        in_scope = obj["metadata"]["namespace"] in (namespace, f.ROOT)
        if selector and in_scope and all(labels.get(k) == v for k, v in selector.items()):
            keys.append(built.key)
    for policy in pa_mod.build_policies(peer_auths, root_namespace=f.ROOT):
        policies.insert(policy)
    keys.extend(
        pa_mod.find_peer_authentication_keys(namespace, labels, peer_auths, root_namespace=f.ROOT)
    )
    local = workload.Workload(
        uid=ids.pod_uid(namespace, "web-1"),
        name="web-1",
        namespace=namespace,
        addresses=(ipaddress.ip_address("10.0.0.2"),),
        node="n1",
        authorization_policies=tuple(keys),
    )
    return rbac.evaluate(policies.find_applicable(local), connection)


ALLOW_FRONTEND = f.ap(
    "allow-frontend", selector=WEB, rules=[{"from": [f.source(principals=[FRONTEND])]}]
)
DENY_ALL = f.ap("deny-all", action="DENY", rules=[{}])

CASES: list[
    tuple[str, list[dict[str, Any]], rbac.ConnectionInfo, rbac.Verdict, str | None, int | None]
] = [
    ("no-policy-allows", [], conn(), ALLOWED, None, None),
    ("allow-matches", [ALLOW_FRONTEND], conn(), ALLOWED, "shop/allow-frontend", 0),
    (
        "allow-other-identity",
        [ALLOW_FRONTEND],
        conn("cluster.local/ns/default/sa/other"),
        NOT_ALLOWED,
        None,
        None,
    ),
    ("allow-plaintext", [ALLOW_FRONTEND], conn(None), NOT_ALLOWED, None, None),
    ("deny-wins-over-allow", [ALLOW_FRONTEND, DENY_ALL], conn(), DENIED, "shop/deny-all", 0),
    (
        "deny-not-matching-then-allow",
        [ALLOW_FRONTEND, f.ap("d", action="DENY", rules=[{"to": [f.operation(ports=["9"])]}])],
        conn(),
        ALLOWED,
        "shop/allow-frontend",
        0,
    ),
    (
        "only-deny-not-matching-allows",
        [f.ap("d", action="DENY", rules=[{"from": [f.source(namespaces=["evil"])]}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    ("empty-rule-allows-everything", [f.ap("any", rules=[{}])], conn(None), ALLOWED, "shop/any", 0),
    ("allow-without-rules-denies-everything", [f.ap("nothing")], conn(), NOT_ALLOWED, None, None),
    (
        "deny-without-rules-denies-nothing",
        [f.ap("nothing", action="DENY")],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "allow-http-rule-is-stricter",
        [f.ap("get", rules=[{"to": [f.operation(methods=["GET"])]}])],
        conn(),
        NOT_ALLOWED,
        None,
        None,
    ),
    (
        "deny-http-field-is-broader",
        [f.ap("d", action="DENY", rules=[{"to": [f.operation(methods=["POST"], ports=["80"])]}])],
        conn(),
        DENIED,
        "shop/d",
        0,
    ),
    (
        "deny-http-only-does-nothing",
        [f.ap("d", action="DENY", rules=[{"to": [f.operation(methods=["POST"])]}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "rule-index-counts-kept-rules",
        [
            f.ap(
                "r",
                rules=[
                    {"to": [f.operation(paths=["/x"])]},
                    {"from": [f.source(namespaces=["default"])]},
                ],
            )
        ],
        conn(),
        ALLOWED,
        "shop/r",
        0,
    ),
    (
        "second-rule-decides",
        [
            f.ap(
                "r", rules=[{"to": [f.operation(ports=["1"])]}, {"to": [f.operation(ports=["80"])]}]
            )
        ],
        conn(),
        ALLOWED,
        "shop/r",
        1,
    ),
    (
        "global-root-deny-applies",
        [f.ap("g", f.ROOT, action="DENY", rules=[{}])],
        conn(),
        DENIED,
        "istio-system/g",
        0,
    ),
    (
        "root-selector-applies-across-namespaces",
        [f.ap("g", f.ROOT, action="DENY", selector=WEB, rules=[{}])],
        conn(),
        DENIED,
        "istio-system/g",
        0,
    ),
    (
        "other-namespace-policy-ignored",
        [f.ap("o", "other", action="DENY", rules=[{}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "selector-not-matching-ignored",
        [f.ap("s", action="DENY", selector={"app": "x"}, rules=[{}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "empty-selector-attaches-to-nothing",
        [f.ap("s", action="DENY", selector={}, rules=[{}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "require-mtls-denies-plaintext",
        [f.ap("mtls", action="DENY", rules=[{"from": [f.source(notPrincipals=["*"])]}])],
        conn(None),
        DENIED,
        "shop/mtls",
        0,
    ),
    (
        "require-mtls-lets-mtls-in",
        [f.ap("mtls", action="DENY", rules=[{"from": [f.source(notPrincipals=["*"])]}])],
        conn(),
        ALLOWED,
        None,
        None,
    ),
    (
        "ip-block",
        [f.ap("ip", rules=[{"from": [f.source(ipBlocks=["10.0.0.0/24"])]}])],
        conn(src="10.0.0.77"),
        ALLOWED,
        "shop/ip",
        0,
    ),
    (
        "ip-block-miss",
        [f.ap("ip", rules=[{"from": [f.source(ipBlocks=["10.0.0.0/24"])]}])],
        conn(src="10.0.1.1"),
        NOT_ALLOWED,
        None,
        None,
    ),
    (
        "not-ip-block",
        [f.ap("ip", rules=[{"from": [f.source(notIpBlocks=["10.0.0.1"])]}])],
        conn(),
        NOT_ALLOWED,
        None,
        None,
    ),
    (
        "not-ports",
        [f.ap("p", rules=[{"to": [f.operation(notPorts=["80"])]}])],
        conn(port=81),
        ALLOWED,
        "shop/p",
        0,
    ),
    (
        "namespace-prefix",
        [f.ap("n", rules=[{"from": [f.source(namespaces=["def*"])]}])],
        conn(),
        ALLOWED,
        "shop/n",
        0,
    ),
    (
        "not-namespaces-plaintext",
        [f.ap("n", rules=[{"from": [f.source(notNamespaces=["evil"])]}])],
        conn(None),
        ALLOWED,
        "shop/n",
        0,
    ),
    (
        "service-account",
        [f.ap("sa", rules=[{"from": [f.source(serviceAccounts=["default/frontend"])]}])],
        conn(),
        ALLOWED,
        "shop/sa",
        0,
    ),
    (
        "service-account-default-namespace",
        [f.ap("sa", rules=[{"from": [f.source(serviceAccounts=["frontend"])]}])],
        conn(),
        NOT_ALLOWED,
        None,
        None,
    ),
    (
        "principal-suffix",
        [f.ap("p", rules=[{"from": [f.source(principals=["*/sa/frontend"])]}])],
        conn(),
        ALLOWED,
        "shop/p",
        0,
    ),
    (
        "spiffe-prefixed-principal-never-matches",
        [f.ap("p", rules=[{"from": [f.source(principals=[f"spiffe://{FRONTEND}"])]}])],
        conn(),
        NOT_ALLOWED,
        None,
        None,
    ),
    (
        "when-destination-ip",
        [f.ap("w", action="DENY", rules=[{"when": [f.when("destination.ip", ["10.0.0.0/30"])]}])],
        conn(),
        DENIED,
        "shop/w",
        0,
    ),
    (
        "when-and-from-both-needed",
        [
            f.ap(
                "w",
                rules=[
                    {
                        "from": [f.source(namespaces=["default"])],
                        "when": [f.when("destination.port", ["443"])],
                    }
                ],
            )
        ],
        conn(port=80),
        NOT_ALLOWED,
        None,
        None,
    ),
    # PeerAuthentication
    (
        "mesh-strict-refuses-plaintext",
        [f.pa("m", f.ROOT, mode="STRICT")],
        conn(None),
        DENIED,
        "istio-system/istio_converted_static_strict",
        0,
    ),
    ("mesh-strict-accepts-mtls", [f.pa("m", f.ROOT, mode="STRICT")], conn(), ALLOWED, None, None),
    (
        "permissive-accepts-plaintext",
        [f.pa("m", f.ROOT, mode="PERMISSIVE")],
        conn(None),
        ALLOWED,
        None,
        None,
    ),
    (
        "namespace-permissive-overrides-mesh-strict",
        [f.pa("m", f.ROOT, mode="STRICT"), f.pa("ns", mode="PERMISSIVE")],
        conn(None),
        ALLOWED,
        None,
        None,
    ),
    (
        "port-level-exception-open",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE"})],
        conn(None, port=8080),
        ALLOWED,
        None,
        None,
    ),
    (
        "port-level-exception-other-port-strict",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE"})],
        conn(None, port=80),
        DENIED,
        "shop/converted_peer_authentication_wl",
        0,
    ),
    (
        "strict-port-on-permissive-workload",
        [f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "STRICT"})],
        conn(None, port=9090),
        DENIED,
        "shop/converted_peer_authentication_wl",
        0,
    ),
    (
        "strict-beats-allow-for-plaintext",
        [f.pa("m", f.ROOT, mode="STRICT"), f.ap("any", rules=[{}])],
        conn(None),
        DENIED,
        "istio-system/istio_converted_static_strict",
        0,
    ),
]


@pytest.mark.parametrize(
    ("objs", "connection", "verdict", "policy", "rule"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decision(
    objs: list[dict[str, Any]],
    connection: rbac.ConnectionInfo,
    verdict: rbac.Verdict,
    policy: str | None,
    rule: int | None,
) -> None:
    decision = decide(objs, connection)
    assert (decision.verdict, decision.policy, decision.rule) == (verdict, policy, rule)


def test_rule_index_maps_back_to_the_spec() -> None:
    """meshctl check says "policy X rule N" with N an index of spec.rules."""
    obj = f.ap(
        "r",
        rules=[{"to": [f.operation(paths=["/x"])]}, {"from": [f.source(namespaces=["default"])]}],
    )
    decision = decide([obj], conn())
    translation = authz.build_translation(obj, root_namespace=f.ROOT)
    assert translation is not None
    assert decision.rule is not None
    assert translation.rule_sources[decision.rule] == 1


# --- meshcore.rbac itself, where ztunnel's rbac.rs has a say ---


def _policy(
    *rules: authorization.Rule, action: authorization.Action = authorization.Action.ALLOW
) -> authorization.Authorization:
    return authorization.Authorization("p", "shop", authorization.Scope.NAMESPACE, action, rules)


@pytest.mark.parametrize(
    ("rule", "connection", "matches"),
    [
        (authorization.Rule(()), conn(None), True),
        (authorization.Rule((authorization.Clause(()),)), conn(None), True),  # empty clause
        (f.rule([authorization.Match()]), conn(), False),  # only an empty Match
        (
            f.rule([authorization.Match(), authorization.Match(destination_ports=(80,))]),
            conn(),
            True,
        ),
        # Without an identity the namespace is "" (it is never None in ztunnel).
        (f.rule([authorization.Match(namespaces=(f.exact(""),))]), conn(None), True),
        (f.rule([authorization.Match(not_namespaces=(f.PRESENCE,))]), conn(None), True),
        # ... and no principal matches at all.
        (f.rule([authorization.Match(principals=(f.exact(""),))]), conn(None), False),
        (f.rule([authorization.Match(not_principals=(f.exact(""),))]), conn(None), True),
        (
            f.rule(
                [
                    authorization.Match(
                        service_accounts=(authorization.ServiceAccountMatch("default", "frontend"),)
                    )
                ]
            ),
            conn(),
            True,
        ),
        (f.rule([authorization.Match(source_ips=(f.net("::/0"),))]), conn(src="10.0.0.1"), False),
    ],
    ids=[
        "no-clauses",
        "empty-clause",
        "empty-match",
        "empty-match-skipped",
        "ns-empty-exact",
        "not-ns-presence",
        "principal-empty",
        "not-principal-empty",
        "service-account",
        "ip-family",
    ],
)
def test_rbac_match_semantics(
    rule: authorization.Rule, connection: rbac.ConnectionInfo, matches: bool
) -> None:
    assert rbac.policy_matches(_policy(rule), connection) is matches
    assert rbac.find_matching_rule(_policy(rule), connection) == (0 if matches else None)


def test_dry_run_policies_decide_nothing() -> None:
    dry = authorization.Authorization(
        "d",
        "shop",
        authorization.Scope.NAMESPACE,
        authorization.Action.DENY,
        (authorization.Rule(()),),
        dry_run=True,
    )
    assert rbac.evaluate([dry], conn()) == rbac.Decision(ALLOWED)
