from __future__ import annotations

from typing import Any

import pytest

from meshctl import check, cli, errors

CAPTURED = {"ambient.istio.io/redirection": "enabled"}


def _pod(
    name: str, ip: str, *, ns: str = "shop", sa: str | None = None, captured: bool = True
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": name},
            "annotations": dict(CAPTURED) if captured else {},
        },
        "spec": {
            "serviceAccountName": sa or name,
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": ip, "phase": "Running"},
    }


def _ap(name: str, spec: dict[str, Any], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def _pa(name: str, mode: str, ns: str = "istio-system") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mtls": {"mode": mode}},
    }


FRONTEND = _pod("frontend", "10.244.0.5")
INTRUDER = _pod("intruder", "10.244.0.6")
LEGACY = _pod("legacy", "10.244.0.7", ns="outside", captured=False)
SERVER = _pod("server", "10.244.1.9")
ALLOW_FRONTEND = _ap(
    "frontend-only",
    {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "ALLOW",
        "rules": [
            {"to": [{"operation": {"methods": ["GET"]}}]},  # HTTP: dropped at L4
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]},
        ],
    },
)
DENY_7001 = _ap(
    "no-7001", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["7001"]}}]}]}
)


@pytest.mark.parametrize(
    ("aps", "pas", "source", "destination", "port", "allowed", "because"),
    [
        ([], [], INTRUDER, SERVER, 8080, True, "no ALLOW policy applies"),
        (
            [ALLOW_FRONTEND],
            [],
            FRONTEND,
            SERVER,
            8080,
            True,
            "allowed by AuthorizationPolicy shop/frontend-only, rule spec.rules[1]",
        ),
        (
            [ALLOW_FRONTEND],
            [],
            INTRUDER,
            SERVER,
            8080,
            False,
            "no rule of the ALLOW policies in effect matched"
            " (AuthorizationPolicy shop/frontend-only)",
        ),
        (
            [DENY_7001],
            [],
            FRONTEND,
            SERVER,
            7001,
            False,
            "denied by AuthorizationPolicy shop/no-7001, rule spec.rules[0]",
        ),
        ([DENY_7001], [], FRONTEND, SERVER, 7000, True, "no DENY policy matched"),
        (
            [],
            [_pa("default", "STRICT")],
            LEGACY,
            SERVER,
            8080,
            False,
            "denied by PeerAuthentication mode STRICT",
        ),
        ([], [_pa("default", "STRICT")], FRONTEND, SERVER, 8080, True, "no ALLOW policy"),
        ([], [_pa("default", "PERMISSIVE")], LEGACY, SERVER, 8080, True, "no ALLOW policy"),
        (
            [ALLOW_FRONTEND],
            [],
            INTRUDER,
            _pod("server", "10.244.1.9", captured=False),
            8080,
            True,
            "destination is not in the mesh",
        ),
        (
            [
                _ap(
                    "broken",
                    {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]},
                )
            ],
            [],
            INTRUDER,
            SERVER,
            8080,
            True,
            "no ALLOW policy applies",  # the controller skips what does not translate, too
        ),
    ],
    ids=[
        "no-policy",
        "allow-principal",
        "allow-list-misses",
        "deny-port",
        "deny-other-port",
        "strict-plaintext",
        "strict-mtls",
        "permissive-plaintext",
        "destination-outside-mesh",
        "invalid-policy-skipped",
    ],
)
def test_check_pod(
    aps: list[dict[str, Any]],
    pas: list[dict[str, Any]],
    source: dict[str, Any],
    destination: dict[str, Any],
    port: int,
    allowed: bool,
    because: str,
) -> None:
    policies = check.build_policies(aps, pas, root_namespace="istio-system")
    verdict = check.check_pod(policies, source, destination, port)
    assert verdict.allowed is allowed
    assert any(because in line for line in verdict.explanation), verdict.explanation
    assert verdict.address == f"{destination['status']['podIP']}:{port}"


def test_render_and_skipped_policies_are_reported() -> None:
    bad = _ap("broken", {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]})
    policies = check.build_policies([bad], [], root_namespace="istio-system")
    text = check.render(
        "shop/intruder", [check.check_pod(policies, INTRUDER, SERVER, 80)], policies.skipped
    )
    assert text.startswith("ALLOW shop/intruder -> shop/server (10.244.1.9:80)\n")
    assert "note: skipped an invalid policy" in text
    assert "spec.rules[0].to[0].operation.ports[0]" in text


def test_service_ports_resolve_per_pod() -> None:
    service = {
        "spec": {"ports": [{"port": 80, "targetPort": "http"}, {"port": 81, "targetPort": 9000}]}
    }
    assert check.resolve_service_port(service, 80, SERVER) == 8080
    assert check.resolve_service_port(service, 81, SERVER) == 9000
    assert check.resolve_service_port(service, 82, SERVER) is None
    grpc = {"spec": {"ports": [{"port": 80, "targetPort": "grpc"}]}}
    assert check.resolve_service_port(grpc, 80, SERVER) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:8080", (None, "server", 8080)),
        ("pod/server:1", ("pod", "server", 1)),
        ("svc/catalog:80", ("service", "catalog", 80)),
    ],
)
def test_parse_destination(text: str, expected: tuple[str | None, str, int]) -> None:
    assert cli.parse_destination(text) == expected


@pytest.mark.parametrize(
    "text", ["server", "server:", ":80", "server:0", "server:70000", "deploy/x:80"]
)
def test_parse_destination_refuses(text: str) -> None:
    with pytest.raises(errors.UsageError):
        cli.parse_destination(text)
