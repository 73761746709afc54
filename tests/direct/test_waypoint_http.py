"""The waypoint's HTTP/1.1 engine on 127.0.0.1, with real sockets: requests routed by a
VirtualService (headers, cookies, prefixes, weights), rewritten, retried, timed out, faulted,
streamed both ways, kept alive and pipelined. Upstreams are h11 servers; the client is h11."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import prometheus_client
import pytest

from meshcore.policy import spec as policy_spec
from meshcore.traffic import destinations, routes
from tests.direct import http_upstreams
from waypoint import downstream, exchange, routing, telemetry, tracing, upstream
from waypoint import engine as waypoint_engine

T = TypeVar("T")
DEADLINE = 10.0
SERVICE_PORT = 9080
HOST = "reviews.shop.svc.cluster.local"


def _table(http: list[dict[str, Any]]) -> routes.RouteTable:
    return routes.build_route_table(
        {
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": http},
        }
    )


class StaticTables:
    def __init__(self, table: routes.RouteTable) -> None:
        self.table = table

    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        return self.table if routes.qualify(host, "shop") in self.table.hosts else None


class StaticEndpoints:
    def __init__(self, by_subset: Mapping[str, Sequence[upstream.Endpoint]]) -> None:
        self.by_subset = by_subset

    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        return self.by_subset.get(subset or "", ()) if host == HOST else ()


class Waypoint:
    def __init__(self, engine: waypoint_engine.Engine, server: asyncio.Server) -> None:
        self.engine = engine
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        self.outcomes: list[exchange.Outcome] = []

    def last_flag(self) -> routing.Flag | None:
        return self.outcomes[-1].flag

    async def client(self) -> http_upstreams.Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return http_upstreams.Client(reader, writer)


class StaticPolicies:
    def __init__(self, policies: Sequence[policy_spec.PolicySpec]) -> None:
        self.policies = policies

    def find_policies(self, host: str, port: int) -> Sequence[policy_spec.PolicySpec]:
        return self.policies if routes.qualify(host, "shop") == HOST else ()


class StaticRules:
    def __init__(self, rule: destinations.DestinationRule | None) -> None:
        self.rule = rule

    def find_destination_rule(self, host: str) -> destinations.DestinationRule | None:
        return self.rule if self.rule is not None and self.rule.host == host else None


def _rule(spec: dict[str, Any]) -> destinations.DestinationRule:
    subsets = [{"name": name} for name in ("v1", "v2", "premium")]
    return destinations.build_destination_rule(
        {
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "subsets": subsets, **spec},
        }
    )


@contextlib.asynccontextmanager
async def running(
    table: routes.RouteTable,
    endpoints: Mapping[str, Sequence[upstream.Endpoint]],
    rule: destinations.DestinationRule | None = None,
    *,
    policies: Sequence[policy_spec.PolicySpec] = (),
    caller: waypoint_engine.Caller | None = None,
    metrics: telemetry.Metrics | None = None,
    tracer: tracing.Tracer | None = None,
) -> AsyncIterator[Waypoint]:
    pool = upstream.UpstreamPool()
    engine = waypoint_engine.Engine(
        StaticTables(table),
        StaticEndpoints(endpoints),
        pool,
        random.Random(7),
        rules=StaticRules(rule),
        policies=StaticPolicies(policies),
        telemetry=telemetry.Telemetry(metrics) if metrics is not None else None,
        tracer=tracer,
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: downstream.DownstreamProtocol(engine, SERVICE_PORT, caller), "127.0.0.1", 0
    )
    waypoint = Waypoint(engine, server)
    engine.on_done = lambda head, outcome: waypoint.outcomes.append(outcome)
    try:
        yield waypoint
    finally:
        server.close()
        pool.close()


async def _dead_port() -> int:
    """A loopback port nobody listens on: bound, noted, closed."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    return port


def _run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE * 3)

    return asyncio.run(bounded())


def _dest(subset: str, weight: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset}}
    if weight is not None:
        entry["weight"] = weight
    return entry


CANARY = _table(
    [
        {"match": [{"headers": {"x-canary": {"exact": "true"}}}], "route": [_dest("v2")]},
        {
            "match": [{"headers": {"cookie": {"regex": "^(.*?;)?(user=premium)(;.*)?$"}}}],
            "route": [_dest("premium")],
        },
        {
            "match": [{"uri": {"prefix": "/v2/"}}],
            "rewrite": {"uri": "/"},
            "headers": {
                "request": {"set": {"x-mesh": "waypoint"}},
                "response": {"add": {"x-routed": "v2-prefix"}, "remove": ["x-server"]},
            },
            "route": [_dest("v2")],
        },
        {"route": [_dest("v1")]},
    ]
)


def test_headers_cookies_and_prefixes_pick_the_subset_and_rewrites_apply() -> None:
    async def main() -> None:
        ups = (
            http_upstreams.Upstream("v1"),
            http_upstreams.Upstream("v2"),
            http_upstreams.Upstream("premium"),
        )
        async with http_upstreams.serving(*ups) as (v1, v2, premium):
            endpoints = {"v1": [v1.endpoint], "v2": [v2.endpoint], "premium": [premium.endpoint]}
            async with running(CANARY, endpoints) as waypoint:
                client = await waypoint.client()
                assert (await client.request(headers=[("x-canary", "true")])).json()[
                    "server"
                ] == "v2"
                assert (await client.request(headers=[("x-canary", "no")])).json()["server"] == "v1"
                premium_cookie = [("cookie", "user=premium; theme=dark")]
                assert (await client.request(headers=premium_cookie)).json()["server"] == "premium"
                response = await client.request(path="/v2/items?page=3")
                seen = response.json()
                assert (seen["server"], seen["path"]) == ("v2", "/items?page=3")
                assert seen["headers"]["x-mesh"] == "waypoint"
                assert response.headers["x-routed"] == "v2-prefix"
                assert "x-server" not in response.headers
                # Every request above went over one client connection and one upstream
                # connection per endpoint.
                assert waypoint.engine.pool.opened == 3
                assert (v1.connections, v2.connections, premium.connections) == (1, 1, 1)

    _run(main())


def test_a_regex_that_backtracks_exponentially_does_not_stall_the_waypoint() -> None:
    # The audit's finding: Python's `re` would spend hours on this path (~2**40 steps), holding
    # the event loop and with it every other request; RE2 answers at once.
    many_a = "a" * 40
    table = _table(
        [
            {"match": [{"uri": {"regex": "/(a+)+$"}}], "route": [_dest("v2")]},
            {"match": [{"headers": {"x-id": {"regex": "(a+)+$"}}}], "route": [_dest("v2")]},
            {"route": [_dest("v1")]},
        ]
    )

    async def main() -> None:
        ups = http_upstreams.Upstream("v1"), http_upstreams.Upstream("v2")
        async with (
            http_upstreams.serving(*ups) as (v1, v2),
            running(table, {"v1": [v1.endpoint], "v2": [v2.endpoint]}) as waypoint,
        ):
            client = await waypoint.client()
            slow = await client.request(path=f"/{many_a}!", headers=[("x-id", f"{many_a}!")])
            assert slow.json()["server"] == "v1"
            assert (await client.request(path=f"/{many_a}")).json()["server"] == "v2"
            matched = await client.request(headers=[("x-id", many_a)])
            assert matched.json()["server"] == "v2"

    _run(main())


def test_a_ninety_ten_split_over_a_thousand_requests_lands_within_five_points() -> None:
    table = _table([{"route": [_dest("v1", 90), _dest("v2", 10)]}])

    async def main() -> None:
        ups = http_upstreams.Upstream("v1"), http_upstreams.Upstream("v2")
        async with (
            http_upstreams.serving(*ups) as (v1, v2),
            running(table, {"v1": [v1.endpoint], "v2": [v2.endpoint]}) as waypoint,
        ):
            client = await waypoint.client()
            counts = collections.Counter(
                [(await client.request()).json()["server"] for _ in range(1000)]
            )
            assert abs(counts["v1"] / 1000 - 0.9) <= 0.05, counts
            assert v1.requests + v2.requests == 1000

    _run(main())


def test_retries_turn_an_endpoint_failing_every_other_request_into_full_success() -> None:
    retrying = _table([{"route": [_dest("v1")], "retries": {"attempts": 3, "retryOn": "5xx"}}])
    no_retries = _table([{"route": [_dest("v1")], "retries": {"attempts": 0}}])

    async def main() -> None:
        async with http_upstreams.serving(http_upstreams.Upstream("v1", fail_every=2)) as (v1,):
            async with running(retrying, {"v1": [v1.endpoint]}) as waypoint:
                client = await waypoint.client()
                statuses = [(await client.request()).status for _ in range(20)]
                assert statuses == [200] * 20
                assert v1.requests == 40  # every request needed a second try
                assert {o.attempts for o in waypoint.outcomes} == {2}
            v1.requests = 0
            async with running(no_retries, {"v1": [v1.endpoint]}) as waypoint:
                client = await waypoint.client()
                statuses = [(await client.request()).status for _ in range(4)]
                assert statuses == [503, 200, 503, 200]

    _run(main())


def test_a_route_timeout_answers_504_without_waiting_for_the_upstream() -> None:
    table = _table([{"route": [_dest("v1")], "timeout": "200ms"}])

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("slow", delay=5.0)) as (slow,),
            running(table, {"v1": [slow.endpoint]}) as waypoint,
        ):
            client = await waypoint.client()
            started = time.monotonic()
            response = await client.request()
            elapsed = time.monotonic() - started
            assert response.status == 504
            assert response.body == b"upstream request timeout"
            assert elapsed < slow.delay  # answered by the timeout, not by the upstream
            assert waypoint.last_flag() is routing.Flag.UPSTREAM_TIMEOUT

    _run(main())


def test_fault_abort_and_delay_behave_as_configured() -> None:
    aborting = _table(
        [
            {
                "route": [_dest("v1")],
                "fault": {"abort": {"percentage": {"value": 100}, "httpStatus": 418}},
            }
        ]
    )
    delaying = _table(
        [
            {
                "route": [_dest("v1")],
                "fault": {"delay": {"percentage": {"value": 100}, "fixedDelay": "300ms"}},
            }
        ]
    )

    async def main() -> None:
        async with http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,):
            async with running(aborting, {"v1": [v1.endpoint]}) as waypoint:
                response = await (await waypoint.client()).request()
                assert (response.status, response.body) == (418, b"fault filter abort")
                assert v1.requests == 0
                assert waypoint.last_flag() is routing.Flag.FAULT_ABORT
            async with running(delaying, {"v1": [v1.endpoint]}) as waypoint:
                started = time.monotonic()
                response = await (await waypoint.client()).request()
                assert response.status == 200
                assert time.monotonic() - started >= 0.3  # held back for the configured delay
                assert waypoint.last_flag() is routing.Flag.FAULT_DELAY

    _run(main())


def test_bodies_stream_both_ways_byte_for_byte() -> None:
    table = _table([{"route": [_dest("v1")]}])
    payload = random.Random(3).randbytes(5_000_000)

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            running(table, {"v1": [v1.endpoint]}) as waypoint,
        ):
            client = await waypoint.client()
            for chunked in (False, True):
                response = await client.request("POST", "/upload", body=payload, chunked=chunked)
                assert response.status == 200
                assert hashlib.sha256(response.body).digest() == hashlib.sha256(payload).digest()
            assert v1.seen[-1]["body_length"] == len(payload)
            # HEAD has no body even though the upstream says how long the GET would be.
            head = await client.request("HEAD", "/")
            assert (head.status, head.body) == (200, b"")
            assert (await client.request()).json()["method"] == "GET"

    _run(main())


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    table = _table([{"route": [_dest("v1")]}])

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            running(table, {"v1": [v1.endpoint]}) as waypoint,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", waypoint.port)
            writer.write(
                b"GET /one HTTP/1.1\r\nhost: reviews\r\n\r\n"
                b"POST /two HTTP/1.1\r\nhost: reviews\r\ncontent-length: 3\r\n\r\nabc"
                b"GET /three HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"
            )
            data = await asyncio.wait_for(reader.read(), DEADLINE)  # until the close
            writer.close()
            assert data.count(b"HTTP/1.1 200 OK") == 3
            assert data.index(b'"/one"') < data.index(b"abc") < data.index(b'"/three"')
            assert [s["path"] for s in v1.seen] == ["/one", "/two", "/three"]

    _run(main())


def test_bad_requests_unknown_hosts_and_dead_endpoints_get_clear_answers() -> None:
    table = _table([{"route": [_dest("v1")]}])

    async def main() -> None:
        # A port nobody listens on: bind, note it, close.
        dead = ("127.0.0.1", await _dead_port())
        async with running(table, {"v1": [dead]}) as waypoint:
            client = await waypoint.client()
            response = await client.request()
            assert response.status == 503
            assert response.body.startswith(b"upstream connect error or disconnect/reset")
            assert waypoint.last_flag() is routing.Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED
            assert waypoint.outcomes[-1].attempts == 3  # Istio's default: two more tries
            other = await client.request(headers=[("host", "ratings")])
            assert other.status == 404
            assert waypoint.last_flag() is routing.Flag.NO_ROUTE

            reader, writer = await asyncio.open_connection("127.0.0.1", waypoint.port)
            writer.write(b"GET / HTTP/1.1\r\nhost reviews\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), DEADLINE)  # closed after it
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"connection: close" in answer

    _run(main())


def test_circuit_breaking_refuses_a_burst_beyond_one_connection_and_one_pending() -> None:
    table = _table([{"route": [_dest("v1")], "retries": {"attempts": 0}}])
    rule = _rule(
        {
            "trafficPolicy": {
                "connectionPool": {
                    "tcp": {"maxConnections": 1},
                    "http": {"http1MaxPendingRequests": 1},
                }
            }
        }
    )

    async def main() -> None:
        slow = http_upstreams.Upstream("v1", delay=0.5)
        async with (
            http_upstreams.serving(slow) as (v1,),
            running(table, {"v1": [v1.endpoint]}, rule) as waypoint,
        ):
            clients = [await waypoint.client() for _ in range(6)]
            responses = await asyncio.gather(*(c.request() for c in clients))
            statuses = collections.Counter(r.status for r in responses)
            assert statuses == {200: 2, 503: 4}  # one in flight, one waiting: the rest refused
            flags = collections.Counter(o.flag for o in waypoint.outcomes)
            assert flags[routing.Flag.UPSTREAM_OVERFLOW] == 4
            assert v1.requests == 2

    _run(main())


def test_outlier_detection_ejects_a_failing_endpoint_and_brings_it_back() -> None:
    table = _table([{"route": [_dest("v1")], "retries": {"attempts": 0}}])
    rule = _rule(
        {
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "interval": "1s",
                    "baseEjectionTime": "300ms",
                    "maxEjectionPercent": 100,
                },
            }
        }
    )

    async def main() -> None:
        good, bad = http_upstreams.Upstream("good"), http_upstreams.Upstream("bad", fail_every=1)
        async with http_upstreams.serving(good, bad) as (good, bad):
            endpoints = {"v1": [good.endpoint, bad.endpoint]}
            async with running(table, endpoints, rule) as waypoint:
                client = await waypoint.client()
                while bad.requests < 5:  # round robin: every other request reaches it
                    await client.request()
                target = waypoint.engine.clusters[(HOST, "v1")]
                assert target.is_ejected(bad.endpoint)
                statuses = [(await client.request()).status for _ in range(10)]
                assert statuses == [200] * 10
                assert bad.requests == 5  # ejected: not asked again
                loop = asyncio.get_running_loop()
                deadline = loop.time() + DEADLINE
                while target.is_ejected(bad.endpoint):  # the ejection runs out by itself
                    assert loop.time() < deadline
                    await asyncio.sleep(0.02)
                statuses = [(await client.request()).status for _ in range(4)]
                assert 503 in statuses  # back in the rotation
                assert bad.requests > 5

    _run(main())


def test_consistent_hashing_on_a_cookie_keeps_each_user_on_one_endpoint() -> None:
    table = _table([{"route": [_dest("v1")]}])
    rule = _rule(
        {
            "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}}
            }
        }
    )

    async def main() -> None:
        ups = tuple(http_upstreams.Upstream(f"e{i}") for i in range(3))
        async with http_upstreams.serving(*ups) as servers:
            endpoints = {"v1": [s.endpoint for s in servers]}
            async with running(table, endpoints, rule) as waypoint:
                client = await waypoint.client()
                chosen: dict[str, set[str]] = collections.defaultdict(set)
                for user in [f"u{i}" for i in range(12)] * 3:
                    response = await client.request(headers=[("cookie", f"theme=x; user={user}")])
                    chosen[user].add(response.json()["server"])
                assert all(len(servers_seen) == 1 for servers_seen in chosen.values())
                assert len(set().union(*chosen.values())) >= 2  # users are spread

    _run(main())


def test_max_requests_per_connection_opens_new_upstream_connections() -> None:
    table = _table([{"route": [_dest("v1")]}])
    rule = _rule({"trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 2}}}})

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            running(table, {"v1": [v1.endpoint]}, rule) as waypoint,
        ):
            client = await waypoint.client()
            for _ in range(6):
                assert (await client.request()).status == 200
            assert v1.connections == 3

    _run(main())


FRONTEND = "cluster.local/ns/shop/sa/frontend"
API_READERS = policy_spec.parse_authorization_policy(
    {
        "metadata": {"name": "api-readers", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "rules": [
                {
                    "from": [{"source": {"principals": [FRONTEND]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                }
            ],
        },
    }
)


def _caller(principal: str) -> waypoint_engine.Caller:
    return waypoint_engine.Caller(("10.244.1.5", 40000), ("10.96.0.20", SERVICE_PORT), principal)


def test_l7_policy_lets_get_api_from_frontend_through_and_denies_the_rest_with_403() -> None:
    table = _table([{"route": [_dest("v1")]}])

    async def main() -> None:
        async with http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,):
            endpoints = {"v1": [v1.endpoint]}
            async with running(
                table, endpoints, policies=[API_READERS], caller=_caller(FRONTEND)
            ) as waypoint:
                client = await waypoint.client()
                assert (await client.request(path="/api/items")).status == 200
                denied = await client.request("POST", "/api/items", body=b"{}")
                assert (denied.status, denied.body) == (403, b"RBAC: access denied")
                assert waypoint.last_flag() is routing.Flag.DENIED
                assert (await client.request(path="/admin")).status == 403
            other = _caller("cluster.local/ns/shop/sa/backend")
            async with running(table, endpoints, policies=[API_READERS], caller=other) as waypoint:
                client = await waypoint.client()
                assert (await client.request(path="/api/items")).status == 403
            assert [s["path"] for s in v1.seen] == ["/api/items"]  # denials never went upstream

    _run(main())


def test_each_request_is_counted_with_istios_names_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = _table([{"route": [_dest("v1")]}])
    registry = prometheus_client.CollectorRegistry()

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1", fail_every=3)) as (v1,),
            running(
                table,
                {"v1": [v1.endpoint]},
                caller=_caller(FRONTEND),
                metrics=telemetry.Metrics(registry),
            ) as waypoint,
        ):
            client = await waypoint.client()
            for _ in range(3):
                assert (await client.request(path="/p")).status == 200

    with caplog.at_level(logging.INFO, logger="access"):
        _run(main())
    labels = {
        "reporter": "waypoint",
        "destination_service": HOST,
        "destination_service_name": "reviews",
        "destination_service_namespace": "shop",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
    }
    [requests] = [
        sample
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "istio_requests_total"
    ]
    assert requests.value == 3.0
    assert {k: requests.labels[k] for k in labels} == labels
    assert requests.labels["source_principal"] == f"spiffe://{FRONTEND}"
    for histogram in ("istio_request_duration_milliseconds", "istio_response_bytes"):
        assert registry.get_sample_value(f"{histogram}_count", requests.labels) == 3.0
    records = [r for r in caplog.records if r.getMessage() == "request complete"]
    assert len(records) == 3
    fields = getattr(records[0], "fields", {})
    assert fields["response_code"] == 200
    assert fields["path"] == "/p"
    assert fields["dst.service"] == HOST
    assert fields["attempts"] == 2  # the first try met the 503 and was retried
    assert fields["upstream"].startswith("127.0.0.1:")


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _header(seen: dict[str, object], name: str) -> str | None:
    headers = seen["headers"]
    assert isinstance(headers, dict)
    value = headers.get(name)
    return None if value is None else str(value)


PARENT_ID = "00f067aa0ba902b7"


def test_the_trace_id_crosses_the_waypoint_and_a_span_is_exported_over_otlp() -> None:
    table = _table([{"route": [_dest("v1")]}])

    async def main() -> None:
        ups = http_upstreams.Upstream("v1"), http_upstreams.Upstream("collector")
        async with http_upstreams.serving(*ups) as (v1, collector):
            sampled = tracing.Tracer(f"http://127.0.0.1:{collector.port}", sample_percent=100)
            async with running(table, {"v1": [v1.endpoint]}, tracer=sampled) as waypoint:
                client = await waypoint.client()
                incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
                await client.request(path="/p", headers=[("traceparent", incoming)])
                await client.request(path="/fresh", headers=[("traceparent", "garbage")])
                await sampled.flush()
            sent = [tracing.parse_traceparent(_header(s, "traceparent")) for s in v1.seen]
            assert sent[0] is not None
            assert sent[1] is not None
            assert sent[0][0] == TRACE_ID  # the same trace upstream ...
            assert sent[0][1] != PARENT_ID  # ... with the waypoint's span as the parent
            assert sent[1][0] != TRACE_ID  # garbage in: a new trace
            [export] = collector.bodies
            assert collector.seen[0]["path"] == "/v1/traces"
            spans = json.loads(export)["resourceSpans"][0]["scopeSpans"][0]["spans"]
            first, second = spans
            assert (first["traceId"], first["parentSpanId"]) == (TRACE_ID, PARENT_ID)
            assert first["spanId"] == sent[0][1]
            assert {"key": "http.status_code", "value": {"intValue": "200"}} in first["attributes"]
            assert second["traceId"] == sent[1][0]
            assert "parentSpanId" not in second

            # Not sampled: the context still travels, nothing is exported.
            unsampled = tracing.Tracer(f"http://127.0.0.1:{collector.port}", sample_percent=0)
            async with running(table, {"v1": [v1.endpoint]}, tracer=unsampled) as waypoint:
                await (await waypoint.client()).request()
                await unsampled.flush()
            last = tracing.parse_traceparent(_header(v1.seen[-1], "traceparent"))
            assert last is not None
            assert last[2] is False
            assert len(collector.bodies) == 1

    _run(main())


@pytest.mark.parametrize(
    "value",
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has 4 fields
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    ],
)
def test_invalid_traceparents_are_not_continued(value: str) -> None:
    assert tracing.parse_traceparent(value) is None


def test_a_collector_that_is_down_loses_the_batch_not_the_waypoint() -> None:
    async def main() -> None:
        port = await _dead_port()
        tracer = tracing.Tracer(f"http://127.0.0.1:{port}", sample_percent=100)
        tracer.finish(tracer.start([], "svc:80/*"))
        await tracer.flush()  # refused: logged, not raised
        assert tracer.exported == 0
        await tracer.flush()  # the batch is gone: nothing is retried forever
        assert tracer.exported == 0

    _run(main())


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    table = _table([{"route": [_dest("v1")]}])

    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            running(table, {"v1": [v1.endpoint]}) as waypoint,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", waypoint.port)
            writer.write(b"GET /bye HTTP/1.1\r\nhost: reviews\r\n\r\n")
            writer.write_eof()  # done sending, still reading
            answer = await asyncio.wait_for(reader.read(), DEADLINE)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b'"/bye"' in answer

    _run(main())
