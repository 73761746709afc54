"""Kubernetes Service -> model Service."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controller.translate import services
from meshcore.model import workload
from tests.unit import test_translate_fixtures as kube


def _ips(*values: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return tuple(ipaddress.ip_address(v) for v in values)


@pytest.mark.parametrize(
    ("svc", "addresses"),
    [
        (kube.service(cluster_ip="10.96.0.10"), _ips("10.96.0.10")),
        (kube.service(cluster_ip="None"), ()),
        (kube.service(cluster_ip=""), ()),
        (kube.service(cluster_ip=None), ()),
        (
            kube.service(cluster_ip="10.96.0.10", cluster_ips=["10.96.0.10", "fd00:96::a"]),
            _ips("10.96.0.10", "fd00:96::a"),
        ),
        (kube.service(cluster_ip="None", cluster_ips=["None"]), ()),
    ],
    ids=["cluster-ip", "headless", "empty", "unallocated", "dual-stack", "headless-cluster-ips"],
)
def test_addresses(svc: dict[str, Any], addresses: tuple[object, ...]) -> None:
    assert services.build_service(svc, domain="cluster.local").addresses == addresses


def test_full_service() -> None:
    svc = kube.service(
        "web",
        "shop",
        ports=[
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "grpc", "port": 9000},
            {"name": "admin", "port": 8443, "targetPort": "admin-port"},
            {"name": "legacy", "port": 81, "targetPort": "8081"},
        ],
    )
    assert services.build_service(svc, domain="mesh.example") == workload.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.mesh.example",
        addresses=_ips("10.96.0.10"),
        ports=(
            workload.PortMapping(80, 8080),
            workload.PortMapping(9000, 9000),
            workload.PortMapping(8443, 0),  # named: resolved per workload
            workload.PortMapping(81, 8081),
        ),
    )
    assert services.service_key(svc, domain="mesh.example") == "shop/web.shop.svc.mesh.example"


@pytest.mark.parametrize(
    ("svc", "field"),
    [
        (kube.service(cluster_ip="10.96.0.999"), "spec.clusterIPs[0]"),
        (kube.service(cluster_ips=["10.96.0.1", "bogus"]), "spec.clusterIPs[1]"),
        (kube.service(ports=[{"port": 80}, {"port": 0}]), "spec.ports[1].port"),
        (kube.service(ports=[{"port": "http"}]), "spec.ports[0].port"),
        (kube.service(ports=[{"port": 80, "targetPort": 70000}]), "spec.ports[0].targetPort"),
    ],
    ids=["bad-ip", "bad-second-ip", "port-zero", "port-name", "target-out-of-range"],
)
def test_invalid_service_names_the_field(svc: dict[str, Any], field: str) -> None:
    with pytest.raises(services.TranslateError) as err:
        services.build_service(svc, domain="cluster.local")
    assert err.value.field == field
    assert str(err.value).startswith("Service shop/web: ")
