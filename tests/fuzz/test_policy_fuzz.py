"""Schema-shaped AuthorizationPolicies and PeerAuthentications into the conversion.

The only exception allowed out is `PolicyError` (an unsupported action, a value that means
nothing). Beyond not crashing: what is built encodes to xDS and decodes back unchanged, the
warnings agree with the translation on "no rule left", and the policies produced for any set of
PeerAuthentications make ztunnel refuse plaintext on exactly the ports `find_effective_mode`
calls STRICT.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, store, workload
from meshcore.policy import analysis, errors, peerauthentication
from meshcore.policy import authorization as authz
from meshcore.xds import resources

ROOT = "istio-system"
_text = st.text(max_size=12)
_port = st.integers(min_value=1, max_value=65535).map(str) | _text
_ip = (
    st.ip_addresses().map(str)
    | st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
    | _text
)
_pattern = st.sampled_from(["*", "cluster.local/ns/a/sa/b", "prod-*", "*-dev", "a/b", "b"]) | _text
_when_key = st.sampled_from(
    [
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.ip",
        "destination.port",
        "request.headers[x]",
        "connection.sni",
    ]
) | st.text(min_size=1, max_size=10)


def _values(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(strategy, max_size=3)


_source = st.fixed_dictionaries(
    {},
    optional={
        "principals": _values(_pattern),
        "notPrincipals": _values(_pattern),
        "namespaces": _values(_pattern),
        "notNamespaces": _values(_pattern),
        "ipBlocks": _values(_ip),
        "notIpBlocks": _values(_ip),
        "serviceAccounts": _values(_pattern),
        "notServiceAccounts": _values(_pattern),
        "requestPrincipals": _values(_pattern),
        "notRequestPrincipals": _values(_pattern),
        "remoteIpBlocks": _values(_ip),
        "notRemoteIpBlocks": _values(_ip),
    },
)
_operation = st.fixed_dictionaries(
    {},
    optional={
        "ports": _values(_port),
        "notPorts": _values(_port),
        "hosts": _values(_text),
        "notHosts": _values(_text),
        "methods": _values(st.sampled_from(["GET", "POST"])),
        "notMethods": _values(_text),
        "paths": _values(_text),
        "notPaths": _values(_text),
    },
)


@st.composite
def _condition(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(_when_key)
    values = {"destination.port": _port, "source.ip": _ip, "destination.ip": _ip}.get(key, _pattern)
    return draw(
        st.fixed_dictionaries(
            {"key": st.just(key)},
            optional={"values": _values(values), "notValues": _values(values)},
        )
    )


_rule = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.fixed_dictionaries({"source": _source}), max_size=2),
        "to": st.lists(st.fixed_dictionaries({"operation": _operation}), max_size=2),
        "when": st.lists(_condition(), max_size=2),
    },
)
_labels = st.dictionaries(
    st.sampled_from(["app", "version"]), st.sampled_from(["web", "v1"]), max_size=2
)
_spec = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM", ""]) | _text,
        "selector": st.fixed_dictionaries({"matchLabels": _labels}),
        "rules": st.lists(_rule, max_size=3),
        "targetRefs": st.lists(
            st.fixed_dictionaries({"kind": st.just("Gateway"), "name": _text}), max_size=1
        ),
        "provider": st.fixed_dictionaries({"name": _text}),
    },
)


@st.composite
def _policy(draw: st.DrawFn) -> dict[str, Any]:
    annotations = draw(
        st.dictionaries(st.just("istio.io/dry-run"), st.sampled_from(["true", "false", "x"]))
    )
    return {
        "apiVersion": draw(st.sampled_from(["security.istio.io/v1", "security.istio.io/v1beta1"])),
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": draw(st.sampled_from(["p", "allow-web"])),
            "namespace": draw(st.sampled_from(["shop", ROOT])),
            "annotations": annotations,
        },
        "spec": draw(_spec),
    }


def _has_port_zero(policy: authorization.Authorization) -> bool:
    # ztunnel takes port 0 (it matches no connection); our decoder refuses it (see the report).
    return any(
        0 in m.destination_ports or 0 in m.not_destination_ports
        for r in policy.rules
        for c in r.clauses
        for m in c.matches
    )


@settings(max_examples=600)
@given(obj=_policy(), dry_run_enabled=st.booleans())
def test_authorization_policy_translation(obj: dict[str, Any], dry_run_enabled: bool) -> None:
    refused: errors.PolicyError | None = None
    try:
        translation = authz.build_translation(
            obj, root_namespace=ROOT, dry_run_enabled=dry_run_enabled
        )
    except errors.PolicyError as exc:
        refused = exc
    if refused is not None:
        assert refused.field  # every refusal names its field
        return
    findings = analysis.find_unenforced(obj, root_namespace=ROOT, dry_run_enabled=dry_run_enabled)
    analysis.build_status_message(findings)
    if translation is None:
        return
    policy = translation.authorization
    assert len(translation.rule_sources) == len(policy.rules)
    assert list(translation.rule_sources) == sorted(set(translation.rule_sources))
    for rule in policy.rules:
        for clause in rule.clauses:
            assert any(not m.is_empty for m in clause.matches)  # never a clause that cannot match
    said_nothing_left = any(f.path == "spec.rules" for f in findings)
    assert said_nothing_left == (bool(obj["spec"].get("rules")) and not policy.rules)
    if not _has_port_zero(policy):
        decoded = resources.authorization_from_proto(resources.authorization_to_proto(policy))
        assert decoded == policy


@settings(max_examples=300)
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | _text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
        max_leaves=12,
    )
)
def test_arbitrary_json_is_refused_cleanly(obj: Any) -> None:
    for candidate in (obj, {"metadata": {"name": "p"}, "spec": obj}, {"spec": {"rules": obj}}):
        try:
            authz.build_translation(candidate)
        except errors.PolicyError:
            pass
        try:
            peerauthentication.parse_peer_authentication(candidate)
        except errors.PolicyError:
            pass


_mode = st.sampled_from(["UNSET", "DISABLE", "PERMISSIVE", "STRICT", None])
_ports = st.sampled_from([80, 8080, 9090])


@st.composite
def _peer_authentication(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    mode = draw(_mode)
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    # Mostly selectors the workload has, so that workload and port levels come into play.
    selector = draw(st.none() | st.just({"app": "web"}) | _labels)
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    levels = draw(
        st.dictionaries(
            _ports, st.sampled_from(["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]), max_size=3
        )
    )
    if levels:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in levels.items()}
    return {
        "kind": "PeerAuthentication",
        "metadata": {
            "name": draw(st.sampled_from(["a", "b", "c"])),
            "namespace": draw(st.sampled_from(["shop", ROOT])),
            "creationTimestamp": draw(
                st.sampled_from(["2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"])
            ),
        },
        "spec": spec,
    }


def _unique(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs}
    return list(by_key.values())


@settings(max_examples=500)
@given(
    objs=st.lists(_peer_authentication(), max_size=5).map(_unique),
    labels=st.sampled_from([{"app": "web"}, {"app": "web", "version": "v1"}]) | _labels,
    namespace=st.sampled_from(["shop", ROOT]),
)
def test_peer_authentication_policies_enforce_the_effective_mode(
    objs: list[dict[str, Any]], labels: dict[str, str], namespace: str
) -> None:
    pas = [peerauthentication.parse_peer_authentication(o) for o in objs]
    policies = store.PolicyStore()
    for policy in peerauthentication.build_policies(pas, root_namespace=ROOT):
        policies.insert(policy)
    keys = peerauthentication.find_peer_authentication_keys(
        namespace, labels, pas, root_namespace=ROOT
    )
    assert all(policies.find(k) is not None for k in keys)  # never a key without its policy
    local = workload.Workload(
        uid=ids.pod_uid(namespace, "w"),
        name="w",
        namespace=namespace,
        addresses=(ipaddress.ip_address("10.0.0.2"),),
        node="n1",
        authorization_policies=keys,
    )
    applicable = policies.find_applicable(local)
    peer = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/other/sa/x")
    for port in (80, 8080, 9090, 1234):
        mode = peerauthentication.find_effective_mode(
            namespace, labels, port, pas, root_namespace=ROOT
        )
        for identity in (None, peer):
            conn = rbac.ConnectionInfo(
                identity, ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"), port
            )
            allowed = rbac.evaluate(applicable, conn).is_allowed
            # mTLS always gets in; plaintext exactly when the mode is not STRICT.
            assert allowed == (
                identity is not None or mode is peerauthentication.MtlsMode.PERMISSIVE
            )
