"""`netns.call_in`: the calling thread steps into a namespace for one call and always comes back."""

from __future__ import annotations

import os
import socket

import pytest

from meshcore import netns
from tests.netns.netns_util import Namespaces


def _thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_socket_made_inside_lives_in_that_namespace(namespaces: Namespaces) -> None:
    pod = namespaces.add("pod")
    pod.exec("ip", "addr", "add", "10.251.0.7/32", "dev", "lo")
    home = _thread_netns_inode()
    fd = netns.open_netns(pod.path)
    try:

        def make() -> tuple[socket.socket, int]:
            sock = socket.socket()
            # 10.251.0.7 exists only in the pod: binding proves where the socket lives.
            sock.bind(("10.251.0.7", 0))
            return sock, _thread_netns_inode()

        sock, inside = netns.call_in(fd, make)
        with sock:
            assert inside == netns.inode(fd) != home
            assert _thread_netns_inode() == home
            # Back home, the same address is not ours: a new socket cannot bind it.
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("10.251.0.7", 0))
    finally:
        os.close(fd)


def test_thread_returns_home_when_the_call_fails(namespaces: Namespaces) -> None:
    pod = namespaces.add("pod")
    home = _thread_netns_inode()
    fd = netns.open_netns(pod.path)
    try:

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            netns.call_in(fd, fail)
        assert _thread_netns_inode() == home
    finally:
        os.close(fd)


def test_entering_a_closed_fd_is_a_clear_error() -> None:
    home = _thread_netns_inode()
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(netns.NetnsError, match="setns"):
            netns.call_in(r, socket.socket)  # a pipe is not a namespace
    finally:
        os.close(r)
    assert _thread_netns_inode() == home
