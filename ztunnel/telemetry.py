"""Istio-compatible TCP metrics and the per-connection access log (spec section 8).

Both reporters count bytes the Istio way: *received* is what the client sent (the request
direction), *sent* is what went back to it (the response direction).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing

import prometheus_client

from meshcore import istio_labels, log
from meshcore.identity import spiffe
from meshcore.model import workload

access_logger = logging.getLogger("access")

LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
UNKNOWN = istio_labels.UNKNOWN


class Metrics:
    """The ztunnel metric families, registered in their own registry (no global state)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, doc, LABEL_NAMES, registry=registry)

        self.opened = counter("istio_tcp_connections_opened", "TCP connections opened")
        self.closed = counter("istio_tcp_connections_closed", "TCP connections closed")
        self.received = counter("istio_tcp_received_bytes", "Bytes received from the client")
        self.sent = counter("istio_tcp_sent_bytes", "Bytes sent back to the client")
        self.failed = counter("istio_tcp_connections_failed", "TCP connections that failed")
        self.sockets_open = prometheus_client.Gauge(
            "istio_tcp_sockets_open", "Open proxied connections", ["reporter"], registry=registry
        )
        self.build = prometheus_client.Gauge(
            "istio_build", "Build information", ["component", "tag"], registry=registry
        )
        self.build.labels("ztunnel", "ambient-mesh-0.1.0").set(1)
        self.active_proxies = prometheus_client.Gauge(
            "workload_manager_active_proxy_count", "Pods with running proxies", registry=registry
        )
        self.proxies_started = prometheus_client.Counter(
            "workload_manager_proxies_started", "Pod proxies started", registry=registry
        )
        self.proxies_stopped = prometheus_client.Counter(
            "workload_manager_proxies_stopped", "Pod proxies stopped", registry=registry
        )
        self.xds_messages = prometheus_client.Counter(
            "istio_xds_message", "xDS messages applied", ["url"], registry=registry
        )


@dataclasses.dataclass(slots=True)
class ConnectionRecord:
    """One proxied connection, as both the metrics and the access log see it."""

    direction: str  # "outbound" (reporter=source) or "inbound" (reporter=destination)
    src_addr: str
    dst_addr: str
    source: workload.Workload | None = None
    source_identity: spiffe.SpiffeId | None = None
    destination: workload.Workload | None = None
    destination_identity: spiffe.SpiffeId | None = None
    service: workload.Service | None = None
    hbone_addr: str = ""
    mutual_tls: bool = False
    flag: str = "-"
    error: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    is_open: bool = False
    # The last labels() and what they were made of: a connection is counted when it opens and
    # again when it ends, and its labels seldom change in between.
    _labels: tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)
    _labels_of: tuple[object, ...] = dataclasses.field(default=(), init=False, repr=False)

    @property
    def reporter(self) -> str:
        return "source" if self.direction == "outbound" else "destination"

    def labels(self) -> tuple[str, ...]:
        of = (
            self.direction,
            self.source,
            self.source_identity,
            self.destination,
            self.destination_identity,
            self.service,
            self.flag,
            self.mutual_tls,
        )
        if of != self._labels_of:
            self._labels = self._make_labels()
            self._labels_of = of
        return self._labels

    def _make_labels(self) -> tuple[str, ...]:
        svc = self.service
        return (
            self.reporter,
            *istio_labels.workload_labels(self.source, self.source_identity),
            istio_labels.or_unknown(svc.hostname if svc else ""),
            istio_labels.or_unknown(svc.namespace if svc else ""),
            istio_labels.or_unknown(svc.name if svc else ""),
            *istio_labels.workload_labels(self.destination, self.destination_identity),
            "tcp",
            self.flag,
            "mutual_tls" if self.mutual_tls else UNKNOWN,
        )


def format_addr(address: tuple[str, int] | None) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6), or an empty string when unknown."""
    if not address:
        return ""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Counters(typing.NamedTuple):
    """The per-connection counters of one label set (prometheus children, looked up once)."""

    opened: prometheus_client.Counter
    closed: prometheus_client.Counter
    received: prometheus_client.Counter
    sent: prometheus_client.Counter
    failed: prometheus_client.Counter


# Label sets seen recently, so each connection skips five `labels()` lookups (a tenth of a
# connection's CPU in the profile). Children are never removed from the metrics, so a cached
# one stays the live one; past the bound the cache starts over (the metrics keep everything).
_COUNTER_CACHE_SIZE = 4096


class Telemetry:
    """Records connection life cycles into metrics and writes one access-log entry each."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[tuple[str, ...], _Counters] = {}
        self._sockets_open: dict[str, prometheus_client.Gauge] = {}

    def _counters_for(self, labels: tuple[str, ...]) -> _Counters:
        found = self._counters.get(labels)
        if found is None:
            m = self.metrics
            found = _Counters(
                m.opened.labels(*labels),
                m.closed.labels(*labels),
                m.received.labels(*labels),
                m.sent.labels(*labels),
                m.failed.labels(*labels),
            )
            if len(self._counters) >= _COUNTER_CACHE_SIZE:
                self._counters.clear()
            self._counters[labels] = found
        return found

    def _sockets_gauge(self, reporter: str) -> prometheus_client.Gauge:
        gauge = self._sockets_open.get(reporter)
        if gauge is None:
            gauge = self._sockets_open[reporter] = self.metrics.sockets_open.labels(reporter)
        return gauge

    def opened(self, record: ConnectionRecord) -> None:
        record.is_open = True
        self._counters_for(record.labels()).opened.inc()
        self._sockets_gauge(record.reporter).inc()

    def finished(self, record: ConnectionRecord) -> None:
        counters = self._counters_for(record.labels())
        if not record.is_open:
            # Failed before it was established: count it as opened and closed at once.
            counters.opened.inc()
        else:
            self._sockets_gauge(record.reporter).dec()
        counters.closed.inc()
        if record.request_bytes:
            counters.received.inc(record.request_bytes)
        if record.response_bytes:
            counters.sent.inc(record.response_bytes)
        if record.error is not None:
            counters.failed.inc()
        self._access_log(record)

    def _access_log(self, record: ConnectionRecord) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return  # not even the fields are worth making (benchmarks log at warning)
        src, dst = record.source, record.destination
        src_id = record.source_identity or (src.identity if src else None)
        dst_id = record.destination_identity or (dst.identity if dst else None)
        fields = {
            "src.addr": record.src_addr,
            "src.workload": src.name if src else None,
            "src.namespace": src.namespace if src else None,
            "src.identity": src_id.uri if src_id else None,
            "src.cluster": src.cluster_id if src else None,
            "dst.addr": record.dst_addr,
            "dst.hbone_addr": record.hbone_addr or None,
            "dst.service": record.service.hostname if record.service else None,
            "dst.workload": dst.name if dst else None,
            "dst.namespace": dst.namespace if dst else None,
            "dst.identity": dst_id.uri if dst_id else None,
            "dst.cluster": dst.cluster_id if dst else None,
            "direction": record.direction,
            "bytes_sent": record.request_bytes,
            "bytes_recv": record.response_bytes,
            "duration": f"{(time.monotonic() - record.started) * 1000:.0f}ms",
            "response_flags": record.flag,
            "error": record.error,
        }
        access_logger.info("connection complete", extra=log.fields(**fields))
