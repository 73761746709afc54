"""`istio.io/use-waypoint` on Services, Pods and Namespaces -> the model's `waypoint` fields."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from controller.translate import services, translator, waypoints
from meshcore.model import ids, workload
from tests.unit import test_translate_fixtures as kube

USE = waypoints.USE_WAYPOINT_LABEL
USE_NS = waypoints.USE_WAYPOINT_NAMESPACE_LABEL
GATEWAY = {waypoints.GATEWAY_NAME_LABEL: "waypoint"}
WEB = ids.ServiceKey("shop/web.shop.svc.cluster.local")


def _at(namespace: str, name: str = "waypoint") -> workload.GatewayAddress:
    host = f"{name}.{namespace}.svc.cluster.local"
    return workload.GatewayAddress(hostname=(namespace, host), hbone_mtls_port=15008)


# (object labels, namespace labels, expected waypoint), for Services and Pods alike.
CASES = [
    pytest.param({}, {}, None, id="no-labels"),
    pytest.param({USE: "waypoint"}, {}, _at("shop"), id="object-label"),
    pytest.param({}, {USE: "waypoint"}, _at("shop"), id="namespace-label"),
    pytest.param({USE: "mine"}, {USE: "waypoint"}, _at("shop", "mine"), id="object-label-wins"),
    pytest.param({USE: "none"}, {USE: "waypoint"}, None, id="object-none-opts-out"),
    pytest.param({}, {USE: "none"}, None, id="namespace-none"),
    pytest.param({USE: "none"}, {}, None, id="object-none-alone"),
    pytest.param(
        {USE: "waypoint", USE_NS: "infra"}, {}, _at("infra"), id="object-names-the-namespace"
    ),
    pytest.param(
        {}, {USE: "waypoint", USE_NS: "infra"}, _at("infra"), id="namespace-names-the-namespace"
    ),
    pytest.param(
        {USE: "waypoint"},
        {USE_NS: "infra"},
        _at("shop"),
        id="namespace-of-another-object-is-not-read",
    ),
    pytest.param(
        {USE_NS: "infra"},
        {USE: "waypoint"},
        _at("shop"),
        id="object-namespace-without-its-own-use-waypoint-is-not-read",
    ),
    pytest.param({USE_NS: "infra"}, {}, None, id="namespace-label-alone"),
    pytest.param({USE: "waypoint", USE_NS: ""}, {}, _at("shop"), id="empty-namespace-is-own"),
    pytest.param(GATEWAY, {USE: "waypoint"}, None, id="the-waypoint-itself-skips-namespace"),
    pytest.param({**GATEWAY, USE: "other"}, {}, None, id="the-waypoint-itself-skips-its-own-label"),
]


@pytest.mark.parametrize(("labels", "namespace_labels", "expected"), CASES)
def test_service_waypoint(
    labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    expected: workload.GatewayAddress | None,
) -> None:
    svc = kube.service("web", "shop", labels=labels)
    built = services.build_service(svc, domain="cluster.local", namespace_labels=namespace_labels)
    assert built.waypoint == expected


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({USE: "waypoint"}, _at("shop"), id="own-label"),
        pytest.param({}, None, id="namespace-label-is-for-services"),
        pytest.param({USE: "none"}, None, id="opt-out"),
        pytest.param({**GATEWAY, USE: "other"}, None, id="the-waypoint-itself"),
    ],
)
def test_pod_waypoint_comes_from_its_own_label_only(
    labels: Mapping[str, str], expected: workload.GatewayAddress | None
) -> None:
    """A namespace's waypoint serves service addresses: calls to a pod's IP in a labelled
    namespace stay direct unless the pod itself names a waypoint."""
    tr = _translator()
    tr.apply("ADDED", kube.namespace("shop", labels={USE: "waypoint"}), kind="Namespace")
    changes = tr.apply("ADDED", kube.pod("web-1", "shop", labels=labels), kind="Pod")
    [built] = changes.workloads
    assert built.waypoint == expected


def test_waypoint_hostname_uses_the_cluster_domain() -> None:
    found = waypoints.find_waypoint({USE: "wp"}, "shop", {}, domain="mesh.example")
    assert found == workload.GatewayAddress(hostname=("shop", "wp.shop.svc.mesh.example"))


def test_without_namespace_labels_only_the_object_counts() -> None:
    assert services.build_service(kube.service(), domain="cluster.local").waypoint is None
    labelled = kube.service(labels={USE: "waypoint"})
    assert services.build_service(labelled, domain="cluster.local").waypoint == _at("shop")


# --- the Translator: Namespace label changes re-translate the namespace ---


def _translator() -> translator.Translator:
    return translator.Translator(
        trust_domain="cluster.local", cluster_id="Kubernetes", domain="cluster.local"
    )


def _populated() -> translator.Translator:
    tr = _translator()
    tr.apply("ADDED", kube.namespace("shop"))
    tr.apply("ADDED", kube.namespace("other"))
    tr.apply("ADDED", kube.service("web"))
    tr.apply("ADDED", kube.service("web", "other", cluster_ip="10.96.0.11"))
    tr.apply("ADDED", kube.service("waypoint", cluster_ip="10.96.0.20", labels=GATEWAY))
    tr.apply("ADDED", kube.pod("web-1"))
    tr.apply("ADDED", kube.pod("web-1", "other", ip="10.0.1.5"))
    tr.apply("ADDED", kube.pod("waypoint-0", ip="10.0.0.20", labels=GATEWAY))
    return tr


def _waypoints(changes: translator.Changes) -> dict[str, workload.GatewayAddress | None]:
    found: dict[str, workload.GatewayAddress | None] = {}
    for svc in changes.services:
        found[svc.key] = svc.waypoint
    for wl in changes.workloads:
        found[wl.uid] = wl.waypoint
    return found


def test_namespace_label_gives_its_services_a_waypoint_except_the_waypoints_own() -> None:
    tr = _populated()
    changes = tr.apply("MODIFIED", kube.namespace("shop", labels={USE: "waypoint"}))
    # Only the namespace's own Service changes; the waypoint's Service stays without one, and
    # pods take a waypoint from their own label only.
    assert _waypoints(changes) == {WEB: _at("shop")}
    assert changes.removed_services == ()
    assert changes.removed_workloads == ()
    snapshot = _waypoints(tr.snapshot())
    assert snapshot["shop/waypoint.shop.svc.cluster.local"] is None
    assert snapshot[ids.pod_uid("shop", "waypoint-0")] is None
    assert snapshot["other/web.other.svc.cluster.local"] is None


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        pytest.param({}, {"team": "a"}, False, id="unrelated-label"),
        pytest.param({USE: "waypoint"}, {USE: "waypoint", "team": "a"}, False, id="same-waypoint"),
        pytest.param({USE: "waypoint"}, {}, True, id="label-removed"),
        pytest.param({USE: "waypoint"}, {USE: "other"}, True, id="other-waypoint"),
        pytest.param({USE: "waypoint"}, {USE: "waypoint", USE_NS: "infra"}, True, id="moved"),
        pytest.param({USE_NS: "infra"}, {}, False, id="namespace-label-alone"),
    ],
)
def test_namespace_relabel_emits_only_real_changes(
    before: Mapping[str, str], after: Mapping[str, str], changed: bool
) -> None:
    tr = _populated()
    tr.apply("MODIFIED", kube.namespace("shop", labels=before))
    changes = tr.apply("MODIFIED", kube.namespace("shop", labels=after))
    assert changes.is_empty is not changed
    if changed:
        assert {s.key for s in changes.services} == {WEB}
        assert changes.workloads == ()


def test_objects_arriving_after_the_namespace_label_get_the_waypoint() -> None:
    tr = _translator()
    assert tr.apply("ADDED", kube.namespace("shop", labels={USE: "waypoint"})).is_empty
    added = tr.apply("ADDED", kube.service("web"))
    assert [s.waypoint for s in added.services] == [_at("shop")]
    pod = tr.apply("ADDED", kube.pod("web-1"))
    assert [w.waypoint for w in pod.workloads] == [None]
    # A Service label then overrides the namespace's; `none` opts out.
    opted_out = tr.apply("MODIFIED", kube.service("web", labels={USE: "none"}))
    assert [s.waypoint for s in opted_out.services] == [None]


def test_replayed_namespace_is_silent_and_deleted_namespace_forgets_its_labels() -> None:
    tr = _populated()
    tr.apply("MODIFIED", kube.namespace("shop", labels={USE: "waypoint"}))
    assert tr.apply("MODIFIED", kube.namespace("shop", labels={USE: "waypoint"})).is_empty
    tr.apply("DELETED", kube.namespace("shop"))
    # Recreated without the label: its new objects have no waypoint.
    tr.apply("ADDED", kube.namespace("shop"))
    assert [s.waypoint for s in tr.apply("ADDED", kube.service("web")).services] == [None]
