"""Pod -> Workload translation, table-driven."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import pytest

from controller.translate import services as svc_translate
from controller.translate import workloads
from meshcore.model import ids, workload
from tests.unit import test_translate_fixtures as kube

SVC_WEB = ids.ServiceKey("shop/web.shop.svc.cluster.local")


def _build(
    pod: dict[str, Any], services: Iterable[dict[str, Any]] = ()
) -> workload.Workload | None:
    return workloads.build_workload(
        pod, services=services, trust_domain="td.example", cluster_id="east", domain="cluster.local"
    )


def _must_build(pod: dict[str, Any], services: Iterable[dict[str, Any]] = ()) -> workload.Workload:
    wl = _build(pod, services)
    assert wl is not None
    return wl


def test_full_translation() -> None:
    wl = _must_build(
        kube.pod(
            "web-7d4b9c5f6-x2x9k",
            labels={"app": "web", "version": "v2", "pod-template-hash": "7d4b9c5f6"},
            annotations={"ambient.istio.io/redirection": "enabled"},
            owner=("ReplicaSet", "web-7d4b9c5f6"),
        ),
        [kube.service()],
    )
    assert wl == workload.Workload(
        uid=ids.WorkloadUid("east//Pod/shop/web-7d4b9c5f6-x2x9k"),
        name="web-7d4b9c5f6-x2x9k",
        namespace="shop",
        addresses=(ipaddress.ip_address("10.0.0.5"),),
        node="node-1",
        service_account="web",
        trust_domain="td.example",
        tunnel_protocol=workload.TunnelProtocol.HBONE,
        canonical_name="web",
        canonical_revision="v2",
        workload_type=workload.WorkloadType.DEPLOYMENT,
        workload_name="web",
        services=(workload.ServiceBinding(SVC_WEB, (workload.PortMapping(80, 8080),)),),
        status=workload.WorkloadStatus.HEALTHY,
        cluster_id="east",
        labels=(("app", "web"), ("pod-template-hash", "7d4b9c5f6"), ("version", "v2")),
    )


@pytest.mark.parametrize(
    "pod",
    [
        kube.pod(ip=None),
        kube.pod(ip=""),
        kube.pod(host_network=True),
        kube.pod(phase="Succeeded"),
        kube.pod(phase="Failed"),
    ],
    ids=["no-ip", "empty-ip", "host-network", "succeeded", "failed"],
)
def test_pods_without_a_workload(pod: dict[str, Any]) -> None:
    assert _build(pod) is None


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"ambient.istio.io/redirection": "enabled"}, workload.TunnelProtocol.HBONE),
        ({"ambient.istio.io/redirection": "disabled"}, workload.TunnelProtocol.NONE),
        ({}, workload.TunnelProtocol.NONE),
    ],
    ids=["enrolled", "explicitly-disabled", "not-enrolled"],
)
def test_tunnel_protocol_follows_redirection_annotation(
    annotations: dict[str, str], expected: workload.TunnelProtocol
) -> None:
    assert _must_build(kube.pod(annotations=annotations)).tunnel_protocol is expected


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (kube.pod(), workload.WorkloadStatus.HEALTHY),
        (kube.pod(ready=False), workload.WorkloadStatus.UNHEALTHY),
        (kube.pod(deleting=True), workload.WorkloadStatus.UNHEALTHY),
        (kube.pod(phase="Pending", ready=False), workload.WorkloadStatus.UNHEALTHY),
    ],
    ids=["ready", "not-ready", "terminating", "pending"],
)
def test_status(pod: dict[str, Any], expected: workload.WorkloadStatus) -> None:
    assert _must_build(pod).status is expected


def test_pod_without_conditions_is_unhealthy() -> None:
    pod = kube.pod()
    del pod["status"]["conditions"]
    assert _must_build(pod).status is workload.WorkloadStatus.UNHEALTHY


@pytest.mark.parametrize(
    ("labels", "owner", "expected"),
    [
        (
            {
                "service.istio.io/canonical-name": "istio-name",
                "app.kubernetes.io/name": "k8s-name",
                "app": "app",
            },
            None,
            ("istio-name", "latest"),
        ),
        ({"app.kubernetes.io/name": "k8s-name", "app": "app"}, None, ("k8s-name", "latest")),
        ({"app": "app"}, None, ("app", "latest")),
        ({}, None, ("web-1", "latest")),
        ({}, ("ReplicaSet", "shop-api-5f7c8d9b4"), ("shop-api", "latest")),
        (
            {
                "service.istio.io/canonical-revision": "r1",
                "app.kubernetes.io/version": "r2",
                "version": "r3",
            },
            None,
            ("web-1", "r1"),
        ),
        ({"app.kubernetes.io/version": "r2", "version": "r3"}, None, ("web-1", "r2")),
        ({"version": "r3"}, None, ("web-1", "r3")),
    ],
    ids=[
        "istio-label-wins",
        "k8s-name-label",
        "app-label",
        "pod-name",
        "deployment-name",
        "istio-revision-wins",
        "k8s-version-label",
        "version-label",
    ],
)
def test_canonical_name_and_revision(
    labels: dict[str, str], owner: tuple[str, str] | None, expected: tuple[str, str]
) -> None:
    wl = _must_build(kube.pod("web-1", labels=labels, owner=owner))
    assert (wl.canonical_name, wl.canonical_revision) == expected


@pytest.mark.parametrize(
    ("owner", "labels", "expected"),
    [
        (
            ("ReplicaSet", "web-7d4b9c5f6"),
            {"pod-template-hash": "7d4b9c5f6"},
            (workload.WorkloadType.DEPLOYMENT, "web"),
        ),
        (
            ("ReplicaSet", "shop-web-7d4b9c5f6"),
            {},
            (workload.WorkloadType.DEPLOYMENT, "shop-web"),
        ),
        (("ReplicaSet", "my-frontend"), {}, (workload.WorkloadType.POD, "web-1")),
        (("Job", "backup-28374650"), {}, (workload.WorkloadType.CRONJOB, "backup")),
        (("Job", "migrate"), {}, (workload.WorkloadType.JOB, "migrate")),
        (("StatefulSet", "db"), {}, (workload.WorkloadType.POD, "web-1")),
        (None, {}, (workload.WorkloadType.POD, "web-1")),
    ],
    ids=[
        "deployment-by-template-hash",
        "deployment-by-name-shape",
        "standalone-replicaset",
        "cronjob",
        "job",
        "statefulset-is-pod",
        "bare-pod",
    ],
)
def test_workload_name_and_type(
    owner: tuple[str, str] | None,
    labels: dict[str, str],
    expected: tuple[workload.WorkloadType, str],
) -> None:
    wl = _must_build(kube.pod("web-1", owner=owner, labels=labels))
    assert (wl.workload_type, wl.workload_name) == expected


def test_identity_fields() -> None:
    wl = _must_build(kube.pod(service_account=None))
    assert wl.service_account == "default"
    assert wl.uid == ids.pod_uid("shop", "web-1", "east")
    assert str(wl.identity) == "spiffe://td.example/ns/shop/sa/default"


def test_dual_stack_addresses() -> None:
    wl = _must_build(kube.pod(ip="10.0.0.5", ips=["10.0.0.5", "fd00::5"]))
    assert wl.addresses == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5"))


def test_bad_pod_ip_is_an_error_naming_the_field() -> None:
    with pytest.raises(svc_translate.TranslateError) as err:
        _build(kube.pod(ip="10.0.0.300"))
    assert err.value.field == "status.podIPs[0]"
    assert "Pod shop/web-1" in str(err.value)


NAMED_PORTS = [
    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
    {"name": "metrics", "containerPort": 9090},
    {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
]


@pytest.mark.parametrize(
    ("svc_ports", "expected"),
    [
        ([{"port": 80, "targetPort": 8080}], ((80, 8080),)),
        ([{"port": 80}], ((80, 80),)),
        ([{"port": 80, "targetPort": "http"}], ((80, 8080),)),
        ([{"port": 80, "targetPort": "metrics"}], ((80, 9090),)),
        (
            [
                {"port": 80, "targetPort": "http"},
                {"port": 81, "targetPort": "nope"},
                {"port": 82, "targetPort": 8282},
            ],
            ((80, 8080), (82, 8282)),
        ),
        ([{"port": 53, "targetPort": "dns"}], ()),
        ([{"port": 53, "targetPort": "dns", "protocol": "UDP"}], ((53, 5353),)),
        ([], ()),
    ],
    ids=[
        "numeric",
        "defaults-to-port",
        "named",
        "named-default-protocol",
        "unresolvable-name-drops-only-that-mapping",
        "named-protocol-mismatch",
        "named-udp",
        "no-ports",
    ],
)
def test_binding_target_ports(
    svc_ports: list[dict[str, Any]], expected: tuple[tuple[int, int], ...]
) -> None:
    wl = _must_build(kube.pod(container_ports=NAMED_PORTS), [kube.service(ports=svc_ports)])
    assert wl.services == (
        workload.ServiceBinding(SVC_WEB, tuple(workload.PortMapping(*p) for p in expected)),
    )


@pytest.mark.parametrize(
    ("svc", "bound"),
    [
        (kube.service(selector={"app": "web"}), True),
        (kube.service(selector={"app": "web", "tier": "front"}), True),
        (kube.service(selector={"app": "api"}), False),
        (kube.service(selector={"tier": "back"}), False),
        (kube.service(selector={}), False),
        (kube.service(namespace="other", selector={"app": "web"}), False),
    ],
    ids=[
        "subset-match",
        "full-match",
        "value-mismatch",
        "missing-label",
        "empty-selector-selects-nothing",
        "other-namespace",
    ],
)
def test_selector_matching(svc: dict[str, Any], bound: bool) -> None:
    wl = _must_build(kube.pod(labels={"app": "web", "tier": "front"}), [svc])
    assert bool(wl.services) is bound


def test_bindings_sorted_by_service_key() -> None:
    wl = _must_build(kube.pod(), [kube.service("zeta"), kube.service("alpha")])
    assert [b.service for b in wl.services] == [
        "shop/alpha.shop.svc.cluster.local",
        "shop/zeta.shop.svc.cluster.local",
    ]


TUNNEL = "ambient.istio.io/application-tunnel"


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        pytest.param({}, None, id="not-asked"),
        pytest.param(
            {TUNNEL: "PROXY/15088"},
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088),
            id="proxy-15088",
        ),
        pytest.param(
            {TUNNEL: "PROXY"},
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, None),
            id="proxy-same-port",
        ),
        pytest.param(
            {TUNNEL: "PROXY/1"},
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 1),
            id="lowest-port",
        ),
        pytest.param(
            {TUNNEL: "PROXY/65535"},
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 65535),
            id="highest-port",
        ),
    ],
)
def test_application_tunnel_annotation(
    annotations: dict[str, str], expected: workload.ApplicationTunnel | None
) -> None:
    assert _must_build(kube.pod(annotations=annotations)).application_tunnel == expected


def test_application_tunnel_is_independent_of_enrollment() -> None:
    # The tunnel is only used by ztunnel for HBONE traffic; a pod outside the mesh keeps it
    # in its record, and clients reach it on its normal port until it is captured.
    wl = _must_build(kube.pod(annotations={TUNNEL: "PROXY/15088"}))
    assert wl.tunnel_protocol is workload.TunnelProtocol.NONE
    assert wl.application_tunnel is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("", "unknown protocol ''", id="empty"),
        pytest.param("proxy/15088", "unknown protocol 'proxy'", id="lowercase"),
        pytest.param("HTTP/8080", "unknown protocol 'HTTP'", id="unknown-protocol"),
        pytest.param("NONE/15088", "unknown protocol 'NONE'", id="none-protocol"),
        pytest.param(" PROXY/15088", "unknown protocol ' PROXY'", id="leading-space"),
        pytest.param("PROXY/", "port ''", id="missing-port"),
        pytest.param("PROXY/0", "port '0'", id="port-zero"),
        pytest.param("PROXY/65536", "port '65536'", id="port-too-big"),
        pytest.param("PROXY/-1", "port '-1'", id="negative-port"),
        pytest.param("PROXY/15088 ", "port '15088 '", id="trailing-space"),
        pytest.param("PROXY/0x50", "port '0x50'", id="hex-port"),
        pytest.param("PROXY/\u00b9", "port '\u00b9'", id="superscript-digit"),
        pytest.param("PROXY/15088/tcp", "port '15088/tcp'", id="extra-part"),
        pytest.param("PROXY/15008", "ztunnel's own", id="ztunnel-hbone-port"),
        pytest.param("PROXY/15006", "ztunnel's own", id="ztunnel-inbound-port"),
        pytest.param("PROXY/15001", "ztunnel's own", id="ztunnel-outbound-port"),
    ],
)
def test_malformed_application_tunnel_names_the_field(value: str, reason: str) -> None:
    with pytest.raises(svc_translate.TranslateError) as err:
        _build(kube.pod(annotations={TUNNEL: value}))
    assert err.value.field == f"metadata.annotations['{TUNNEL}']"
    assert reason in err.value.reason
    assert "Pod shop/web-1" in str(err.value)
    assert repr(value) in str(err.value)
