"""Connecting a non-blocking socket on the running loop without a resolver round trip.

uvloop's `loop.sock_connect` passes the address through `getaddrinfo` with no socket type, which
its numeric fast path does not cover, so every call goes to libuv's thread pool and back (a
futex wake-up and two loop iterations per connection, measured as a quarter of a passthrough
connection's CPU). The address here is always numeric: connect directly and wait for
writability, as the kernel's non-blocking connect protocol describes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect non-blocking `sock` to numeric `address`; raises OSError as `connect(2)` does."""
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
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
