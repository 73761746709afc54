"""Per-request telemetry of the waypoint: Istio's standard HTTP metrics with
``reporter="waypoint"`` and one JSON access-log record per request (logger ``access``).

Metric names and labels are Istio's (spec section 8): `istio_requests_total`,
`istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`, labelled
with the source and destination workloads (as `meshcore.istio_labels` writes them), the
destination service, ``request_protocol="http"``, ``response_code``, ``grpc_response_status``,
``response_flags`` and ``connection_security_policy``.
"""

from __future__ import annotations

import dataclasses
import logging

import prometheus_client

from meshcore import istio_labels, log

access_logger = logging.getLogger("access")

REPORTER = "waypoint"
_SIDE = istio_labels.WORKLOAD_LABELS
LABEL_NAMES = (
    "reporter",
    *(f"source_{n}" for n in _SIDE),
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    *(f"destination_{n}" for n in _SIDE),
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
# Istio's default buckets (milliseconds, and bytes).
DURATION_BUCKETS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)  # fmt: skip
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)
UNKNOWN_SIDE = (istio_labels.UNKNOWN,) * len(_SIDE)


@dataclasses.dataclass(frozen=True, slots=True)
class Service:
    hostname: str = ""
    namespace: str = ""
    name: str = ""

    @classmethod
    def from_host(cls, host: str) -> Service:
        """A Kubernetes service's name and namespace from its FQDN (name.ns.svc.domain)."""
        parts = host.split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            return cls(host, parts[1], parts[0])
        return cls(host)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the metrics and the access log see it."""

    source: tuple[str, ...]  # the eight workload labels (`istio_labels.workload_labels`)
    destination: tuple[str, ...]
    service: Service
    source_address: str
    method: str
    path: str
    authority: str
    status: int
    flag: str  # "-" when none
    duration_ms: float
    request_bytes: int
    response_bytes: int
    upstream: str  # "ip:port", "" when none was reached
    attempts: int
    is_mutual_tls: bool

    def labels(self) -> tuple[str, ...]:
        svc = self.service
        return (
            REPORTER,
            *self.source,
            istio_labels.or_unknown(svc.hostname),
            istio_labels.or_unknown(svc.namespace),
            istio_labels.or_unknown(svc.name),
            *self.destination,
            "http",
            str(self.status),
            "-",
            self.flag,
            "mutual_tls" if self.is_mutual_tls else istio_labels.UNKNOWN,
        )


class Metrics:
    """The waypoint's request metric families, in their own registry (no global state)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry
        self.requests = prometheus_client.Counter(
            "istio_requests", "Requests answered", LABEL_NAMES, registry=registry
        )
        self.duration = prometheus_client.Histogram(
            "istio_request_duration_milliseconds",
            "Request duration",
            LABEL_NAMES,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.request_bytes = prometheus_client.Histogram(
            "istio_request_bytes",
            "Request body sizes",
            LABEL_NAMES,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.response_bytes = prometheus_client.Histogram(
            "istio_response_bytes",
            "Response body sizes",
            LABEL_NAMES,
            buckets=SIZE_BUCKETS,
            registry=registry,
        )


class Telemetry:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def record(self, record: RequestRecord) -> None:
        labels = record.labels()
        m = self.metrics
        m.requests.labels(*labels).inc()
        m.duration.labels(*labels).observe(record.duration_ms)
        m.request_bytes.labels(*labels).observe(record.request_bytes)
        m.response_bytes.labels(*labels).observe(record.response_bytes)
        access_logger.info(
            "request complete",
            extra=log.fields(
                **{
                    "src.addr": record.source_address,
                    "src.workload": _known(record.source[0]),
                    "src.namespace": _known(record.source[3]),
                    "src.identity": _known(record.source[4]),
                    "dst.service": record.service.hostname or None,
                    "dst.workload": _known(record.destination[0]),
                    "dst.namespace": _known(record.destination[3]),
                    "upstream": record.upstream or None,
                    "method": record.method,
                    "path": record.path,
                    "authority": record.authority,
                    "protocol": "HTTP/1.1",
                    "response_code": record.status,
                    "response_flags": record.flag,
                    "attempts": record.attempts,
                    "bytes_received": record.request_bytes,
                    "bytes_sent": record.response_bytes,
                    "duration": f"{record.duration_ms:.0f}ms",
                }
            ),
        )


def _known(value: str) -> str | None:
    return None if value == istio_labels.UNKNOWN else value
