"""The small HTTP server behind ztunnel's and the waypoint's metrics and readiness ports, over
real loopback sockets: nobody may hold it (timeouts, a connection cap) and HEAD is answered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from meshcore.aio import http

LIMITS = http.Limits(idle_timeout=0.3, request_timeout=0.3, max_connections=4)


async def _ok(request: http.Request) -> http.Response:
    return http.Response.text(200, f"{request.method} {request.path}\n")


@contextlib.asynccontextmanager
async def serving(limits: http.Limits = LIMITS) -> AsyncIterator[int]:
    server = await http.start_server(_ok, "127.0.0.1", 0, limits=limits)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (EOF) before the test's deadline."""
    return await asyncio.wait_for(reader.read(), 5) == b""


def test_head_gets_the_headers_and_no_body() -> None:
    async def main() -> None:
        async with serving() as port:
            reply = await _exchange(
                port, b"HEAD /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 20" in head.lower()  # the body GET would get
        assert body == b""

    asyncio.run(main())


def test_an_idle_or_unfinished_request_is_closed() -> None:
    async def main() -> None:
        async with serving() as port:
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
            slow_writer.write(b"GET /stats HTTP/1.1\r\nhost: x\r\n")  # never finished
            assert await _closed_by_server(idle_reader)
            assert await _closed_by_server(slow_reader)
            idle_writer.close()
            slow_writer.close()
            # A keep-alive connection is served, then closed once it idles.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readuntil(b"GET /a\n")).startswith(b"HTTP/1.1 200")
            assert await _closed_by_server(reader)
            writer.close()

    asyncio.run(main())


def test_past_the_cap_new_connections_are_closed_and_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = http.Limits(idle_timeout=30, request_timeout=30, max_connections=4)

    async def main() -> None:
        async with serving(limits) as port:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            for reader, writer in held:  # answered, so surely counted; kept alive
                writer.write(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
                await reader.readuntil(b"GET /held\n")
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await _closed_by_server(reader)
                writer.close()
            for _, writer in held:
                writer.close()
                await writer.wait_closed()
            reply = b""
            for _ in range(100):  # the server notices the closes as it reads them
                reply = await _exchange(
                    port, b"GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                )
                if reply:
                    break
            assert reply.startswith(b"HTTP/1.1 200")

    with caplog.at_level(logging.WARNING, logger="meshcore.http"):
        asyncio.run(main())
    refusals = [r for r in caplog.records if "too many connections" in r.getMessage()]
    assert len(refusals) == 1  # said once, not per refused connection
