"""HTTP/2 clients of the waypoint (h2c, prior knowledge), with a real h2 client on 127.0.0.1:
concurrent streams on one connection routed independently, request and response bodies through
flow control, and the same listener still serving HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events

from meshcore.traffic import routes
from tests.direct import http_upstreams
from waypoint import engine as waypoint_engine
from waypoint import h2downstream, upstream

DEADLINE = 10.0
HOST = "reviews.shop.svc.cluster.local"
TABLE = routes.build_route_table(
    {
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                },
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        },
    }
)


class Tables:
    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        return TABLE if routes.qualify(host.partition(":")[0], "shop") == HOST else None


class Endpoints:
    def __init__(self, by_subset: dict[str, list[upstream.Endpoint]]) -> None:
        self.by_subset = by_subset

    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        return self.by_subset.get(subset or "", ())


class H2Client:
    """A prior-knowledge HTTP/2 client that collects each stream's response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self.responses: dict[int, dict[str, Any]] = {}

    def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", "reviews"),
        ]
        self.conn.send_headers(sid, [*fields, *headers], end_stream=not body)
        self.responses[sid] = {
            "headers": {},
            "body": bytearray(),
            "ended": False,
            "body_left": body,
        }
        self._send_pending()
        return sid

    def _send_pending(self) -> None:
        for sid, state in self.responses.items():
            left: bytes = state["body_left"]
            while left:
                window = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                self.conn.send_data(sid, left[:window], end_stream=len(left) <= window)
                left = left[window:]
            state["body_left"] = left
        self.writer.write(self.conn.data_to_send())

    async def wait(self, sids: Sequence[int]) -> None:
        while not all(self.responses[s]["ended"] for s in sids):
            data = await asyncio.wait_for(self.reader.read(65536), DEADLINE)
            assert data, "connection closed"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.responses[event.stream_id]["headers"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    self.responses[event.stream_id]["body"] += event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    self.responses[event.stream_id]["ended"] = True
            self._send_pending()


@contextlib.asynccontextmanager
async def listening(*servers: http_upstreams.Upstream) -> AsyncIterator[int]:
    engine = waypoint_engine.Engine(
        Tables(),
        Endpoints({s.name: [s.endpoint] for s in servers}),
        upstream.UpstreamPool(),
        random.Random(5),
    )
    server = await asyncio.get_running_loop().create_server(
        lambda: h2downstream.SniffingProtocol(engine, 9080), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        engine.pool.close()


def _run(coro: Any) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, DEADLINE * 3)

    asyncio.run(bounded())


def test_concurrent_streams_are_routed_each_on_its_own_and_bodies_cross_flow_control() -> None:
    payload = random.Random(9).randbytes(300_000)  # several windows' worth each way

    async def main() -> None:
        ups = http_upstreams.Upstream("v1"), http_upstreams.Upstream("v2")
        async with http_upstreams.serving(*ups) as (v1, v2), listening(v1, v2) as port:
            client = H2Client(*await asyncio.open_connection("127.0.0.1", port))
            canary = client.request("GET", "/a", [("x-canary", "true")])
            plain = client.request("GET", "/b")
            upload = client.request("POST", "/up", body=payload)
            await client.wait([canary, plain, upload])
            r = client.responses
            assert r[canary]["headers"][":status"] == "200"
            assert json.loads(r[canary]["body"])["server"] == "v2"
            assert json.loads(r[plain]["body"])["server"] == "v1"
            assert json.loads(r[plain]["body"])["path"] == "/b"
            assert hashlib.sha256(r[upload]["body"]).digest() == hashlib.sha256(payload).digest()
            assert "transfer-encoding" not in r[upload]["headers"]  # HTTP/2 has its own framing
            client.writer.close()

            # The same listener still speaks HTTP/1.1.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await http_upstreams.Client(reader, writer).request(path="/c")
            assert answer.json()["server"] == "v1"
            writer.close()

    _run(main())


def test_a_stream_for_a_host_without_routes_gets_404_and_the_others_go_on() -> None:
    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            listening(v1) as port,
        ):
            client = H2Client(*await asyncio.open_connection("127.0.0.1", port))
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":path", "/"),
                    (":scheme", "http"),
                    (":authority", "ratings"),
                ],
                end_stream=True,
            )
            client.responses[sid] = {
                "headers": {},
                "body": bytearray(),
                "ended": False,
                "body_left": b"",
            }
            ok = client.request("GET", "/fine")
            await client.wait([sid, ok])
            assert client.responses[sid]["headers"][":status"] == "404"
            assert client.responses[ok]["headers"][":status"] == "200"
            client.writer.close()

    _run(main())
