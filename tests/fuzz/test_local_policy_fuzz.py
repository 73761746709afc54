"""Hypothesis on the policy schemas and the Warning header codec.

Properties: the schemas judge any JSON without raising; a policy they accept is one the
conversion to ztunnel's policies (`meshcore.policy`) and the status analysis handle without an
error, so nothing stored can fail to translate (a DENY that failed would silently stop
denying); the Warning header parser only returns texts, and reads back what the server writes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.sources.local import apiserver, policyschemas, policystatus, validation
from meshcore.kube import client
from meshcore.policy import analysis, authorization, peerauthentication

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values near the edges of what is valid: ports, addresses, identities, wildcards.
STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "*",
            "80",
            "0",
            "65535",
            "65536",
            "080",
            "-1",
            "http",
            "10.0.0.1",
            "10.0.0.0/8",
            "10.0.0.0/33",
            "::1",
            "fe80::1%eth0",
            "10.0.0.0/255.0.0.0",
            "cluster.local/ns/default/sa/frontend",
            "spiffe://cluster.local/ns/a/sa/b",
            "ns/sa",
            "a/b/c",
            "prefix*",
            "*suffix",
            "/a/{*}/b/{**}",
            "/a/{**}/{*}",
            "GET",
            "source.ip",
            "destination.port",
            "request.headers[x]",
            "request.headers[",
            "source.colour",
            "9" * 30,
        ]
    ),
    st.text(max_size=12),
)
SCALARS = st.one_of(STRINGS, st.integers(-5, 70000), st.booleans(), st.none())
STRING_LISTS = st.one_of(st.lists(STRINGS, max_size=3), SCALARS)

IDENTITIES = ["*", "cluster.local/ns/default/sa/frontend", "spiffe://td/ns/a/sa/b", "ns*", "*x"]
IPS = ["10.0.0.1", "10.0.0.0/8", "10.0.0.1/24", "::1", "fd00::/8", "10.0.0.0/33", "fe80::1%eth0"]
PORTS = ["0", "80", "080", "65535", "65536", "http", "9" * 30]
ACCOUNTS = ["sa", "ns/sa", "a/b/c", "*", "/sa"]
PATHS = ["/a", "/a/{*}/b/{**}", "/a/{**}/{*}", "/{x}"]
PLAIN = ["GET", "a.example", "x"]


def _values(candidates: list[str]) -> st.SearchStrategy[Any]:
    """Mostly lists of such values (valid or not), sometimes anything."""
    good = st.lists(st.sampled_from(candidates), min_size=1, max_size=3)
    return st.one_of(good, good, good, STRING_LISTS)


SOURCE_VALUES = {
    **{f: _values(IDENTITIES) for f in policyschemas._SOURCE_FIELDS},
    **{f: _values(IPS) for f in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")},
    **{f: _values(ACCOUNTS) for f in ("serviceAccounts", "notServiceAccounts")},
    "principal": STRING_LISTS,
}
OPERATION_VALUES = {
    **{f: _values(PLAIN) for f in policyschemas._OPERATION_FIELDS},
    **{f: _values(PORTS) for f in ("ports", "notPorts")},
    **{f: _values(PATHS) for f in ("paths", "notPaths")},
    "port": STRING_LISTS,
}


def _entries(fields: dict[str, st.SearchStrategy[Any]], inner: str) -> st.SearchStrategy[Any]:
    body = st.sampled_from(sorted(fields)).flatmap(
        lambda first: st.fixed_dictionaries(
            {first: fields[first]},
            optional={f: v for f, v in fields.items() if f != first},
        )
    )
    entries = st.lists(st.fixed_dictionaries({inner: body}), min_size=1, max_size=2)
    return st.one_of(entries, entries, entries, SCALARS)


WHEN_KEYS = st.sampled_from(
    [
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "destination.ip",
        "request.headers[x]",
        "request.headers[",
        "source.colour",
        "",
    ]
)
CONDITIONS = st.lists(
    st.fixed_dictionaries(
        {"key": WHEN_KEYS},
        optional={"values": _values([*IPS, *PORTS, *IDENTITIES]), "notValues": _values(PORTS)},
    ),
    max_size=2,
)
RULES = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "from": _entries(SOURCE_VALUES, "source"),
            "to": _entries(OPERATION_VALUES, "operation"),
            "when": CONDITIONS,
        },
    ),
    max_size=3,
)
TARGET = st.fixed_dictionaries(
    {"kind": st.sampled_from(["Service", "Gateway", "Pod"]), "name": STRINGS},
    optional={"group": st.sampled_from(["", "gateway.networking.k8s.io"]), "namespace": STRINGS},
)
AP_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM", "", "allow"]),
        "selector": st.fixed_dictionaries(
            {}, optional={"matchLabels": st.dictionaries(STRINGS, STRINGS, max_size=2)}
        ),
        "targetRefs": st.lists(TARGET, max_size=2),
        "targetRef": TARGET,
        "provider": st.fixed_dictionaries({"name": STRINGS}),
        "rules": st.one_of(RULES, RULES, RULES, SCALARS),
    },
)
LABELS = st.fixed_dictionaries({}, optional={"matchLabels": st.just({"app": "web"})})
# Mostly well-formed policies, so that the rules (where the conversion does most) get through.
RULE_SPECS = st.fixed_dictionaries(
    {"action": st.sampled_from(["ALLOW", "DENY"]), "rules": RULES},
    optional={"selector": LABELS},
)
MODES = st.sampled_from(["STRICT", "PERMISSIVE", "DISABLE", "UNSET", "strict", ""])
PA_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "selector": st.one_of(
            LABELS,
            st.fixed_dictionaries(
                {}, optional={"matchLabels": st.dictionaries(STRINGS, STRINGS, max_size=2)}
            ),
        ),
        "mtls": st.one_of(st.fixed_dictionaries({}, optional={"mode": MODES}), SCALARS),
        "portLevelMtls": st.dictionaries(
            st.one_of(st.sampled_from(PORTS), STRINGS), st.fixed_dictionaries({"mode": MODES})
        ),
    },
)
PORT_LEVEL_SPECS = st.fixed_dictionaries(
    {
        "selector": st.just({"matchLabels": {"app": "db"}}),
        "portLevelMtls": st.dictionaries(
            st.sampled_from(["1", "80", "080", "65535"]),
            st.fixed_dictionaries({"mode": st.sampled_from(["STRICT", "DISABLE", "UNSET"])}),
            min_size=1,
        ),
    }
)
ANNOTATIONS = st.fixed_dictionaries({}, optional={"istio.io/dry-run": st.sampled_from(["true"])})


def _object(kind: str, spec: Any, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": "p", "namespace": "shop", "annotations": annotations},
        "spec": spec,
    }


@SETTINGS
@given(st.one_of(AP_SPECS, RULE_SPECS), ANNOTATIONS)
def test_an_accepted_authorization_policy_always_converts(
    spec: dict[str, Any], annotations: dict[str, str]
) -> None:
    obj = _object("AuthorizationPolicy", spec, annotations)
    found = validation.validate(policyschemas.AUTHORIZATION_POLICY, obj)
    assert all(isinstance(e, validation.FieldError) for e in found)
    if found:
        return
    # Accepted: the conversion and the analysis must take it as it is.
    authorization.build_translation(obj, dry_run_enabled=True)
    analysis.find_unenforced(obj)
    condition = policystatus.build_condition(obj, root_namespace="istio-system")
    assert condition.reason != policystatus.REASON_INVALID


@SETTINGS
@given(st.one_of(PA_SPECS, PORT_LEVEL_SPECS))
def test_an_accepted_peer_authentication_always_converts(spec: dict[str, Any]) -> None:
    obj = _object("PeerAuthentication", spec, {})
    found = validation.validate(policyschemas.PEER_AUTHENTICATION, obj)
    if found:
        return
    parsed = peerauthentication.parse_peer_authentication(obj)
    # No port of a valid portLevelMtls is dropped as "not a port".
    assert len(parsed.port_modes) == len(spec.get("portLevelMtls") or {})


@SETTINGS
@given(st.recursive(SCALARS, lambda inner: st.lists(inner) | st.dictionaries(STRINGS, inner)))
def test_the_schemas_judge_any_json_without_raising(value: Any) -> None:
    for schema in (policyschemas.AUTHORIZATION_POLICY, policyschemas.PEER_AUTHENTICATION):
        assert all(isinstance(e, validation.FieldError) for e in validation.validate(schema, value))
        obj = _object("AuthorizationPolicy", value, {})
        validation.validate(schema, obj)


@SETTINGS
@given(st.text(max_size=80))
def test_the_warning_parser_only_returns_texts(value: str) -> None:
    texts = client.parse_warning_header(value)
    assert all(isinstance(t, str) for t in texts)


@SETTINGS
@given(st.lists(st.text(max_size=600), max_size=40))
def test_warning_headers_read_back_what_the_server_writes(texts: list[str]) -> None:
    built = apiserver.build_warnings(texts)
    assert len(built) <= apiserver.MAX_WARNINGS
    for text in built:
        header = apiserver.build_warning_header(text).decode()
        assert client.parse_warning_header(header) == [text]
