from __future__ import annotations

import ipaddress

import prometheus_client
import pytest

from meshcore.identity import spiffe
from meshcore.model import ids, workload
from ztunnel import telemetry


def _wl(name: str, sa: str) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("shop", name),
        name=name,
        namespace="shop",
        addresses=(ipaddress.ip_address("10.244.0.2"),),
        node="n1",
        service_account=sa,
        canonical_name=f"{name}-app",
        canonical_revision="v2",
        workload_name=f"{name}-deploy",
    )


def test_labels_follow_istio_names_and_order() -> None:
    record = telemetry.ConnectionRecord(
        direction="inbound",
        src_addr="10.244.0.5:1234",
        dst_addr="10.244.0.2:8080",
        source=_wl("client", "web"),
        destination=_wl("catalog", "catalog"),
        service=workload.Service(
            name="catalog",
            namespace="shop",
            hostname="catalog.shop.svc.cluster.local",
            addresses=(),
            ports=(),
        ),
        mutual_tls=True,
        flag="DENY",
    )
    labels = dict(zip(telemetry.LABEL_NAMES, record.labels(), strict=True))
    assert labels == {
        "reporter": "destination",
        "source_workload": "client-deploy",
        "source_canonical_service": "client-app",
        "source_canonical_revision": "v2",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/web",
        "source_app": "client-app",
        "source_version": "v2",
        "source_cluster": "Kubernetes",
        "destination_service": "catalog.shop.svc.cluster.local",
        "destination_service_namespace": "shop",
        "destination_service_name": "catalog",
        "destination_workload": "catalog-deploy",
        "destination_canonical_service": "catalog-app",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/catalog",
        "destination_app": "catalog-app",
        "destination_version": "v2",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp",
        "response_flags": "DENY",
        "connection_security_policy": "mutual_tls",
    }


def test_peer_identity_without_workload_is_still_reported() -> None:
    peer = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/other/sa/x")
    record = telemetry.ConnectionRecord(
        direction="inbound", src_addr="", dst_addr="", source_identity=peer
    )
    labels = dict(zip(telemetry.LABEL_NAMES, record.labels(), strict=True))
    assert labels["source_principal"] == peer.uri
    assert labels["source_workload"] == "unknown"
    assert labels["connection_security_policy"] == "unknown"


def test_counts_land_in_the_same_series_across_cache_resets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "_COUNTER_CACHE_SIZE", 2)
    registry = prometheus_client.CollectorRegistry()
    tel = telemetry.Telemetry(telemetry.Metrics(registry))
    # Four different label sets (different client workloads) with a cache of two: the first
    # one's counters are looked up again after the cache started over.
    names = ["a", "b", "c", "a"]
    for name in names:
        record = telemetry.ConnectionRecord(
            direction="outbound", src_addr="", dst_addr="", source=_wl(name, name)
        )
        tel.opened(record)
        record.request_bytes = 10
        tel.finished(record)

    def value(metric: str, workload_name: str) -> float | None:
        return registry.get_sample_value(
            metric,
            {
                **dict.fromkeys(telemetry.LABEL_NAMES, "unknown"),
                "reporter": "source",
                "source_workload": f"{workload_name}-deploy",
                "source_canonical_service": f"{workload_name}-app",
                "source_canonical_revision": "v2",
                "source_workload_namespace": "shop",
                "source_principal": f"spiffe://cluster.local/ns/shop/sa/{workload_name}",
                "source_app": f"{workload_name}-app",
                "source_version": "v2",
                "source_cluster": "Kubernetes",
                "request_protocol": "tcp",
                "response_flags": "-",
            },
        )

    assert value("istio_tcp_connections_opened_total", "a") == 2
    assert value("istio_tcp_connections_closed_total", "a") == 2
    assert value("istio_tcp_received_bytes_total", "a") == 20
    assert value("istio_tcp_connections_opened_total", "c") == 1
    assert registry.get_sample_value("istio_tcp_sockets_open", {"reporter": "source"}) == 0


def test_labels_follow_changes_made_after_they_were_first_read() -> None:
    record = telemetry.ConnectionRecord(
        direction="outbound", src_addr="", dst_addr="", source=_wl("client", "web")
    )
    before = dict(zip(telemetry.LABEL_NAMES, record.labels(), strict=True))
    assert (before["response_flags"], before["destination_workload"]) == ("-", "unknown")
    record.flag = "CONNECT"
    record.destination = _wl("catalog", "catalog")
    record.mutual_tls = True
    after = dict(zip(telemetry.LABEL_NAMES, record.labels(), strict=True))
    assert after["response_flags"] == "CONNECT"
    assert after["destination_workload"] == "catalog-deploy"
    assert after["connection_security_policy"] == "mutual_tls"
