"""Sockets inside one pod's network namespace.

ztunnel runs in the node's namespace, but every socket it uses for a pod lives in that pod's
namespace: the listeners (so the pod's iptables REDIRECT reaches them), and the upstream sockets
(so outbound traffic leaves with the pod's own IP). A socket keeps its namespace for life, so only
creation happens inside the pod's namespace: the event loop thread steps in and back out around
`socket()` (`netns.call_in`, microseconds; a worker thread per pod cost a thread hop, ~0.12 ms
and two loop wake-ups, on every new connection), and serves the socket from then on.

Every socket carries SO_MARK 0x539, which the in-pod rules exempt from redirection (spec 3.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

from meshcore import netns
from meshcore.aio import sockets

SO_MARK = 36
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
INPOD_MARK = 0x539


class PodNetwork:
    def __init__(self, netns_fd: int, name: str) -> None:
        self._fd = os.dup(netns_fd)
        self.name = name
        self.inode = netns.inode(netns_fd)

    def listen(self, port: int, host: str = "0.0.0.0", backlog: int = 4096) -> socket.socket:
        """A listening socket on `port` in the pod. SO_REUSEPORT lets an old and a new ztunnel
        (or several workers) listen side by side."""

        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INPOD_MARK)
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        return self._make(make)

    async def connect(
        self,
        address: tuple[str, int],
        *,
        timeout: float,
        source_ip: str | None = None,
    ) -> socket.socket:
        """A connected, non-blocking TCP socket from inside the pod.

        With `source_ip` the socket binds transparently to that address first, so the peer
        sees the original client (the in-pod connmark rules route the replies back to us).
        """
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INPOD_MARK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if source_ip is not None:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    sock.bind((source_ip, 0))
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        sock = self._make(make)
        try:
            async with asyncio.timeout(timeout):
                await sockets.connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _make(self, make: Callable[[], socket.socket]) -> socket.socket:
        if self._fd < 0:
            raise RuntimeError(f"the network of pod {self.name} is closed")
        return netns.call_in(self._fd, make)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the app meant to connect before the nat REDIRECT (IPv4 SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return (str(ipaddress.IPv4Address(raw[4:8])), port)
