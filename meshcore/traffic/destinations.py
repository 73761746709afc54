"""A DestinationRule as frozen values: its subsets and the traffic policy each one gets.

A subset's ``trafficPolicy`` overrides the top-level one part by part (load balancer,
connection pool, outlier detection), as Istio merges them. Only the parts a waypoint acts on are
kept; the API's schema has already refused what is malformed, and anything that still does not
fit raises `routes.TrafficConfigError` naming the object.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from meshcore import durations
from meshcore.traffic import routes

# Envoy's outlier detection defaults (what Istio leaves in place when a field is not set).
DEFAULT_INTERVAL = 10.0
DEFAULT_BASE_EJECTION = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
DEFAULT_CONSECUTIVE_5XX = 5
# Envoy's circuit-breaker defaults.
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING = 1024
DEFAULT_MAX_REQUESTS = 1024


class Balancing(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    HASH = "HASH"


class HashOn(enum.Enum):
    HEADER = "header"
    COOKIE = "cookie"
    SOURCE_IP = "source-ip"
    QUERY_PARAMETER = "query-parameter"


@dataclasses.dataclass(frozen=True, slots=True)
class LoadBalancer:
    balancing: Balancing = Balancing.LEAST_REQUEST  # Istio's default
    hash_on: HashOn | None = None
    hash_key: str = ""  # header, cookie or query parameter name


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_requests: int = DEFAULT_MAX_PENDING
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_requests_per_connection: int = 0  # 0: unlimited
    connect_timeout: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX  # 0: not ejected for 5xx
    consecutive_gateway_errors: int = 0  # 0: not counted apart
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT


@dataclasses.dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer = LoadBalancer()
    connection_pool: ConnectionPool = ConnectionPool()
    outlier_detection: OutlierDetection | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


@dataclasses.dataclass(frozen=True, slots=True)
class DestinationRule:
    namespace: str
    name: str
    host: str  # qualified
    policy: TrafficPolicy
    subsets: tuple[Subset, ...]

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str | None) -> TrafficPolicy:
        found = self.subset(subset) if subset is not None else None
        return found.policy if found is not None else self.policy


def build_destination_rule(
    obj: Mapping[str, Any], domain: str = routes.DEFAULT_DOMAIN
) -> DestinationRule:
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    spec = obj.get("spec") or {}
    try:
        top = spec.get("trafficPolicy") or {}
        policy = _policy(top, TrafficPolicy())
        subsets = tuple(
            Subset(
                name=s["name"],
                labels=tuple(sorted((s.get("labels") or {}).items())),
                policy=_policy(s.get("trafficPolicy") or {}, policy),
            )
            for s in spec.get("subsets") or ()
        )
        host = routes.qualify(spec["host"], namespace, domain)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise routes.TrafficConfigError(
            f"DestinationRule {namespace}/{name}: malformed spec ({type(exc).__name__}: {exc})"
        ) from exc
    return DestinationRule(namespace, name, host, policy, subsets)


def _seconds(value: str | None) -> float | None:
    return None if value is None else durations.parse_duration(value)


def _policy(spec: Mapping[str, Any], base: TrafficPolicy) -> TrafficPolicy:
    """`spec`'s parts over `base`'s: a part set in `spec` replaces the same part of `base`."""
    lb, pool, outlier = (
        spec.get("loadBalancer"),
        spec.get("connectionPool"),
        spec.get("outlierDetection"),
    )
    return TrafficPolicy(
        load_balancer=base.load_balancer if lb is None else _load_balancer(lb),
        connection_pool=base.connection_pool if pool is None else _connection_pool(pool),
        outlier_detection=base.outlier_detection if outlier is None else _outlier(outlier),
    )


def _load_balancer(spec: Mapping[str, Any]) -> LoadBalancer:
    hashing = spec.get("consistentHash")
    if hashing is not None:
        if "httpHeaderName" in hashing:
            return LoadBalancer(Balancing.HASH, HashOn.HEADER, hashing["httpHeaderName"].lower())
        if "httpCookie" in hashing:
            return LoadBalancer(Balancing.HASH, HashOn.COOKIE, hashing["httpCookie"]["name"])
        if "httpQueryParameterName" in hashing:
            return LoadBalancer(
                Balancing.HASH, HashOn.QUERY_PARAMETER, hashing["httpQueryParameterName"]
            )
        return LoadBalancer(Balancing.HASH, HashOn.SOURCE_IP)
    simple = spec.get("simple", "UNSPECIFIED")
    if simple in ("UNSPECIFIED", "LEAST_CONN"):  # LEAST_CONN is Istio's old name
        return LoadBalancer(Balancing.LEAST_REQUEST)
    return LoadBalancer(Balancing(simple))


def _connection_pool(spec: Mapping[str, Any]) -> ConnectionPool:
    tcp, http = spec.get("tcp") or {}, spec.get("http") or {}
    return ConnectionPool(
        max_connections=tcp.get("maxConnections") or DEFAULT_MAX_CONNECTIONS,
        max_pending_requests=http.get("http1MaxPendingRequests") or DEFAULT_MAX_PENDING,
        max_requests=http.get("http2MaxRequests") or DEFAULT_MAX_REQUESTS,
        max_requests_per_connection=http.get("maxRequestsPerConnection") or 0,
        connect_timeout=_seconds(tcp.get("connectTimeout")),
    )


def _outlier(spec: Mapping[str, Any]) -> OutlierDetection:
    consecutive = spec.get("consecutive5xxErrors", spec.get("consecutiveErrors"))
    return OutlierDetection(
        consecutive_5xx=DEFAULT_CONSECUTIVE_5XX if consecutive is None else consecutive,
        consecutive_gateway_errors=spec.get("consecutiveGatewayErrors", 0),
        interval=_seconds(spec.get("interval")) or DEFAULT_INTERVAL,
        base_ejection_time=_seconds(spec.get("baseEjectionTime")) or DEFAULT_BASE_EJECTION,
        max_ejection_percent=spec.get("maxEjectionPercent", DEFAULT_MAX_EJECTION_PERCENT),
    )
