"""`istio.io/use-waypoint` on Services, Pods and Namespaces, and `istio.io/waypoint-for` on the
waypoint's Gateway -> the model's `waypoint` fields."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from controller.translate import services, translator, waypoints
from meshcore.kube import resources
from meshcore.model import ids, workload
from tests.unit import test_translate_fixtures as kube
from tests.unit import test_translate_serviceentries as entries

USE = waypoints.USE_WAYPOINT_LABEL
USE_NS = waypoints.USE_WAYPOINT_NAMESPACE_LABEL
GATEWAY = {waypoints.GATEWAY_NAME_LABEL: "waypoint"}
WEB = ids.ServiceKey("shop/web.shop.svc.cluster.local")
FOR = waypoints.WAYPOINT_FOR
WEB_1 = ids.pod_uid("shop", "web-1")


def _gateway(
    name: str = "waypoint", namespace: str = "shop", waypoint_for: str | None = None
) -> dict[str, object]:
    labels = {} if waypoint_for is None else {FOR: waypoint_for}
    return {
        "apiVersion": resources.GATEWAYS.api_version,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }


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
    ("waypoint_for", "service_bound", "pod_bound"),
    [
        pytest.param(None, True, False, id="default-is-service"),
        pytest.param("service", True, False, id="service"),
        pytest.param("workload", False, True, id="workload"),
        pytest.param("all", True, True, id="all"),
        pytest.param("none", False, False, id="none"),
        pytest.param("workloads", True, True, id="not-a-value-counts-as-all"),
    ],
)
@pytest.mark.parametrize("labelled", ["namespace", "object"])
def test_a_service_binds_to_a_service_waypoint_and_a_pod_to_a_workload_one(
    waypoint_for: str | None, service_bound: bool, pod_bound: bool, labelled: str
) -> None:
    tr = _translator()
    tr.apply("ADDED", _gateway(waypoint_for=waypoint_for))
    ns_labels = {USE: "waypoint"} if labelled == "namespace" else {}
    labels = {USE: "waypoint"} if labelled == "object" else {}
    tr.apply("ADDED", kube.namespace("shop", labels=ns_labels))
    [svc] = tr.apply("ADDED", kube.service("web", labels=labels)).services
    [pod] = tr.apply("ADDED", kube.pod("web-1", labels=labels)).workloads
    assert svc.waypoint == (_at("shop") if service_bound else None)
    assert pod.waypoint == (_at("shop") if pod_bound else None)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({}, _at("shop"), id="namespace-label"),
        pytest.param({USE: "mine"}, _at("shop", "mine"), id="own-label"),
        pytest.param({USE: "none"}, None, id="opt-out"),
        pytest.param({**GATEWAY, USE: "other"}, None, id="the-waypoint-itself"),
    ],
)
def test_a_pod_whose_waypoint_gateway_is_unknown_is_bound_to_it(
    labels: Mapping[str, str], expected: workload.GatewayAddress | None
) -> None:
    """Failing closed: without its Gateway, what the waypoint is for is unknown, so calls to
    the pod's IP go to the waypoint (and are refused while it does not exist)."""
    tr = _translator()
    tr.apply("ADDED", kube.namespace("shop", labels={USE: "waypoint"}), kind="Namespace")
    changes = tr.apply("ADDED", kube.pod("web-1", "shop", labels=labels), kind="Pod")
    [built] = changes.workloads
    assert built.waypoint == expected


def test_traffic_of_a_gateway() -> None:
    assert waypoints.traffic_of(_gateway()) == "service"
    assert waypoints.traffic_of(_gateway(waypoint_for="workload")) == "workload"
    assert waypoints.traffic_of(_gateway(waypoint_for="Workload")) == "all"
    assert waypoints.traffic_of({"metadata": {}}) == "service"


def test_waypoint_hostname_uses_the_cluster_domain() -> None:
    found = waypoints.find_waypoint(
        {USE: "wp"}, "shop", {}, domain="mesh.example", traffic="service", gateways={}
    )
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
    tr.apply("ADDED", _gateway())  # for services, the default
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
    # pods do not bind to a waypoint for services.
    assert _waypoints(changes) == {WEB: _at("shop")}
    assert changes.removed_services == ()
    assert changes.removed_workloads == ()
    snapshot = _waypoints(tr.snapshot())
    assert snapshot["shop/waypoint.shop.svc.cluster.local"] is None
    assert snapshot[ids.pod_uid("shop", "waypoint-0")] is None
    assert snapshot["other/web.other.svc.cluster.local"] is None


@pytest.mark.parametrize(
    ("before", "after", "changed", "pod_changed"),
    [
        pytest.param({}, {"team": "a"}, False, False, id="unrelated-label"),
        pytest.param(
            {USE: "waypoint"}, {USE: "waypoint", "team": "a"}, False, False, id="same-waypoint"
        ),
        pytest.param({USE: "waypoint"}, {}, True, False, id="label-removed"),
        # No Gateway "other" is known: the pod binds too (failing closed).
        pytest.param({USE: "waypoint"}, {USE: "other"}, True, True, id="other-waypoint"),
        pytest.param({USE: "waypoint"}, {USE: "waypoint", USE_NS: "infra"}, True, True, id="moved"),
        pytest.param({USE_NS: "infra"}, {}, False, False, id="namespace-label-alone"),
    ],
)
def test_namespace_relabel_emits_only_real_changes(
    before: Mapping[str, str], after: Mapping[str, str], changed: bool, pod_changed: bool
) -> None:
    tr = _populated()
    tr.apply("MODIFIED", kube.namespace("shop", labels=before))
    changes = tr.apply("MODIFIED", kube.namespace("shop", labels=after))
    assert changes.is_empty is not changed
    if changed:
        assert {s.key for s in changes.services} == {WEB}
        assert [w.uid for w in changes.workloads] == ([WEB_1] if pod_changed else [])


def test_objects_arriving_after_the_namespace_label_get_the_waypoint() -> None:
    tr = _translator()
    assert tr.apply("ADDED", _gateway()).is_empty
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


# --- the Translator: Gateway changes re-bind what names that waypoint ---


def test_changing_what_a_waypoint_is_for_rebinds_what_names_it() -> None:
    tr = _populated()
    tr.apply("MODIFIED", kube.namespace("shop", labels={USE: "waypoint"}))
    # The other namespace names shop's waypoint too (cross-namespace).
    other = {USE: "waypoint", USE_NS: "shop"}
    tr.apply("MODIFIED", kube.namespace("other", labels=other))
    other_web, other_pod = "other/web.other.svc.cluster.local", ids.pod_uid("other", "web-1")

    changes = tr.apply("MODIFIED", _gateway(waypoint_for="all"))
    # Services were bound already; the pods now are too, except the waypoint's own.
    assert _waypoints(changes) == {WEB_1: _at("shop"), other_pod: _at("shop")}

    changes = tr.apply("MODIFIED", _gateway(waypoint_for="workload"))
    assert _waypoints(changes) == {WEB: None, other_web: None}

    changes = tr.apply("MODIFIED", _gateway(waypoint_for="none"))
    assert _waypoints(changes) == {WEB_1: None, other_pod: None}

    # Deleted: what it is for is unknown, so everything naming it is bound (failing closed).
    changes = tr.apply("DELETED", _gateway(waypoint_for="none"))
    assert _waypoints(changes) == {
        WEB: _at("shop"),
        other_web: _at("shop"),
        WEB_1: _at("shop"),
        other_pod: _at("shop"),
    }
    assert changes.removed_services == ()
    assert changes.removed_workloads == ()

    changes = tr.apply("ADDED", _gateway())
    assert _waypoints(changes) == {WEB_1: None, other_pod: None}
    assert _waypoints(tr.snapshot())[ids.pod_uid("shop", "waypoint-0")] is None


def test_gateway_events_that_do_not_change_what_it_is_for_change_nothing() -> None:
    tr = _populated()
    tr.apply("MODIFIED", kube.namespace("shop", labels={USE: "waypoint"}))
    programmed = {**_gateway(), "status": {"conditions": [{"type": "Programmed"}]}}
    assert tr.apply("MODIFIED", programmed).is_empty  # the deployer's status writes
    assert tr.apply("MODIFIED", _gateway(waypoint_for="service")).is_empty  # the default, said
    # A Gateway nothing names: nothing to rebuild.
    assert tr.apply("ADDED", _gateway("unused", waypoint_for="all")).is_empty
    assert tr.apply("DELETED", _gateway("unused", waypoint_for="all")).is_empty


def test_a_service_entry_binds_like_a_service() -> None:
    tr = _translator()
    tr.apply("ADDED", _gateway(waypoint_for="workload"))
    tr.apply("ADDED", kube.namespace("shop", labels={USE: "waypoint"}))
    entry = entries._entry(addresses=["240.240.0.1"])
    [svc] = tr.apply("ADDED", entry).services
    assert svc.waypoint is None
    changes = tr.apply("MODIFIED", _gateway(waypoint_for="all"))
    assert [s.waypoint for s in changes.services] == [_at("shop")]
