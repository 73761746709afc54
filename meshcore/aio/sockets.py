"""Connecting a non-blocking socket on the running loop without a resolver round trip.

uvloop's `loop.sock_connect` passes the address through `getaddrinfo` with no socket type, which
its numeric fast path does not cover, so every call goes to libuv's thread pool and back (a
futex wake-up and two loop iterations per connection, measured as a quarter of a passthrough
connection's CPU). The address here is always numeric: connect directly and wait for
writability, as the kernel's non-blocking connect protocol describes.

A connection to an address on the same host (the app in its pod, a local pod's ztunnel) is
usually established before `connect(2)` returns, though it still says EINPROGRESS: the SYN and
the SYN-ACK are handled within the call. Asking again (a second `connect(2)` answers 0 once
established, EALREADY while pending, or the error that ended the attempt) skips the writer
registration and a loop iteration then (`start_connect`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

_CONNECTED = frozenset({0, errno.EISCONN})
_PENDING = frozenset({errno.EALREADY, errno.EINPROGRESS})


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect non-blocking `sock` to numeric `address`; raises OSError as `connect(2)` does."""
    if not start_connect(sock, address):
        await finish_connect(sock)


def start_connect(sock: socket.socket, address: tuple[str, int]) -> bool:
    """Start connecting non-blocking `sock`: True when already connected, False when the caller
    must `finish_connect`; raises OSError as `connect(2)` does."""
    err = sock.connect_ex(address)
    if err == 0:
        return True
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
    err = sock.connect_ex(address)
    if err in _CONNECTED:
        return True
    if err not in _PENDING:
        raise OSError(err, os.strerror(err))
    return False


async def finish_connect(sock: socket.socket) -> None:
    """Wait until the connect that `start_connect` left pending is done; OSError if it failed."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err != 0:
        raise OSError(err, os.strerror(err))
