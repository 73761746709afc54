"""What the waypoint does with one request, decided before any I/O: a pure function of the route
table, the request head and the random rolls (which the caller draws, so tests can fix them).

The plan is either a `LocalReply` (no route, a fault abort, a redirect or a direct response) or
a `ForwardPlan`: the destination service (and subset), the head to send upstream after the
route's rewrite and header operations, and the resilience settings the forwarding applies.
"""

from __future__ import annotations

import dataclasses
import enum

from meshcore.traffic import matching, routes
from waypoint import http1


class Flag(enum.Enum):
    """Envoy's response flags, as Istio's telemetry reports them."""

    NO_ROUTE = "NR"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_TIMEOUT = "UT"
    UPSTREAM_OVERFLOW = "UO"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    FAULT_ABORT = "FI"
    FAULT_DELAY = "DI"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    DENIED = "RBAC_ACCESS_DENIED"  # Istio logs this one spelled out


@dataclasses.dataclass(frozen=True, slots=True)
class Rolls:
    """Uniform draws: `split` in [0, 100) picks a weighted destination, `abort` and `delay` in
    [0, 100) decide whether a fault fires (it does when the roll is below its percentage)."""

    split: int
    abort: float
    delay: float


@dataclasses.dataclass(frozen=True, slots=True)
class LocalReply:
    status: int
    body: str
    flag: Flag | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float | None = None  # a fault delay that also fired (the abort comes after it)


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardPlan:
    route: routes.HttpRoute
    destination: routes.Destination
    target: str  # the path sent upstream
    headers: tuple[tuple[str, str], ...]  # the request's end-to-end fields, rewritten
    response_ops: tuple[routes.HeaderOps, ...]
    delay: float | None  # a fault delay to wait before forwarding


def build_request(head: http1.RequestHead, port: int) -> matching.Request:
    return matching.Request(
        method=head.method,
        path=head.target,
        authority=head.authority,
        headers=tuple(head.headers),
        port=port,
    )


def build_plan(
    table: routes.RouteTable | None, head: http1.RequestHead, port: int, rolls: Rolls
) -> ForwardPlan | LocalReply:
    if table is None:
        return LocalReply(404, "route not found", Flag.NO_ROUTE)
    selected = matching.select(table, build_request(head, port))
    if selected is None:
        return LocalReply(404, "route not found", Flag.NO_ROUTE)
    route = selected.route
    fault = route.fault
    delay = None
    if fault is not None and fault.delay is not None and rolls.delay < fault.delay_percent:
        delay = fault.delay
    if fault is not None and fault.abort_status is not None and rolls.abort < fault.abort_percent:
        return LocalReply(fault.abort_status, "fault filter abort", Flag.FAULT_ABORT, delay=delay)
    if route.direct_response is not None:
        reply = route.direct_response
        return LocalReply(reply.status, reply.body.decode(), delay=delay)
    if route.redirect is not None:
        return _redirect(route.redirect, head, delay)
    destination = matching.choose(route, rolls.split)
    if destination.port is None:  # Istio: the port the request came in on
        destination = dataclasses.replace(destination, port=port)
    headers = http1.end_to_end(head.headers)
    rewrite = route.rewrite
    if rewrite is not None and rewrite.authority is not None:
        headers = [(n, v) for n, v in headers if n != "host"] + [("host", rewrite.authority)]
    headers = route.request_headers.apply(headers)
    headers = destination.request_headers.apply(headers)
    return ForwardPlan(
        route=route,
        destination=destination,
        target=matching.rewrite_path(selected, head.target),
        headers=tuple(headers),
        response_ops=(route.response_headers, destination.response_headers),
        delay=delay,
    )


def _redirect(
    redirect: routes.Redirect, head: http1.RequestHead, delay: float | None
) -> LocalReply:
    host = redirect.authority or head.header("host") or ""
    if redirect.port is not None:
        host = f"{host.rpartition(':')[0] if ':' in host else host}:{redirect.port}"
    scheme = redirect.scheme or "http"
    path = redirect.uri if redirect.uri is not None else head.target
    location = f"{scheme}://{host}{path}"
    return LocalReply(redirect.status, "", headers=(("location", location),), delay=delay)
