"""The byte relay on both event loops: early data, half-close, backpressure, abort."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from meshcore.aio import relay

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return LOOPS[request.param]


async def _accepted_end(
    host: str = "127.0.0.1",
) -> tuple[asyncio.Server, int, asyncio.Future[relay.TcpEnd]]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[relay.TcpEnd] = loop.create_future()

    def factory() -> relay.TcpEnd:
        end = relay.TcpEnd()
        if not accepted.done():
            accepted.set_result(end)
        return end

    server = await loop.create_server(factory, host, 0)
    return server, server.sockets[0].getsockname()[1], accepted


def test_data_sent_before_the_relay_starts_is_not_lost(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """A client that speaks first (like curl) must not lose its request while we plan."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        front, front_port, accepted = await _accepted_end()
        received: asyncio.Future[bytes] = loop.create_future()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read())
            writer.write(b"answer")
            writer.write_eof()
            writer.close()

        back = await asyncio.start_server(backend, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        writer.write_eof()
        down = await accepted
        # Give the loop several turns to (wrongly) deliver the request before the relay exists.
        for _ in range(5):
            await asyncio.sleep(0)
        _, up = await loop.create_connection(
            relay.TcpEnd, "127.0.0.1", back.sockets[0].getsockname()[1]
        )
        link = relay.Relay()
        link.start(down, up)
        assert await asyncio.wait_for(received, 5) == b"GET / HTTP/1.1\r\n\r\n"
        assert await reader.read() == b"answer"
        await asyncio.wait_for(link.done, 5)
        assert link.error is None
        assert link.received == [18, 6]
        writer.close()
        front.close()
        back.close()

    run(main())


def test_backpressure_moves_a_large_stream_intact(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        front, front_port, accepted = await _accepted_end()
        digest: asyncio.Future[str] = loop.create_future()
        size = 32 << 20

        async def slow_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            h = hashlib.sha256()
            while chunk := await reader.read(4096):  # a slow reader forces pauses upstream
                h.update(chunk)
            digest.set_result(h.hexdigest())
            writer.close()

        back = await asyncio.start_server(slow_backend, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        down = await accepted
        _, up = await loop.create_connection(
            relay.TcpEnd, "127.0.0.1", back.sockets[0].getsockname()[1]
        )
        link = relay.Relay()
        link.start(down, up)
        payload = hashlib.sha256(b"x").digest() * (size // 32)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(digest, 60) == hashlib.sha256(payload).hexdigest()
        await reader.read()
        await asyncio.wait_for(link.done, 5)
        assert link.received[0] == size
        writer.close()
        front.close()
        back.close()

    run(main())


def test_abort_closes_both_sides(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        front, front_port, accepted = await _accepted_end()
        back_closed: asyncio.Future[bytes] = loop.create_future()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                back_closed.set_result(await reader.read())
            except ConnectionError:
                back_closed.set_result(b"")
            writer.close()

        back = await asyncio.start_server(backend, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        down = await accepted
        _, up = await loop.create_connection(
            relay.TcpEnd, "127.0.0.1", back.sockets[0].getsockname()[1]
        )
        link = relay.Relay()
        link.start(down, up)
        link.abort("policy now denies this connection")
        assert link.error == "policy now denies this connection"
        assert await asyncio.wait_for(back_closed, 5) == b""
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            data = b""
        assert data == b""  # the client side was closed (reset or EOF), never left open
        writer.close()
        front.close()
        back.close()

    run(main())
