"""meshcore.aio.sockets.connect: non-blocking connect on uvloop and on asyncio's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from meshcore.aio import sockets

Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS: list[Runner] = [uvloop.run, asyncio.run]


def _client() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _full_backlog() -> Iterator[tuple[socket.socket, tuple[str, int], list[socket.socket]]]:
    """A listener whose backlog is full (listener, address, the filler clients): it holds the
    SYN of any further connect, which stays in progress."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = server.getsockname()
        fillers = [_client() for _ in range(4)]
        try:
            for f in fillers:
                f.connect_ex(address)
            yield server, address, fillers
        finally:
            for f in fillers:
                f.close()


@pytest.mark.parametrize("run", RUNNERS, ids=["uvloop", "asyncio"])
def test_connects_and_carries_bytes(run: Runner) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()

        async def main() -> None:
            with _client() as sock:
                await sockets.connect(sock, address)
                peer, _ = server.accept()
                with peer:
                    assert sock.getpeername() == address
                    await asyncio.get_running_loop().sock_sendall(sock, b"ping")
                    assert peer.recv(4) == b"ping"

        run(main())


@pytest.mark.parametrize("run", RUNNERS, ids=["uvloop", "asyncio"])
def test_refused_connect_raises_with_errno(run: Runner) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
    # Nothing listens there any more.

    async def main() -> None:
        with _client() as sock:
            with pytest.raises(ConnectionRefusedError) as info:
                await sockets.connect(sock, address)
            assert info.value.errno == errno.ECONNREFUSED

    run(main())


def test_failed_connect_stops_watching_the_socket() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            address = server.getsockname()
        with _client() as sock:
            with pytest.raises(ConnectionRefusedError):
                await sockets.connect(sock, address)
            # asyncio's loop says whether a writer was still registered.
            assert asyncio.get_running_loop().remove_writer(sock.fileno()) is False

    asyncio.run(main())


def test_cancelled_connect_stops_watching_the_socket() -> None:
    async def main() -> None:
        with _full_backlog() as (_, address, _), _client() as sock:
            task = asyncio.ensure_future(sockets.connect(sock, address))
            await asyncio.sleep(0)
            assert not task.done()  # the SYN waits: the listener's queue is full
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert asyncio.get_running_loop().remove_writer(sock.fileno()) is False

    asyncio.run(main())


def test_connect_established_within_the_call_is_done_without_waiting() -> None:
    # On loopback the handshake completes inside connect(2), which still says EINPROGRESS;
    # start_connect asks again and reports the connection as made.
    with socket.create_server(("127.0.0.1", 0)) as server, _client() as sock:
        address = server.getsockname()
        assert sockets.start_connect(sock, address) is True
        assert sock.getpeername() == address


def test_refusal_within_the_call_raises_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
    with _client() as sock, pytest.raises(ConnectionRefusedError):
        sockets.start_connect(sock, address)


def test_pending_connect_is_left_to_finish_connect() -> None:
    async def main() -> None:
        # The connect stays pending until the listener accepts.
        with _full_backlog() as (server, address, fillers), _client() as sock:
            assert sockets.start_connect(sock, address) is False
            task = asyncio.ensure_future(sockets.finish_connect(sock))
            await asyncio.sleep(0)
            assert not task.done()
            for f in fillers:
                f.close()
            server.setblocking(False)
            loop = asyncio.get_running_loop()
            accepted = []
            async with asyncio.timeout(5):
                while not task.done():
                    accepted.append((await loop.sock_accept(server))[0])
                await task
            for conn in accepted:
                conn.close()
            assert sock.getpeername() == address

    asyncio.run(main())
