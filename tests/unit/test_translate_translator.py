"""The incremental Translator: which events produce which Changes."""

from __future__ import annotations

import pytest

from controller.translate import translator
from meshcore.identity import spiffe
from meshcore.model import ids, workload
from tests.unit import test_translate_fixtures as kube

WEB = ids.ServiceKey("shop/web.shop.svc.cluster.local")
API = ids.ServiceKey("shop/api.shop.svc.cluster.local")


def _translator() -> translator.Translator:
    return translator.Translator(
        trust_domain="cluster.local", cluster_id="Kubernetes", domain="cluster.local"
    )


def _bindings(changes: translator.Changes) -> dict[str, tuple[str, ...]]:
    return {w.name: tuple(b.service for b in w.services) for w in changes.workloads}


def test_pod_added_then_unchanged_update_is_silent() -> None:
    tr = _translator()
    added = tr.apply("ADDED", kube.pod("a"))
    assert [w.name for w in added.workloads] == ["a"]
    assert tr.apply("MODIFIED", kube.pod("a", resource_version="2")).is_empty


def test_pod_change_emits_only_that_pod() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a", ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("b", ip="10.0.0.2"))
    changes = tr.apply("MODIFIED", kube.pod("a", ip="10.0.0.1", ready=False))
    assert [(w.name, w.status) for w in changes.workloads] == [
        ("a", workload.WorkloadStatus.UNHEALTHY)
    ]
    assert changes.removed_workloads == ()


def test_enrollment_annotation_flips_tunnel_protocol() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a"))
    changes = tr.apply(
        "MODIFIED", kube.pod("a", annotations={"ambient.istio.io/redirection": "enabled"})
    )
    assert [w.tunnel_protocol for w in changes.workloads] == [workload.TunnelProtocol.HBONE]


def test_service_added_after_pods_binds_its_namespace_only() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a", ip="10.0.0.1"))
    tr.apply("ADDED", kube.pod("b", ip="10.0.0.2", labels={"app": "other"}))
    tr.apply("ADDED", kube.pod("c", "elsewhere", ip="10.0.1.1"))
    changes = tr.apply("ADDED", kube.service("web"))
    assert [s.key for s in changes.services] == [WEB]
    assert _bindings(changes) == {"a": (WEB,)}  # b not selected, c in another namespace


def test_service_deleted_removes_bindings_and_service() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.service("web"))
    tr.apply("ADDED", kube.pod("a"))
    changes = tr.apply("DELETED", kube.service("web"))
    assert changes.removed_services == (WEB,)
    assert _bindings(changes) == {"a": ()}


def test_service_port_change_rebinds() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.service("web"))
    tr.apply("ADDED", kube.pod("a"))
    changes = tr.apply("MODIFIED", kube.service("web", ports=[{"port": 80, "targetPort": 9090}]))
    assert [s.ports for s in changes.services] == [(workload.PortMapping(80, 9090),)]
    [wl] = changes.workloads
    assert wl.services[0].ports == (workload.PortMapping(80, 9090),)


def test_unchanged_service_update_is_silent() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.service("web"))
    tr.apply("ADDED", kube.pod("a"))
    assert tr.apply("MODIFIED", kube.service("web")).is_empty


def test_pod_relabelled_changes_bindings() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.service("web", selector={"app": "web"}))
    tr.apply("ADDED", kube.service("api", selector={"app": "api"}))
    added = tr.apply("ADDED", kube.pod("a", labels={"app": "web"}))
    assert _bindings(added) == {"a": (WEB,)}
    relabelled = tr.apply("MODIFIED", kube.pod("a", labels={"app": "api"}))
    assert _bindings(relabelled) == {"a": (API,)}


@pytest.mark.parametrize(
    "gone",
    [
        kube.pod("a", phase="Succeeded"),
        kube.pod("a", ip=None),
        kube.pod("a", host_network=True),
    ],
    ids=["succeeded", "lost-ip", "host-network"],
)
def test_pod_that_stops_qualifying_is_removed(gone: kube.KubeDict) -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a"))
    changes = tr.apply("MODIFIED", gone)
    assert changes.removed_workloads == (ids.pod_uid("shop", "a"),)
    assert changes.workloads == ()


def test_pod_deleted() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a"))
    assert tr.apply("DELETED", kube.pod("a")).removed_workloads == (ids.pod_uid("shop", "a"),)
    assert tr.apply("DELETED", kube.pod("a")).is_empty  # a repeated delete changes nothing
    assert tr.snapshot().workloads == ()


def test_pod_without_ip_appears_when_it_gets_one() -> None:
    tr = _translator()
    assert tr.apply("ADDED", kube.pod("a", ip=None)).is_empty
    assert [w.name for w in tr.apply("MODIFIED", kube.pod("a")).workloads] == ["a"]


def test_untranslatable_objects_are_reported_and_left_out() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a"))
    broken = tr.apply("MODIFIED", kube.pod("a", ip="not-an-ip"))
    assert broken.removed_workloads == (ids.pod_uid("shop", "a"),)
    assert len(broken.errors) == 1
    assert "Pod shop/a: status.podIPs[0]" in broken.errors[0]
    bad_service = tr.apply("ADDED", kube.service("web", cluster_ip="nope"))
    assert bad_service.services == ()
    assert "Service shop/web: spec.clusterIPs[0]" in bad_service.errors[0]
    fixed = tr.apply("MODIFIED", kube.pod("a"))
    assert [w.name for w in fixed.workloads] == ["a"]
    assert fixed.workloads[0].services == ()  # the broken service selects nothing


def test_snapshot_lists_everything_sorted() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("b", ip="10.0.0.2"))
    tr.apply("ADDED", kube.pod("a", ip="10.0.0.1"))
    tr.apply("ADDED", kube.service("web"))
    snap = tr.snapshot()
    assert [w.name for w in snap.workloads] == ["a", "b"]
    assert [s.key for s in snap.services] == [WEB]
    assert all(w.services for w in snap.workloads)
    assert snap.policies == ()
    assert snap.removed_workloads == ()


def test_other_kinds_and_event_types_are_ignored() -> None:
    tr = _translator()
    assert tr.apply("ADDED", {"kind": "ConfigMap", "metadata": {"name": "x"}}).is_empty
    assert tr.apply("BOOKMARK", kube.pod("a")).is_empty
    assert tr.snapshot().workloads == ()


def test_kind_override_for_list_items() -> None:
    tr = _translator()
    item = kube.pod("a")
    del item["kind"]  # items of a List response carry no kind
    assert tr.apply("ADDED", item).is_empty
    assert [w.name for w in tr.apply("ADDED", item, kind="Pod").workloads] == ["a"]


def test_namespace_deletion_drops_leftovers() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a"))
    tr.apply("ADDED", kube.service("web"))
    tr.apply("ADDED", kube.pod("z", "other", ip="10.0.9.9"))
    assert tr.apply("ADDED", kube.namespace("shop")).is_empty
    changes = tr.apply("DELETED", kube.namespace("shop"))
    assert changes.removed_workloads == (ids.pod_uid("shop", "a"),)
    assert changes.removed_services == (WEB,)
    assert [w.name for w in tr.snapshot().workloads] == ["z"]


def _id(ns: str = "shop", sa: str = "web", td: str = "cluster.local") -> spiffe.SpiffeId:
    return spiffe.SpiffeId(td, ns, sa)


def test_has_identity_on_node() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a", node="node-1", service_account="web", ip=None))
    assert tr.has_identity_on_node("node-1", _id())  # scheduled, no IP yet: still may need a cert
    assert not tr.has_identity_on_node("node-2", _id())
    assert not tr.has_identity_on_node("node-1", _id(sa="db"))
    assert not tr.has_identity_on_node("node-1", _id(ns="other"))
    assert not tr.has_identity_on_node("node-1", _id(td="evil.example"))
    assert not tr.has_identity_on_node("", _id())

    tr.apply("MODIFIED", kube.pod("a", node="node-1", service_account="web", deleting=True))
    assert tr.has_identity_on_node("node-1", _id())  # terminating pods still run
    tr.apply("MODIFIED", kube.pod("a", node="node-1", service_account="web", phase="Succeeded"))
    assert not tr.has_identity_on_node("node-1", _id())


def test_identity_index_follows_moves_and_deletes() -> None:
    tr = _translator()
    tr.apply("ADDED", kube.pod("a", service_account=None))
    tr.apply("ADDED", kube.pod("b", service_account=None, ip="10.0.0.6"))
    assert tr.has_identity_on_node("node-1", _id(sa="default"))
    tr.apply("DELETED", kube.pod("a", service_account=None))
    assert tr.has_identity_on_node("node-1", _id(sa="default"))  # b remains
    tr.apply("MODIFIED", kube.pod("b", service_account=None, ip="10.0.0.6", node="node-2"))
    assert not tr.has_identity_on_node("node-1", _id(sa="default"))
    assert tr.has_identity_on_node("node-2", _id(sa="default"))
    tr.apply("DELETED", kube.namespace("shop"))
    assert not tr.has_identity_on_node("node-2", _id(sa="default"))
