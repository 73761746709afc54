"""The waypoint's HTTP/1.1 side on arbitrary bytes, and its other parsers on arbitrary text:
nothing escapes a callback; whatever is written back is an HTTP/1.1 response; garbage gets 400
and the connection closes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.traffic import matching, routes
from waypoint import downstream, tracing, upstream
from waypoint import engine as waypoint_engine


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.1", 40000), "sockname": ("10.0.0.2", 80)}.get(name, default)


class NoRoutes:
    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        return None  # every request is answered 404 locally: no upstream I/O


class NoEndpoints:
    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        return ()


REQUEST = b"GET /p HTTP/1.1\r\nhost: reviews\r\n\r\n"


async def _feed(chunks: list[bytes]) -> FakeTransport:
    engine = waypoint_engine.Engine(
        NoRoutes(), NoEndpoints(), upstream.UpstreamPool(), random.Random(1)
    )
    proto = downstream.DownstreamProtocol(engine, 80)
    transport = FakeTransport()
    proto.connection_made(transport)
    for chunk in chunks:
        if transport.closed:
            break
        proto.data_received(chunk)
        await asyncio.sleep(0)  # let answered requests finish
    for _ in range(3):
        await asyncio.sleep(0)
    proto.connection_lost(None)
    return transport


def _check(transport: FakeTransport) -> None:
    out = bytes(transport.written)
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:40]
    if b"HTTP/1.1 400 " in out:
        assert transport.closed  # after a framing error nothing more is read


def test_garbage_gets_400_and_the_connection_closes() -> None:
    transport = asyncio.run(_feed([b"\x16\x03\x01 hello, not http\r\n\r\n"]))
    assert bytes(transport.written).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.closed


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_get_http_answers_or_nothing(chunks: list[bytes]) -> None:
    _check(asyncio.run(_feed(chunks)))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120), st.integers(0, len(REQUEST)))
def test_a_request_followed_or_cut_by_garbage(garbage: bytes, cut: int) -> None:
    transport = asyncio.run(_feed([REQUEST, REQUEST[:cut] + garbage]))
    _check(transport)
    assert bytes(transport.written).startswith(b"HTTP/1.1 404 ")  # the first one was answered


@given(st.text(max_size=80))
def test_traceparent_parsing_never_raises_and_returns_valid_ids(value: str) -> None:
    parsed = tracing.parse_traceparent(value)
    if parsed is not None:
        trace_id, parent_id, _ = parsed
        assert len(trace_id) == 32
        assert len(parent_id) == 16
        assert int(trace_id, 16) > 0
        assert int(parent_id, 16) > 0


TABLE = routes.build_route_table(
    {
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "hosts": ["r"],
            "http": [
                {
                    "match": [
                        {"uri": {"regex": "/api/[0-9]+"}, "queryParams": {"q": {"exact": "1"}}},
                        {"headers": {"cookie": {"prefix": "user="}}, "method": {"exact": "GET"}},
                    ],
                    "rewrite": {"uri": "/"},
                    "route": [{"destination": {"host": "r"}}],
                }
            ],
        },
    }
)


@given(
    st.text(max_size=60),
    st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=4),
)
def test_matching_any_request_never_raises(path: str, headers: list[tuple[str, str]]) -> None:
    request = matching.Request("GET", path, "r", headers=tuple(headers))
    selected = matching.select(TABLE, request)
    if selected is not None:
        matching.rewrite_path(selected, path)
