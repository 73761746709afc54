"""Sockets inside one pod's network namespace.

ztunnel runs in the node's namespace, but every socket it uses for a pod lives in that pod's
namespace: the listeners (so the pod's iptables REDIRECT reaches them), and the upstream sockets
(so outbound traffic leaves with the pod's own IP). A socket keeps its namespace for life, so only
creation happens inside the pod's namespace: the event loop thread steps in and back out around
`socket()` (`netns.call_in`, microseconds; a worker thread per pod cost a thread hop, ~0.12 ms
and two loop wake-ups, on every new connection), and serves the socket from then on.

Upstream sockets are made `SPARE_SOCKETS` at a time in one such trip, and handed out one per
connect: the trip (two setns) costs about as much as making four sockets. Only creation depends
on the thread's namespace; the options, the transparent bind and the connect act on the
socket's own namespace, wherever the thread is. The spares are plain unbound sockets, at most
`SPARE_SOCKETS` per address family, and are closed with the network.

Every socket carries SO_MARK 0x539, which the in-pod rules exempt from redirection (spec 3.1).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import TypeVar

from meshcore import netns
from meshcore.aio import sockets

T = TypeVar("T")

SO_MARK = 36
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24
INPOD_MARK = 0x539
SPARE_SOCKETS = 8  # upstream sockets made per trip into the pod's namespace
# ztunnel's in-pod listeners (spec 3.1).
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
LISTENER_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT})


class PodNetwork:
    def __init__(self, netns_fd: int, name: str) -> None:
        self._fd = os.dup(netns_fd)
        self.name = name
        self.inode = netns.inode(netns_fd)
        # Unused upstream sockets made in the pod, by address family (popped from the end).
        self._spares: dict[int, list[socket.socket]] = {}

    def listen(
        self, port: int, host: str = "0.0.0.0", backlog: int = 4096, *, transparent: bool = False
    ) -> socket.socket:
        """A listening socket on `port` in the pod. SO_REUSEPORT lets an old and a new ztunnel
        (or several workers) listen side by side. `transparent` (IP_TRANSPARENT) lets it accept
        connections for addresses that are not the pod's, as eBPF mode hands them over."""

        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INPOD_MARK)
                if transparent:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
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
        source_port: int | None = None,
    ) -> socket.socket:
        """A connected, non-blocking TCP socket from inside the pod.

        With `source_ip` the socket binds transparently to that address first, so the peer
        sees the original client (the in-pod connmark rules route the replies back to us).
        With `source_port` too, it takes the client's own port when no socket in the pod holds
        it (the usual case: the client's kernel keeps its ports apart); otherwise the kernel
        picks one at connect time. Letting the kernel pick for every connection costs a scan
        of the port range past this client's TIME_WAIT connections (`__inet_hash_connect`),
        which took milliseconds per connection once a client had made ~6,000 in a minute.
        """
        sock = self._upstream_socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            if source_ip is not None:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                if not source_port or not _bind_if_free(sock, source_ip, source_port):
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source_ip, 0))
            if not sockets.start_connect(sock, address):
                async with asyncio.timeout(timeout):
                    await sockets.finish_connect(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _upstream_socket(self, family: int) -> socket.socket:
        spares = self._spares.get(family)
        if not spares:
            spares = self._make(lambda: _new_upstream_sockets(family, SPARE_SOCKETS))
            self._spares[family] = spares
        return spares.pop()

    def _make(self, make: Callable[[], T]) -> T:
        if self._fd < 0:
            raise RuntimeError(f"the network of pod {self.name} is closed")
        return netns.call_in(self._fd, make)

    def close(self) -> None:
        for spares in self._spares.values():
            for sock in spares:
                sock.close()
        self._spares.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _bind_if_free(sock: socket.socket, ip: str, port: int) -> bool:
    """Bind to (ip, port) unless a socket in the namespace holds that port (even in
    TIME_WAIT, since SO_REUSEADDR is off): then the 4-tuple is new and connect() cannot
    collide. False, socket still unbound, when the port is taken."""
    try:
        sock.bind((ip, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        return False
    return True


def _new_upstream_sockets(family: int, count: int) -> list[socket.socket]:
    """Up to `count` upstream sockets, made in the calling thread's namespace: fewer when the
    process runs out of descriptors part way, an OSError when not even one can be made."""
    made: list[socket.socket] = []
    for _ in range(count):
        try:
            made.append(_new_upstream_socket(family))
        except OSError:
            if not made:
                raise
            break
    return made


def _new_upstream_socket(family: int) -> socket.socket:
    """A non-blocking TCP socket with the in-pod mark and no Nagle delay."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INPOD_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the app meant to connect.

    iptables mode: the nat REDIRECT's record, IPv4 SO_ORIGINAL_DST. eBPF mode has no conntrack,
    so no record (ENOENT): the programs hand the connection over as TPROXY does, and the
    accepted socket's own address is the original destination. That address is one of our own
    listeners only when something connected to it directly, which names no destination.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        ip, port = sock.getsockname()[:2]
        if port in LISTENER_PORTS:
            raise OSError(
                errno.ENOENT, f"no original destination: the connection was made to {ip}:{port}"
            ) from None
        return (ip, port)
    return (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
