"""What every client connection of one waypoint listener shares: the state the waypoint
serves from (route tables, endpoints, DestinationRules, policies, workloads: seams the
composition root fills), the balancing state per destination, and what happens to each answered
request (telemetry).

`Caller` is who is on the other end of one client connection, as the listener learned it (the
HBONE peer's identity and the original client's address), for authorization and telemetry.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from meshcore import istio_labels
from meshcore.policy import http as http_policy
from meshcore.policy import spec as policy_spec
from meshcore.traffic import destinations, routes
from waypoint import cluster, exchange, http1, routing, telemetry, tracing, upstream

DENIED_BODY = "RBAC: access denied"


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    address: tuple[str, int]  # the original client's
    destination: tuple[str, int]  # what it called: a service VIP and port
    principal: str | None = None  # "cluster.local/ns/shop/sa/web", None for plaintext
    is_mutual_tls: bool = False
    labels: tuple[str, ...] = telemetry.UNKNOWN_SIDE  # its workload, for metrics
    service: str | None = None  # the service hostname it called, when the tunnel named it

    @property
    def metric_labels(self) -> tuple[str, ...]:
        """Its workload labels, with the principal filled in from the identity when no
        workload is known (as Istio reports an unknown peer that presented a certificate)."""
        if self.principal is None or self.labels[4] != istio_labels.UNKNOWN:
            return self.labels
        return (*self.labels[:4], f"spiffe://{self.principal}", *self.labels[5:])


class RouteTables(Protocol):
    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        """The routes for requests to service `host` (qualified, from the tunnel; or the Host
        field as the client wrote it, without a tunnel) on service `port`."""
        ...


class DestinationRules(Protocol):
    def find_destination_rule(self, host: str) -> destinations.DestinationRule | None:
        """The DestinationRule for `host` (qualified), if one applies."""
        ...


class NoDestinationRules:
    def find_destination_rule(self, host: str) -> destinations.DestinationRule | None:
        return None


class Policies(Protocol):
    def find_policies(self, host: str, port: int) -> Sequence[policy_spec.PolicySpec]:
        """The AuthorizationPolicies bound (by targetRefs) to the service `host` (the one the
        tunnel named, else the Host field as written) or to the waypoint itself."""
        ...


class NoPolicies:
    def find_policies(self, host: str, port: int) -> Sequence[policy_spec.PolicySpec]:
        return ()


class Workloads(Protocol):
    def describe_endpoint(self, endpoint: upstream.Endpoint) -> tuple[str, ...]:
        """The eight workload labels of the pod at `endpoint` (`istio_labels`)."""
        ...


class NoWorkloads:
    def describe_endpoint(self, endpoint: upstream.Endpoint) -> tuple[str, ...]:
        return telemetry.UNKNOWN_SIDE


@dataclasses.dataclass(slots=True)
class Engine:
    """What every client connection of one listener shares (the `exchange.Upstreams`)."""

    tables: RouteTables
    endpoints: exchange.Endpoints
    pool: upstream.UpstreamPool
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    rules: DestinationRules = dataclasses.field(default_factory=NoDestinationRules)
    policies: Policies = dataclasses.field(default_factory=NoPolicies)
    workloads: Workloads = dataclasses.field(default_factory=NoWorkloads)
    telemetry: telemetry.Telemetry | None = None
    tracer: tracing.Tracer | None = None
    on_done: Callable[[http1.RequestHead, exchange.Outcome], None] | None = None
    clusters: dict[tuple[str, str | None], cluster.Cluster] = dataclasses.field(
        default_factory=dict
    )

    def rolls(self) -> routing.Rolls:
        rng = self.rng
        return routing.Rolls(rng.randrange(100), rng.random() * 100, rng.random() * 100)

    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        return self.endpoints.find_endpoints(host, subset, port)

    def find_cluster(self, destination: routes.Destination) -> cluster.Cluster:
        """The destination's balancing state, under its DestinationRule's current policy."""
        rule = self.rules.find_destination_rule(destination.host)
        policy = (
            rule.policy_for(destination.subset)
            if rule is not None
            else destinations.TrafficPolicy()
        )
        key = (destination.host, destination.subset)
        found = self.clusters.get(key)
        if found is None:
            found = self.clusters[key] = cluster.Cluster(policy, rng=self.rng)
        found.policy = policy  # a changed rule applies from the next request on
        return found

    def authorize(self, caller: Caller, head: http1.RequestHead) -> routing.LocalReply | None:
        """None when the request may go on, else the 403 that answers it."""
        host = caller.service or head.authority
        policies = self.policies.find_policies(host, caller.destination[1])
        if not policies:
            return None
        request = http_policy.RequestInfo(
            source_principal=caller.principal,
            source_ip=caller.address[0],
            destination_ip=caller.destination[0],
            destination_port=caller.destination[1],
            host=head.authority,
            method=head.method,
            path=head.target,
            headers=tuple(head.headers),
        )
        if http_policy.evaluate(policies, request).is_allowed:
            return None
        return routing.LocalReply(403, DENIED_BODY, routing.Flag.DENIED)

    def trace(self, ex: exchange.Exchange, service: str, port: int) -> None:
        """Start the request's span and send its trace context on (a no-op without a tracer)."""
        if self.tracer is None:
            return
        head = ex.head
        span = self.tracer.start(head.headers, f"{service}:{port}/*")
        head.headers = [(n, v) for n, v in head.headers if n not in ("traceparent", "tracestate")]
        head.headers.append(("traceparent", span.context.traceparent))
        ex.span = span

    def finish(self, caller: Caller, head: http1.RequestHead, outcome: exchange.Outcome) -> None:
        """An exchange is over: count it, log it."""
        if self.telemetry is not None:
            endpoint = outcome.endpoint
            self.telemetry.record(
                telemetry.RequestRecord(
                    source=caller.metric_labels,
                    destination=(
                        self.workloads.describe_endpoint(endpoint)
                        if endpoint is not None
                        else telemetry.UNKNOWN_SIDE
                    ),
                    service=telemetry.Service.from_host(outcome.destination_host),
                    source_address=f"{caller.address[0]}:{caller.address[1]}",
                    method=head.method,
                    path=head.target,
                    authority=head.authority,
                    status=outcome.status,
                    flag=outcome.flag.value if outcome.flag is not None else "-",
                    duration_ms=outcome.duration_ms,
                    request_bytes=outcome.request_bytes,
                    response_bytes=outcome.upstream_bytes,
                    upstream=f"{endpoint[0]}:{endpoint[1]}" if endpoint is not None else "",
                    attempts=outcome.attempts,
                    is_mutual_tls=caller.is_mutual_tls,
                )
            )
        if self.on_done is not None:
            self.on_done(head, outcome)
