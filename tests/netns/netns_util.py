"""Small generic helpers for tests that build real network namespaces.

`Namespaces` creates namespaces named `<prefix>-<name>` (the prefix is unique per test), veth
pairs between them, and root-netns links the test declares, and removes all of it in
`cleanup()`, which the `namespaces` fixture runs even when the test fails. Interfaces created
inside a namespace disappear with it; only root-netns links need explicit deletion.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from meshcore import netns

T = TypeVar("T")

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = 19
SO_ORIGINAL_DST = 80  # not exported by Python's socket module


def unique_prefix(test_name: str = "") -> str:
    """`mt<6 hex>` plus a readable part of the test name; unique across concurrent runs."""
    readable = re.sub(r"[^A-Za-z0-9]", "", test_name)[:20]
    return f"mt{secrets.token_hex(3)}" + (f"-{readable}" if readable else "")


def ip(*args: str) -> str:
    """Run `ip` and return stdout; raises with stderr in the message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> str:
        return netns.path_for(self.name)

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn` on a thread inside this namespace (sockets it creates stay in it)."""
        fd = netns.open_netns(self.path)
        try:
            return netns.run_in(fd, fn)
        finally:
            os.close(fd)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name} failed: {done.stderr.strip()}")
        return done


class Namespaces:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._netns: list[Netns] = []
        self._root_links: list[str] = []

    def add(self, name: str) -> Netns:
        ns = Netns(f"{self.prefix}-{name}")
        ip("netns", "add", ns.name)
        self._netns.append(ns)
        ip("-n", ns.name, "link", "set", "lo", "up")
        return ns

    def veth(
        self, a: Netns, a_ifname: str, a_cidr: str, b: Netns, b_ifname: str, b_cidr: str
    ) -> None:
        """A veth pair born directly inside both namespaces (no root-netns name is used)."""
        ip("link", "add", "name", a_ifname, "netns", a.name, "type", "veth",
           "peer", "name", b_ifname, "netns", b.name)  # fmt: skip
        for ns, ifname, cidr in ((a, a_ifname, a_cidr), (b, b_ifname, b_cidr)):
            ip("-n", ns.name, "addr", "add", cidr, "dev", ifname)
            ip("-n", ns.name, "link", "set", ifname, "up")

    def root_link(self, suffix: str) -> str:
        """Reserve a root-netns link name (<= 15 chars) that cleanup() will delete."""
        name = f"{self.prefix[:8]}{suffix}"[:15]
        self._root_links.append(name)
        return name

    def cleanup(self) -> None:
        errors: list[str] = []
        for link in reversed(self._root_links):
            with contextlib.suppress(RuntimeError):
                ip("link", "del", link)
        for ns in reversed(self._netns):
            try:
                ip("netns", "del", ns.name)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._netns.clear()
        self._root_links.clear()
        if errors:
            raise RuntimeError("namespace cleanup failed: " + "; ".join(errors))


def tcp_listener(
    ns: Netns, port: int, host: str = "0.0.0.0", *, transparent: bool = False
) -> socket.socket:
    """A listener inside `ns`; `transparent` (IP_TRANSPARENT) as ztunnel's 15001 has it."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(16)
        return sock

    return ns.run(make)


def tcp_connect(
    ns: Netns,
    host: str,
    port: int,
    *,
    mark: int | None = None,
    source: str | None = None,
    transparent: bool = False,
    timeout: float = 5.0,
) -> socket.socket:
    """A connected TCP socket created inside `ns`: optionally with SO_MARK (like ztunnel's),
    bound to `source` first, and IP_TRANSPARENT to bind an address not its own (as ztunnel
    connects to an app with the original client's address)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return ns.run(make)


def accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    return conn


def has_pending(listener: socket.socket) -> bool:
    """Whether a connection is waiting in the accept queue (without blocking)."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
