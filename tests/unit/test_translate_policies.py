"""The Translator with AuthorizationPolicy and PeerAuthentication events: which policies go out,
and which workloads list which keys, as deltas."""

from __future__ import annotations

import pytest

from controller.translate import translator
from meshcore.model import authorization, ids
from tests.unit import policy_fixtures as f
from tests.unit import test_translate_fixtures as kube

STATIC = ids.PolicyKey("istio-system/istio_converted_static_strict")
WEB_UID = ids.pod_uid("shop", "web-1")


def _translator(root: str = f.ROOT) -> translator.Translator:
    return translator.Translator(
        trust_domain="cluster.local",
        cluster_id="Kubernetes",
        domain="cluster.local",
        root_namespace=root,
    )


def _keys(changes: translator.Changes) -> dict[str, tuple[str, ...]]:
    return {w.name: w.authorization_policies for w in changes.workloads}


def test_selector_policy_is_sent_and_listed_by_the_pods_it_selects() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", labels={"app": "web"}, ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("api-1", labels={"app": "api"}, ip="10.0.0.2"))
    changes = tr.apply("ADDED", f.ap("allow-web", selector={"app": "web"}, rules=[{}]))
    assert [p.key for p in changes.policies] == ["shop/allow-web"]
    assert changes.policies[0].scope is authorization.Scope.WORKLOAD_SELECTOR
    assert _keys(changes) == {"web-1": ("shop/allow-web",)}  # api-1 unchanged: not in the delta


def test_rule_change_sends_only_the_policy() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1"))
    tr.apply("ADDED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    changes = tr.apply("MODIFIED", f.ap("p", selector={"app": "web"}, action="DENY", rules=[{}]))
    assert [p.action for p in changes.policies] == [authorization.Action.DENY]
    assert changes.workloads == ()
    assert tr.apply(
        "MODIFIED", f.ap("p", selector={"app": "web"}, action="DENY", rules=[{}])
    ).is_empty


def test_selector_change_moves_the_key() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", labels={"app": "web"}, ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("api-1", labels={"app": "api"}, ip="10.0.0.2"))
    tr.apply("ADDED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    changes = tr.apply("MODIFIED", f.ap("p", selector={"app": "api"}, rules=[{}]))
    assert _keys(changes) == {"api-1": ("shop/p",), "web-1": ()}
    assert changes.policies == ()  # the Authorization itself is the same


def test_pod_relabelled_gains_and_loses_keys() -> None:
    tr = _translator()
    tr.apply("ADDED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    assert _keys(tr.apply("ADDED", kube.pod("web-1", labels={"app": "other"}))) == {"web-1": ()}
    assert _keys(tr.apply("MODIFIED", kube.pod("web-1", labels={"app": "web"}))) == {
        "web-1": ("shop/p",)
    }


def test_namespace_and_global_policies_are_not_listed() -> None:
    """Workloads list selector policies only; ztunnel finds the others by scope."""
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1"))
    ns_changes = tr.apply("ADDED", f.ap("ns-wide", rules=[{}]))
    global_changes = tr.apply("ADDED", f.ap("mesh-wide", f.ROOT, rules=[{}]))
    assert [p.scope for p in ns_changes.policies] == [authorization.Scope.NAMESPACE]
    assert [p.scope for p in global_changes.policies] == [authorization.Scope.GLOBAL]
    assert ns_changes.workloads == global_changes.workloads == ()


def test_root_namespace_selector_policy_reaches_every_namespace() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "shop", ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("web-2", "bank", ip="10.0.0.2"))
    changes = tr.apply("ADDED", f.ap("mesh", f.ROOT, selector={"app": "web"}, rules=[{}]))
    assert _keys(changes) == {"web-1": ("istio-system/mesh",), "web-2": ("istio-system/mesh",)}


def test_configured_root_namespace() -> None:
    tr = _translator(root="mesh-root")
    changes = tr.apply("ADDED", f.ap("g", "mesh-root", rules=[{}]))
    assert [p.scope for p in changes.policies] == [authorization.Scope.GLOBAL]


def test_other_namespace_selector_policy_is_not_listed() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "shop"))
    changes = tr.apply("ADDED", f.ap("p", "bank", selector={"app": "web"}, rules=[{}]))
    assert changes.workloads == ()


def test_deleted_policy_is_withdrawn_and_unlisted() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1"))
    tr.apply("ADDED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    changes = tr.apply("DELETED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    assert changes.removed_policies == ("shop/p",)
    assert _keys(changes) == {"web-1": ()}
    assert tr.apply("DELETED", f.ap("p")).is_empty


@pytest.mark.parametrize(
    "unsent",
    [
        f.ap("p", selector={"app": "web"}, targetRefs=[{"kind": "Gateway", "name": "wp"}]),
        f.ap("p", selector={"app": "web"}, annotations={"istio.io/dry-run": "true"}),
    ],
    ids=["targetRefs", "dry-run"],
)
def test_policy_that_stops_being_sent_is_withdrawn(unsent: f.KubeDict) -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1"))
    tr.apply("ADDED", f.ap("p", selector={"app": "web"}, rules=[{}]))
    changes = tr.apply("MODIFIED", unsent)
    assert changes.removed_policies == ("shop/p",)
    assert _keys(changes) == {"web-1": ()}
    assert changes.errors == ()


def test_dry_run_sent_when_enabled() -> None:
    tr = translator.Translator(
        trust_domain="cluster.local",
        cluster_id="Kubernetes",
        domain="cluster.local",
        dry_run_policies=True,
    )
    changes = tr.apply("ADDED", f.ap("p", annotations={"istio.io/dry-run": "true"}, rules=[{}]))
    assert [p.dry_run for p in changes.policies] == [True]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            f.ap("p", action="AUDIT", rules=[{}]),
            "AuthorizationPolicy shop/p: spec.action: ztunnel does not support the AUDIT action",
        ),
        (
            f.ap("p", rules=[{"to": [f.operation(ports=["http"])]}]),
            "AuthorizationPolicy shop/p: spec.rules[0].to[0].operation.ports[0]: not a port number",
        ),
    ],
    ids=["audit", "bad-port"],
)
def test_untranslatable_policy_is_reported_and_not_sent(bad: f.KubeDict, message: str) -> None:
    tr = _translator()
    tr.apply("ADDED", f.ap("p", rules=[{}]))
    changes = tr.apply("MODIFIED", bad)
    assert changes.removed_policies == ("shop/p",)
    [error] = changes.errors
    assert error.startswith(message)


def test_v1beta1_kind_is_the_same() -> None:
    tr = _translator()
    changes = tr.apply("ADDED", f.ap("p", rules=[{}], api_version="security.istio.io/v1beta1"))
    assert [p.key for p in changes.policies] == ["shop/p"]


def test_list_items_without_kind_use_the_kind_argument() -> None:
    tr = _translator()
    obj = f.ap("p", rules=[{}])
    del obj["kind"]
    assert [p.key for p in tr.apply("ADDED", obj, kind="AuthorizationPolicy").policies] == [
        "shop/p"
    ]


# --- PeerAuthentication ---


def test_mesh_strict_sends_static_policy_and_every_workload_lists_it() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "shop", ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("web-2", "bank", ip="10.0.0.2"))
    changes = tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    assert [p.key for p in changes.policies] == [STATIC]
    assert _keys(changes) == {"web-1": (STATIC,), "web-2": (STATIC,)}


def test_namespace_permissive_overrides_mesh_strict() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "shop", ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("web-2", "bank", ip="10.0.0.2"))
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    changes = tr.apply("ADDED", f.pa("open", "shop", mode="PERMISSIVE"))
    assert _keys(changes) == {"web-1": ()}  # bank untouched: not in the delta
    assert changes.policies == ()


def test_workload_port_level_override_sends_converted_policy() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", labels={"app": "web"}, ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("api-1", labels={"app": "api"}, ip="10.0.0.2"))
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    changes = tr.apply("ADDED", f.pa("web", selector={"app": "web"}, ports={8080: "PERMISSIVE"}))
    assert [p.key for p in changes.policies] == ["shop/converted_peer_authentication_web"]
    assert _keys(changes) == {"web-1": ("shop/converted_peer_authentication_web",)}
    removed = tr.apply("DELETED", f.pa("web", selector={"app": "web"}))
    assert removed.removed_policies == ("shop/converted_peer_authentication_web",)
    assert _keys(removed) == {"web-1": (STATIC,)}


def test_last_peer_authentication_gone_withdraws_static_policy() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1"))
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    changes = tr.apply("DELETED", f.pa("default", f.ROOT))
    assert changes.removed_policies == (STATIC,)
    assert _keys(changes) == {"web-1": ()}


def test_selector_and_peer_authentication_keys_together() -> None:
    tr = _translator()
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    tr.apply("ADDED", f.ap("z", selector={"app": "web"}, rules=[{}]))
    tr.apply("ADDED", f.ap("a", f.ROOT, selector={"app": "web"}, rules=[{}]))
    changes = tr.apply("ADDED", kube.pod("web-1"))
    assert _keys(changes) == {"web-1": ("istio-system/a", "shop/z", STATIC)}


def test_bad_peer_authentication_is_reported() -> None:
    tr = _translator()
    changes = tr.apply("ADDED", f.pa("x", mode="ON"))
    assert changes.errors == (
        "PeerAuthentication shop/x: spec.mtls.mode: unknown mode 'ON' "
        "(one of UNSET, DISABLE, PERMISSIVE, STRICT)",
    )
    assert changes.policies == ()


# --- snapshot and namespace leftovers ---


def test_snapshot_includes_policies() -> None:
    tr = _translator()
    tr.apply("ADDED", f.ap("p", rules=[{}]))
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    tr.apply("ADDED", kube.pod("web-1"))
    snap = tr.snapshot()
    assert [p.key for p in snap.policies] == [STATIC, "shop/p"]
    assert [w.authorization_policies for w in snap.workloads] == [(STATIC,)]


def test_namespace_deleted_drops_its_policies() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "bank"))
    tr.apply("ADDED", f.ap("p", "shop", rules=[{}]))
    tr.apply("ADDED", f.pa("strict", "shop", mode="STRICT"))
    changes = tr.apply("DELETED", {"kind": "Namespace", "metadata": {"name": "shop"}})
    # The static policy goes with the last PeerAuthentication.
    assert changes.removed_policies == (STATIC, "shop/p")
    assert tr.snapshot().policies == ()


def test_root_namespace_deleted_recomputes_every_workload() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("web-1", "shop"))
    tr.apply("ADDED", f.pa("default", f.ROOT, mode="STRICT"))
    changes = tr.apply("DELETED", {"kind": "Namespace", "metadata": {"name": f.ROOT}})
    assert changes.removed_policies == (STATIC,)
    assert _keys(changes) == {"web-1": ()}
