"""The schemas of Istio's AuthorizationPolicy and PeerAuthentication in the local API: every
error names its field path, the whole object is judged at once, AUDIT and CUSTOM get istiod's
ztunnel wording."""

from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import policyschemas, validation
from meshcore.kube import errors


def _ap(spec: dict[str, Any] | None, namespace: str = "shop") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "policy", "namespace": namespace},
    }
    if spec is not None:
        obj["spec"] = spec
    return obj


def _pa(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": spec,
    }


def _ap_errors(spec: dict[str, Any] | None, namespace: str = "shop") -> list[str]:
    return [str(e) for e in validation.validate(policyschemas.AUTHORIZATION_POLICY, _ap(spec))]


def _pa_errors(spec: dict[str, Any]) -> list[str]:
    return [str(e) for e in validation.validate(policyschemas.PEER_AUTHENTICATION, _pa(spec))]


def _from(**source: Any) -> dict[str, Any]:
    return {"rules": [{"from": [{"source": source}]}]}


def _to(**operation: Any) -> dict[str, Any]:
    return {"rules": [{"to": [{"operation": operation}]}]}


FRONTEND = "cluster.local/ns/default/sa/frontend"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(None, id="no-spec"),
        pytest.param({}, id="allow-nothing"),
        pytest.param({"action": "ALLOW", **_from(principals=[FRONTEND])}, id="seed-allow"),
        pytest.param(
            {
                "selector": {"matchLabels": {"app": "server"}},
                "action": "DENY",
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "namespaces": ["shop", "prod*"],
                                    "notPrincipals": ["*"],
                                    "ipBlocks": ["10.0.0.1", "10.1.0.0/16", "fd00::/8"],
                                    "notIpBlocks": ["10.1.2.3/32"],
                                }
                            }
                        ],
                        "to": [{"operation": {"ports": ["8080", "0", "65535"], "notPorts": ["9"]}}],
                        "when": [
                            {"key": "source.ip", "values": ["10.0.0.0/8"]},
                            {"key": "destination.port", "notValues": ["22"]},
                            {"key": "request.headers[x-user]", "values": ["a"]},
                        ],
                    }
                ],
            },
            id="deny-everything-l4",
        ),
        pytest.param({"action": "DENY", "rules": [{}]}, id="deny-all-with-empty-rule"),
        pytest.param(_from(serviceAccounts=["frontend", "other/backend"]), id="service-accounts"),
        pytest.param(
            _to(methods=["GET"], paths=["/api/{*}/items/{**}"], hosts=["a.example"]),
            id="l7-fields-are-valid",
        ),
        pytest.param(
            {
                "targetRefs": [
                    {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "w"}
                ]
            },
            id="target-refs",
        ),
        pytest.param(
            {"targetRef": {"kind": "Service", "name": "web", "namespace": "shop"}},
            id="target-ref-own-namespace",
        ),
        pytest.param(
            {"action": "AUDIT", "targetRefs": [{"kind": "Service", "name": "web"}], "rules": [{}]},
            id="audit-for-a-waypoint",
        ),
        pytest.param(
            {
                "action": "CUSTOM",
                "provider": {"name": "ext-authz"},
                "targetRefs": [{"kind": "Service", "name": "web"}],
                "rules": [{}],
            },
            id="custom-for-a-waypoint",
        ),
        pytest.param({"selector": {}, "targetRefs": []}, id="empty-target-refs-do-not-count"),
    ],
)
def test_valid_authorization_policies(spec: dict[str, Any] | None) -> None:
    assert _ap_errors(spec) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"action": "AUDIT", "rules": [{}]},
            ['spec.action: Unsupported value: "AUDIT": ztunnel does not support the AUDIT action'],
            id="audit",
        ),
        pytest.param(
            {"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]},
            [
                'spec.action: Unsupported value: "CUSTOM": ztunnel does not support the CUSTOM '
                "action"
            ],
            id="custom",
        ),
        pytest.param(
            {"action": "allow"},
            [
                'spec.action: Unsupported value: "allow": supported values: "ALLOW", "DENY", '
                '"AUDIT", "CUSTOM"'
            ],
            id="action-case",
        ),
        pytest.param(
            _from(principal=["x"]),
            ["spec.rules[0].from[0].source.principal: Unknown field"],
            id="unknown-source-field",
        ),
        pytest.param(
            {"rule": []},
            ["spec.rule: Unknown field"],
            id="unknown-spec-field",
        ),
        pytest.param(
            _to(ports=[7000]),
            ["spec.rules[0].to[0].operation.ports[0]: Invalid value: 7000: must be of type string"],
            id="port-number-not-string",
        ),
        pytest.param(
            _to(ports=["70000"]),
            [
                'spec.rules[0].to[0].operation.ports[0]: Invalid value: "70000": must be a port '
                "number between 0 and 65535, written as a string of digits"
            ],
            id="port-out-of-range",
        ),
        pytest.param(
            _to(notPorts=["http"]),
            [
                'spec.rules[0].to[0].operation.notPorts[0]: Invalid value: "http": must be a port '
                "number between 0 and 65535, written as a string of digits"
            ],
            id="port-name",
        ),
        pytest.param(
            _from(principals="cluster.local/ns/a/sa/b"),
            [
                'spec.rules[0].from[0].source.principals: Invalid value: "cluster.local/ns/a/sa/b"'
                ": must be of type array"
            ],
            id="principals-not-a-list",
        ),
        pytest.param(
            _from(principals=[""]),
            ["spec.rules[0].from[0].source.principals[0]: Required value"],
            id="empty-principal",
        ),
        pytest.param(
            _from(ipBlocks=["10.0.0.300"]),
            [
                'spec.rules[0].from[0].source.ipBlocks[0]: Invalid value: "10.0.0.300": must be '
                "an IP address or a CIDR range (e.g. 10.1.2.3 or 10.1.0.0/16)"
            ],
            id="bad-ip",
        ),
        pytest.param(
            _from(notIpBlocks=["10.0.0.0/255.0.0.0"]),
            [
                'spec.rules[0].from[0].source.notIpBlocks[0]: Invalid value: "10.0.0.0/255.0.0.0"'
                ": must be an IP address or a CIDR range (e.g. 10.1.2.3 or 10.1.0.0/16)"
            ],
            id="netmask-form",
        ),
        pytest.param(
            _from(ipBlocks=["fe80::1%eth0"]),
            [
                'spec.rules[0].from[0].source.ipBlocks[0]: Invalid value: "fe80::1%eth0": must be '
                "an IP address or a CIDR range (e.g. 10.1.2.3 or 10.1.0.0/16)"
            ],
            id="ipv6-zone",
        ),
        pytest.param(
            _from(),
            ["spec.rules[0].from[0].source: Required value: a source must set at least one field"],
            id="empty-source",
        ),
        pytest.param(
            {"rules": [{"from": [{}]}]},
            ["spec.rules[0].from[0].source: Required value"],
            id="from-without-source",
        ),
        pytest.param(
            {"rules": [{"from": []}]},
            ["spec.rules[0].from: Required value"],
            id="empty-from",
        ),
        pytest.param(
            _to(ports=[]),
            [
                "spec.rules[0].to[0].operation: Required value: an operation must set at least one"
                " field"
            ],
            id="empty-operation",
        ),
        pytest.param(
            _from(serviceAccounts=["sa"], principals=["x"]),
            [
                "spec.rules[0].from[0].source.serviceAccounts: Forbidden: may not be set together"
                " with principals or namespaces"
            ],
            id="service-accounts-with-principals",
        ),
        pytest.param(
            _from(serviceAccounts=["a/b/c"]),
            [
                'spec.rules[0].from[0].source.serviceAccounts[0]: Invalid value: "a/b/c": '
                "expected format 'serviceAccount' or 'namespace/serviceAccount'"
            ],
            id="service-account-format",
        ),
        pytest.param(
            _to(paths=["/a/{**}/{*}"]),
            [
                'spec.rules[0].to[0].operation.paths[0]: Invalid value: "/a/{**}/{*}": {**} must '
                "be the last operator of a path template"
            ],
            id="path-template",
        ),
        pytest.param(
            {"rules": [{"when": [{"key": "source.ip"}]}]},
            ["spec.rules[0].when[0].values: Required value: values or notValues must be set"],
            id="when-without-values",
        ),
        pytest.param(
            {"rules": [{"when": [{"key": "source.colour", "values": ["red"]}]}]},
            ['spec.rules[0].when[0].key: Invalid value: "source.colour": unknown attribute'],
            id="when-unknown-key",
        ),
        pytest.param(
            {"rules": [{"when": [{"key": "destination.port", "values": ["80", "x"]}]}]},
            [
                'spec.rules[0].when[0].values[1]: Invalid value: "x": must be a port number '
                "between 0 and 65535, written as a string of digits"
            ],
            id="when-port-value",
        ),
        pytest.param(
            {"rules": [{"when": [{"values": ["a"]}]}]},
            ["spec.rules[0].when[0].key: Required value"],
            id="when-without-key",
        ),
        pytest.param(
            {
                "selector": {"matchLabels": {"app": "web"}},
                "targetRefs": [{"kind": "Service", "name": "web"}],
            },
            [
                "spec.targetRefs: Forbidden: may not be set together with selector: only one of "
                "selector, targetRef or targetRefs can be set"
            ],
            id="selector-and-target-refs",
        ),
        pytest.param(
            {"selector": {}, "targetRef": {"kind": "Service", "name": "web"}},
            [
                "spec.targetRef: Forbidden: may not be set together with selector: only one of "
                "selector, targetRef or targetRefs can be set"
            ],
            id="empty-selector-and-target-ref",
        ),
        pytest.param(
            {"targetRefs": [{"kind": "Pod", "name": "web"}]},
            [
                'spec.targetRefs[0].kind: Unsupported value: "Pod": supported values: "Service", '
                '"networking.istio.io/ServiceEntry", "gateway.networking.k8s.io/Gateway", '
                '"gateway.networking.k8s.io/GatewayClass"'
            ],
            id="target-kind",
        ),
        pytest.param(
            {"targetRefs": [{"kind": "Service"}]},
            ["spec.targetRefs[0].name: Required value"],
            id="target-without-name",
        ),
        pytest.param(
            {"targetRef": {"kind": "Service", "name": "web", "namespace": "other"}},
            [
                "spec.targetRef.namespace: Forbidden: must be empty or the policy's own namespace"
                " 'shop': cross-namespace references are not supported"
            ],
            id="cross-namespace-target",
        ),
        pytest.param(
            {"action": "DENY"},
            [
                "spec.rules: Required value: a DENY policy without rules never matches; add an "
                "empty rule {} to deny everything it selects"
            ],
            id="deny-without-rules",
        ),
        pytest.param(
            {"provider": {"name": "ext"}},
            ["spec.provider: Forbidden: may only be set with the CUSTOM action, not ALLOW"],
            id="provider-without-custom",
        ),
        pytest.param(
            {"selector": {"matchLabels": {"app": "*"}}},
            [
                'spec.selector.matchLabels: Invalid value: "*": a valid label must be an empty '
                "string or consist of alphanumeric characters, '-', '_' or '.', and must start "
                "and end with an alphanumeric character"
            ],
            id="wildcard-selector",
        ),
        pytest.param(
            {"rules": [{"to": [{"operation": {"ports": [80]}}], "from": [{"source": 1}]}]},
            [
                "spec.rules[0].to[0].operation.ports[0]: Invalid value: 80: must be of type string",
                "spec.rules[0].from[0].source: Invalid value: 1: must be of type object",
            ],
            id="every-error-at-once",
        ),
    ],
)
def test_invalid_authorization_policies(spec: dict[str, Any], expected: list[str]) -> None:
    assert _ap_errors(spec) == expected


def test_the_invalid_error_names_kind_name_and_every_path() -> None:
    spec = {"rules": [{"to": [{"operation": {"ports": [80]}}], "from": [{"source": 1}]}]}
    found = validation.validate(policyschemas.AUTHORIZATION_POLICY, _ap(spec))
    error = validation.build_invalid_error("AuthorizationPolicy", "policy", found)
    assert isinstance(error, errors.InvalidError)
    assert error.message.startswith('AuthorizationPolicy "policy" is invalid: [spec.rules[0].to')
    causes = error.status["details"]["causes"]
    assert [c["field"] for c in causes] == [
        "spec.rules[0].to[0].operation.ports[0]",
        "spec.rules[0].from[0].source",
    ]


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"mtls": {"mode": "STRICT"}}, id="seed-mesh-strict"),
        pytest.param({}, id="empty"),
        pytest.param({"mtls": {}}, id="no-mode"),
        pytest.param(
            {
                "selector": {"matchLabels": {"app": "db"}},
                "mtls": {"mode": "PERMISSIVE"},
                "portLevelMtls": {"5432": {"mode": "STRICT"}, "9090": {"mode": "DISABLE"}},
            },
            id="port-level-with-selector",
        ),
        pytest.param({"mtls": {"mode": "UNSET"}}, id="unset"),
    ],
)
def test_valid_peer_authentications(spec: dict[str, Any]) -> None:
    assert _pa_errors(spec) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"mtls": {"mode": "strict"}},
            [
                'spec.mtls.mode: Unsupported value: "strict": supported values: "UNSET", '
                '"DISABLE", "PERMISSIVE", "STRICT"'
            ],
            id="mode-case",
        ),
        pytest.param(
            {"mtls": "STRICT"},
            ['spec.mtls: Invalid value: "STRICT": must be of type object'],
            id="mtls-not-object",
        ),
        pytest.param(
            {"mtls": {"mode": "STRICT", "x": 1}}, ["spec.mtls.x: Unknown field"], id="unknown-field"
        ),
        pytest.param(
            {"portLevelMtls": {"8080": {"mode": "DISABLE"}}},
            [
                "spec.portLevelMtls: Forbidden: a mesh-wide or namespace-wide PeerAuthentication "
                "cannot have port-level mTLS: it needs selector.matchLabels"
            ],
            id="port-level-without-selector",
        ),
        pytest.param(
            {"selector": {}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}},
            [
                "spec.portLevelMtls: Forbidden: a mesh-wide or namespace-wide PeerAuthentication "
                "cannot have port-level mTLS: it needs selector.matchLabels"
            ],
            id="port-level-with-empty-selector",
        ),
        pytest.param(
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {}},
            ["spec.portLevelMtls: Required value: if set, must hold at least one port"],
            id="empty-port-level",
        ),
        pytest.param(
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "X"}}},
            [
                'spec.portLevelMtls: Invalid value: "http": must be a port number between 1 and '
                "65535",
                'spec.portLevelMtls[http].mode: Unsupported value: "X": supported values: '
                '"UNSET", "DISABLE", "PERMISSIVE", "STRICT"',
            ],
            id="bad-port-key-and-mode",
        ),
        pytest.param(
            {
                "selector": {"matchLabels": {"a": "b"}},
                "portLevelMtls": {"80": {"mode": "STRICT"}, "080": {"mode": "DISABLE"}},
            },
            ['spec.portLevelMtls: Duplicate value: "080"'],
            id="same-port-twice",
        ),
        pytest.param(
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}},
            ['spec.portLevelMtls: Invalid value: "0": must be a port number between 1 and 65535'],
            id="port-zero",
        ),
    ],
)
def test_invalid_peer_authentications(spec: dict[str, Any], expected: list[str]) -> None:
    assert _pa_errors(spec) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("0", True),
        ("65535", True),
        ("080", True),
        ("65536", False),
        ("", False),
        ("-1", False),
        ("+1", False),
        (" 80", False),
        ("٣", False),  # a digit, but not an ASCII one
        ("9" * 5000, False),
    ],
    ids=lambda v: repr(v)[:12] if isinstance(v, str) else str(v),
)
def test_port_number(value: str, ok: bool) -> None:
    assert (policyschemas.port_number(value) is None) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.0.0.1", True),
        ("10.0.0.0/8", True),
        ("10.0.0.1/24", True),  # host bits are ignored, as Go's ParsePrefix allows
        ("2001:db8::/32", True),
        ("::1", True),
        ("10.0.0.0/33", False),
        ("10.0.0.0/", False),
        ("10.0.0.0/0x8", False),
        ("localhost", False),
        ("10.0.0.0/8/8", False),
    ],
)
def test_ip_or_cidr(value: str, ok: bool) -> None:
    assert (policyschemas.ip_or_cidr(value) is None) is ok
