"""PeerAuthentication in ambient: the mode each workload port resolves to, the keys workloads
list, and the DENY policies that enforce STRICT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meshcore.model import authorization
from meshcore.policy import errors
from meshcore.policy import peerauthentication as pa_mod
from tests.unit import policy_fixtures as f

STRICT = pa_mod.MtlsMode.STRICT
PERMISSIVE = pa_mod.MtlsMode.PERMISSIVE
STATIC = "istio-system/istio_converted_static_strict"
WEB = {"app": "web"}
OLD = "2025-01-01T00:00:00Z"
NEW = "2026-06-01T00:00:00Z"


def _parse(objs: Sequence[dict[str, Any]]) -> list[pa_mod.PeerAuthentication]:
    return [pa_mod.parse_peer_authentication(o) for o in objs]


def _mode(
    objs: Sequence[dict[str, Any]],
    port: int,
    labels: Mapping[str, str] = WEB,
    namespace: str = "shop",
) -> pa_mod.MtlsMode:
    return pa_mod.find_effective_mode(namespace, labels, port, _parse(objs), root_namespace=f.ROOT)


MESH_STRICT = f.pa("mesh", f.ROOT, mode="STRICT")
MODE_CASES: list[tuple[str, list[dict[str, Any]], int, pa_mod.MtlsMode]] = [
    ("none", [], 80, PERMISSIVE),
    ("mesh-strict", [MESH_STRICT], 80, STRICT),
    ("mesh-permissive", [f.pa("mesh", f.ROOT, mode="PERMISSIVE")], 80, PERMISSIVE),
    ("mesh-disable-is-permissive", [f.pa("mesh", f.ROOT, mode="DISABLE")], 80, PERMISSIVE),
    ("mesh-unset", [f.pa("mesh", f.ROOT)], 80, PERMISSIVE),
    (
        "namespace-permissive-over-mesh-strict",
        [MESH_STRICT, f.pa("ns", mode="PERMISSIVE")],
        80,
        PERMISSIVE,
    ),
    ("namespace-unset-inherits-mesh", [MESH_STRICT, f.pa("ns", mode="UNSET")], 80, STRICT),
    (
        "namespace-strict-over-mesh-permissive",
        [f.pa("mesh", f.ROOT, mode="PERMISSIVE"), f.pa("ns", mode="STRICT")],
        80,
        STRICT,
    ),
    ("other-namespace-policy-ignored", [f.pa("ns", "other", mode="STRICT")], 80, PERMISSIVE),
    (
        "workload-strict-over-namespace",
        [f.pa("ns", mode="PERMISSIVE"), f.pa("wl", mode="STRICT", selector=WEB)],
        80,
        STRICT,
    ),
    (
        "workload-permissive-over-mesh",
        [MESH_STRICT, f.pa("wl", mode="PERMISSIVE", selector=WEB)],
        80,
        PERMISSIVE,
    ),
    ("workload-unset-inherits", [MESH_STRICT, f.pa("wl", selector=WEB)], 80, STRICT),
    (
        "workload-not-selecting",
        [MESH_STRICT, f.pa("wl", mode="PERMISSIVE", selector={"app": "x"})],
        80,
        STRICT,
    ),
    ("root-selector-ignored", [f.pa("wl", f.ROOT, mode="STRICT", selector=WEB)], 80, PERMISSIVE),
    (
        "port-permissive-under-strict",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE"})],
        8080,
        PERMISSIVE,
    ),
    (
        "other-port-stays-strict",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE"})],
        80,
        STRICT,
    ),
    (
        "port-strict-under-permissive",
        [f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "STRICT"})],
        9090,
        STRICT,
    ),
    # istiod lists the converted key here but writes no rule for the port; we enforce it.
    (
        "port-strict-under-permissive-workload-mesh-strict",
        [MESH_STRICT, f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "STRICT"})],
        9090,
        STRICT,
    ),
    (
        "port-permissive-under-unset-namespace-strict-mesh",
        [
            MESH_STRICT,
            f.pa("ns", mode="UNSET"),
            f.pa("wl", selector=WEB, ports={8080: "PERMISSIVE"}),
        ],
        8080,
        PERMISSIVE,
    ),
    # istiod writes no rule here (it reads the UNSET namespace policy as not STRICT) yet lists
    # the converted key, so the whole workload would be open; the other ports stay STRICT.
    (
        "other-port-under-unset-namespace-strict-mesh",
        [
            MESH_STRICT,
            f.pa("ns", mode="UNSET"),
            f.pa("wl", selector=WEB, ports={8080: "PERMISSIVE"}),
        ],
        80,
        STRICT,
    ),
    (
        "port-disable-acts-permissive",
        [MESH_STRICT, f.pa("wl", selector=WEB, ports={8080: "DISABLE"})],
        8080,
        PERMISSIVE,
    ),
    (
        "port-unset-inherits",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "UNSET"})],
        8080,
        STRICT,
    ),
    (
        "port-level-on-namespace-policy-ignored",
        [f.pa("ns", mode="STRICT", ports={8080: "PERMISSIVE"})],
        8080,
        STRICT,
    ),
    (
        "oldest-namespace-policy-wins",
        [f.pa("b-new", mode="PERMISSIVE", created=NEW), f.pa("a-old", mode="STRICT", created=OLD)],
        80,
        STRICT,
    ),
    (
        "oldest-workload-policy-wins",
        [
            f.pa("new", mode="PERMISSIVE", selector=WEB, created=NEW),
            f.pa("old", mode="STRICT", selector={"app": "web"}, created=OLD),
        ],
        80,
        STRICT,
    ),
    (
        "oldest-mesh-policy-wins",
        [
            f.pa("new", f.ROOT, mode="STRICT", created=NEW),
            f.pa("old", f.ROOT, mode="PERMISSIVE", created=OLD),
        ],
        80,
        PERMISSIVE,
    ),
]


@pytest.mark.parametrize(
    ("objs", "port", "mode"), [c[1:] for c in MODE_CASES], ids=[c[0] for c in MODE_CASES]
)
def test_effective_mode(objs: list[dict[str, Any]], port: int, mode: pa_mod.MtlsMode) -> None:
    assert _mode(objs, port) is mode


def test_workload_in_root_namespace_uses_mesh_policy_only() -> None:
    objs = [MESH_STRICT, f.pa("wl", f.ROOT, mode="PERMISSIVE", selector=WEB)]
    assert _mode(objs, 80, namespace=f.ROOT) is STRICT


KEY_CASES: list[tuple[str, list[dict[str, Any]], tuple[str, ...]]] = [
    ("none", [], ()),
    ("mesh-strict", [MESH_STRICT], (STATIC,)),
    ("namespace-permissive", [MESH_STRICT, f.pa("ns", mode="PERMISSIVE")], ()),
    ("workload-strict", [f.pa("wl", mode="STRICT", selector=WEB)], (STATIC,)),
    (
        "workload-strict-all-ports-strict",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={80: "STRICT", 81: "UNSET"})],
        (STATIC,),
    ),
    (
        "workload-strict-with-exception",
        [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE"})],
        ("shop/converted_peer_authentication_wl",),
    ),
    (
        "workload-permissive-with-strict-port",
        [f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "STRICT"})],
        ("shop/converted_peer_authentication_wl",),
    ),
    (
        "workload-permissive-all-ports-permissive",
        [f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "DISABLE"})],
        (),
    ),
]


@pytest.mark.parametrize(
    ("objs", "keys"), [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES]
)
def test_keys(objs: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    got = pa_mod.find_peer_authentication_keys("shop", WEB, _parse(objs), root_namespace=f.ROOT)
    assert got == keys


NO_ID = authorization.Match(not_principals=(f.PRESENCE,))


def test_static_strict_policy() -> None:
    assert pa_mod.build_static_strict("mesh-root") == authorization.Authorization(
        name="istio_converted_static_strict",
        namespace="mesh-root",
        scope=authorization.Scope.WORKLOAD_SELECTOR,
        action=authorization.Action.DENY,
        rules=(f.rule([NO_ID]),),
    )


def test_static_strict_sent_with_any_peer_authentication() -> None:
    assert pa_mod.build_policies([], root_namespace=f.ROOT) == ()
    [static] = pa_mod.build_policies(_parse([f.pa("ns", mode="PERMISSIVE")]), root_namespace=f.ROOT)
    assert static.key == STATIC


@pytest.mark.parametrize(
    ("objs", "rules"),
    [
        # Explicit STRICT: identity clause first, then one clause per exception port.
        (
            [f.pa("wl", mode="STRICT", selector=WEB, ports={8080: "PERMISSIVE", 81: "DISABLE"})],
            (
                f.rule(
                    [NO_ID],
                    [authorization.Match(not_destination_ports=(81,))],
                    [authorization.Match(not_destination_ports=(8080,))],
                ),
            ),
        ),
        # Inherited STRICT merged in: port clauses first, identity last.
        (
            [MESH_STRICT, f.pa("wl", selector=WEB, ports={8080: "PERMISSIVE"})],
            (f.rule([authorization.Match(not_destination_ports=(8080,))], [NO_ID]),),
        ),
        # PERMISSIVE with STRICT ports: one rule per port.
        (
            [f.pa("wl", mode="PERMISSIVE", selector=WEB, ports={9090: "STRICT", 9091: "STRICT"})],
            (
                f.rule(
                    [authorization.Match(not_principals=(f.PRESENCE,), destination_ports=(9090,))]
                ),
                f.rule(
                    [authorization.Match(not_principals=(f.PRESENCE,), destination_ports=(9091,))]
                ),
            ),
        ),
    ],
    ids=["strict-with-exceptions", "inherited-strict", "permissive-with-strict-ports"],
)
def test_port_level_policy(
    objs: list[dict[str, Any]], rules: tuple[authorization.Rule, ...]
) -> None:
    [policy] = pa_mod.build_port_level_policies(_parse(objs), root_namespace=f.ROOT)
    assert policy.key == "shop/converted_peer_authentication_wl"
    assert policy.scope is authorization.Scope.WORKLOAD_SELECTOR
    assert policy.action is authorization.Action.DENY
    assert policy.rules == rules


@pytest.mark.parametrize(
    "objs",
    [
        [f.pa("wl", mode="STRICT", selector=WEB)],  # no port levels
        [f.pa("wl", mode="STRICT", selector=WEB, ports={80: "STRICT"})],  # no exception
        [f.pa("ns", mode="STRICT", ports={80: "PERMISSIVE"})],  # namespace-wide
        [f.pa("wl", f.ROOT, mode="STRICT", selector=WEB, ports={80: "PERMISSIVE"})],  # root
    ],
    ids=["no-ports", "no-exception", "namespace-wide", "root-namespace"],
)
def test_no_port_level_policy(objs: list[dict[str, Any]]) -> None:
    assert pa_mod.build_port_level_policies(_parse(objs), root_namespace=f.ROOT) == ()


def test_unknown_mode_names_the_field() -> None:
    with pytest.raises(errors.InvalidPolicyError) as invalid:
        pa_mod.parse_peer_authentication(f.pa(mode="STRICT", ports={80: "ON"}))
    assert invalid.value.field == "spec.portLevelMtls['80'].mode"
    with pytest.raises(errors.InvalidPolicyError) as invalid:
        pa_mod.parse_peer_authentication(f.pa(mode="strict"))
    assert invalid.value.field == "spec.mtls.mode"


def test_port_keys_that_no_connection_has_are_left_out() -> None:
    parsed = pa_mod.parse_peer_authentication(
        f.pa(
            mode="STRICT",
            selector=WEB,
            ports={
                "80": "PERMISSIVE",
                "0": "PERMISSIVE",
                "http": "PERMISSIVE",
                "70000": "PERMISSIVE",
            },
        )
    )
    assert parsed.port_modes == ((80, PERMISSIVE),)
