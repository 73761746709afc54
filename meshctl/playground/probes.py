"""Readiness probes the supervisor runs: one small HTTP GET over a Unix socket, or over TCP from
inside a network namespace (ztunnel's readiness port is only reachable from the node's netns
when the playground has no host access)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import h11

from meshcore import netns
from meshcore.aio import http
from meshctl import errors


class ProbeError(errors.MeshctlError):
    """The endpoint did not answer 200 (or at all); the message says what happened."""


async def http_get_unix(path: str, target: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET `target` from the HTTP server on Unix socket `path`."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                return await http.get(reader, writer, "localhost", target, user_agent="meshctl")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, h11.ProtocolError) as exc:
        raise ProbeError(f"GET {target} on {path}: {str(exc) or type(exc).__name__}") from exc


async def http_get_in_netns(
    netns_path: str, host: str, port: int, target: str, timeout: float = 2.0
) -> tuple[int, bytes]:
    """GET http://host:port/target with a socket created inside `netns_path`."""

    def make_socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    fd = netns.open_netns(netns_path)
    try:
        sock = await asyncio.to_thread(netns.run_in, fd, make_socket)
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                return await http.get(
                    reader, writer, f"{host}:{port}", target, user_agent="meshctl"
                )
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, h11.ProtocolError) as exc:
        sock.close()
        why = str(exc) or type(exc).__name__
        raise ProbeError(f"GET http://{host}:{port}{target}: {why}") from exc
