"""ServiceEntry translation: one Service per host with its VIP (given or allocated), endpoints
by resolution, the waypoint from labels, and the translator's changes as entries come and go."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controller.translate import serviceentries, translator
from meshcore.model import ids, workload

CLUSTER = "Kubernetes"


def _entry(
    *,
    hosts: tuple[str, ...] = ("api.example.com",),
    resolution: str = "DNS",
    endpoints: list[dict[str, Any]] | None = None,
    addresses: list[str] | None = None,
    allocated: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hosts": list(hosts),
        "location": "MESH_EXTERNAL",
        "resolution": resolution,
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
    }
    if endpoints is not None:
        spec["endpoints"] = endpoints
    if addresses is not None:
        spec["addresses"] = addresses
    entry: dict[str, Any] = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "api", "namespace": "shop", "labels": labels or {}},
        "spec": spec,
    }
    if allocated:
        entry["status"] = {"addresses": [{"host": h, "value": v} for h, v in allocated.items()]}
    return entry


def _build(entry: dict[str, Any], ns_labels: dict[str, str] | None = None) -> Any:
    services = serviceentries.build_services(
        entry, namespace_labels=ns_labels or {}, domain="cluster.local"
    )
    return services, serviceentries.build_endpoints(entry, services, cluster_id=CLUSTER)


def test_dns_entry_without_endpoints_resolves_its_host_at_the_allocated_vip() -> None:
    services, endpoints = _build(_entry(allocated={"api.example.com": "240.240.0.1"}))
    [svc] = services
    assert svc.key == ids.service_key("shop", "api.example.com")
    assert svc.addresses == (ipaddress.ip_address("240.240.0.1"),)
    assert svc.ports == (workload.PortMapping(80, 8080),)
    assert svc.waypoint is None
    [endpoint] = endpoints
    assert endpoint.hostname == "api.example.com"
    assert endpoint.addresses == ()
    assert endpoint.tunnel_protocol is workload.TunnelProtocol.NONE  # outside the mesh
    assert endpoint.binding(svc.key) == workload.ServiceBinding(
        svc.key, (workload.PortMapping(80, 8080),)
    )


def test_each_host_of_a_dns_entry_without_endpoints_is_its_own_hosts_endpoint_only() -> None:
    """Found by an audit: binding every host's endpoint to every host made N^2 bindings (2,000
    hosts took the controller to 1.45 GB). Listed endpoints still serve every host."""
    hosts = tuple(f"h{i}.example.com" for i in range(50))
    services, endpoints = _build(_entry(hosts=hosts))
    assert len(endpoints) == len(services) == 50
    for svc, endpoint in zip(services, endpoints, strict=True):
        assert endpoint.hostname == svc.hostname
        assert [b.service for b in endpoint.services] == [svc.key]
    listed = _entry(hosts=hosts[:3], resolution="STATIC", endpoints=[{"address": "10.1.0.5"}])
    services, [endpoint] = _build(listed)
    assert [b.service for b in endpoint.services] == [s.key for s in services]


def test_static_endpoints_with_their_own_ports_and_fixed_addresses_win() -> None:
    entry = _entry(
        resolution="STATIC",
        addresses=["192.0.2.10", "198.51.100.0/24"],
        allocated={"api.example.com": "240.240.0.1"},
        endpoints=[
            {"address": "10.1.0.5", "ports": {"http": 9090}, "labels": {"version": "v1"}},
            {"address": "10.1.0.6"},
            {"address": "10.1.0.6"},  # a duplicate is one endpoint
        ],
    )
    [svc], endpoints = _build(entry)
    assert svc.addresses == (ipaddress.ip_address("192.0.2.10"),)  # CIDRs are left out
    assert [(str(w.addresses[0]), w.binding(svc.key).ports) for w in endpoints] == [
        ("10.1.0.5", (workload.PortMapping(80, 9090),)),
        ("10.1.0.6", (workload.PortMapping(80, 8080),)),
    ]
    assert endpoints[0].labels == (("version", "v1"),)
    assert endpoints[0].uid == ("Kubernetes/networking.istio.io/ServiceEntry/shop/api/10.1.0.5")


@pytest.mark.parametrize(
    ("entry", "hosts", "endpoints"),
    [
        (_entry(resolution="NONE"), ["api.example.com"], 0),
        (_entry(hosts=("*.example.com", "api.example.com")), ["api.example.com"], 1),
        (_entry(hosts=("a.example.com", "b.example.com")), ["a.example.com", "b.example.com"], 2),
    ],
    ids=["none-has-no-endpoints", "wildcards-get-nothing", "each-host-resolves-itself"],
)
def test_hosts_and_resolution(entry: dict[str, Any], hosts: list[str], endpoints: int) -> None:
    services, built = _build(entry)
    assert [s.hostname for s in services] == hosts
    assert len(built) == endpoints


def test_the_waypoint_comes_from_the_entry_or_its_namespace() -> None:
    [own], _ = _build(_entry(labels={"istio.io/use-waypoint": "egress"}))
    assert own.waypoint == workload.GatewayAddress(
        hostname=("shop", "egress.shop.svc.cluster.local")
    )
    [inherited], _ = _build(_entry(), {"istio.io/use-waypoint": "waypoint"})
    assert inherited.waypoint is not None
    [opted_out], _ = _build(
        _entry(labels={"istio.io/use-waypoint": "none"}), {"istio.io/use-waypoint": "waypoint"}
    )
    assert opted_out.waypoint is None


def test_translator_adds_changes_and_removes_an_entrys_services_and_endpoints() -> None:
    tr = translator.Translator(
        trust_domain="cluster.local", cluster_id=CLUSTER, domain="cluster.local"
    )
    tr.apply("ADDED", {"metadata": {"name": "shop"}}, kind="Namespace")
    added = tr.apply("ADDED", _entry())
    assert [s.hostname for s in added.services] == ["api.example.com"]
    assert [w.hostname for w in added.workloads] == ["api.example.com"]
    assert tr.snapshot().services == added.services

    # The allocator's status gives the host its VIP: only the service changes.
    allocated = tr.apply("MODIFIED", _entry(allocated={"api.example.com": "240.240.0.1"}))
    assert [str(a) for s in allocated.services for a in s.addresses] == ["240.240.0.1"]
    assert allocated.workloads == ()
    # Labelling the namespace gives it the waypoint.
    relabelled = tr.apply(
        "MODIFIED",
        {"metadata": {"name": "shop", "labels": {"istio.io/use-waypoint": "waypoint"}}},
        kind="Namespace",
    )
    assert [s.waypoint is not None for s in relabelled.services] == [True]
    # Another host replaces the first.
    moved = tr.apply("MODIFIED", _entry(hosts=("api2.example.com",)))
    assert moved.removed_services == (ids.service_key("shop", "api.example.com"),)
    assert [s.hostname for s in moved.services] == ["api2.example.com"]
    assert len(moved.removed_workloads) == 1
    gone = tr.apply("DELETED", _entry(hosts=("api2.example.com",)))
    assert gone.removed_services == (ids.service_key("shop", "api2.example.com"),)
    assert tr.snapshot().services == ()
    assert tr.snapshot().workloads == ()


def test_an_entry_with_a_port_the_api_would_refuse_is_left_out_and_named() -> None:
    tr = translator.Translator(
        trust_domain="cluster.local", cluster_id=CLUSTER, domain="cluster.local"
    )
    bad = _entry()
    bad["spec"]["ports"][0]["number"] = "eighty"
    changes = tr.apply("ADDED", bad)
    assert changes.services == ()
    assert changes.workloads == ()
    assert changes.errors == (
        "ServiceEntry shop/api: spec.ports[0]: not a port: "
        "{'number': 'eighty', 'name': 'http', 'protocol': 'HTTP', "
        "'targetPort': 8080}",
    )
    # Fixed, it appears.
    assert [s.hostname for s in tr.apply("MODIFIED", _entry()).services] == ["api.example.com"]
