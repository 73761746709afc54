"""pod_network.original_dst: reading where the app meant to connect (iptables and eBPF modes)."""

from __future__ import annotations

import errno
import os
import socket
import typing

import pytest

from ztunnel.inpod import pod_network


class OriginalDstSocket:
    """What getsockopt(SO_ORIGINAL_DST) returns: a struct sockaddr_in."""

    def __init__(self, ip: str, port: int) -> None:
        self.raw = (
            socket.AF_INET.to_bytes(2, "little")
            + port.to_bytes(2, "big")
            + socket.inet_aton(ip)
            + bytes(8)
        )

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_IP, pod_network.SO_ORIGINAL_DST, 16)
        return self.raw


@pytest.mark.parametrize(
    ("ip", "port"),
    [("10.96.0.10", 8443), ("192.168.255.1", 1), ("10.0.0.1", 65535)],
    ids=["service-vip", "port-1", "port-65535"],
)
def test_original_dst_reads_the_sockaddr(ip: str, port: int) -> None:
    sock = typing.cast(socket.socket, OriginalDstSocket(ip, port))
    assert pod_network.original_dst(sock) == (ip, port)


class HandedOverSocket:
    """eBPF mode: no conntrack record, and the socket's own address is the destination."""

    def __init__(self, ip: str, port: int, errno_: int = errno.ENOENT) -> None:
        self.address = (ip, port)
        self.errno = errno_

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        raise OSError(self.errno, os.strerror(self.errno))

    def getsockname(self) -> tuple[str, int]:
        return self.address


def test_without_a_conntrack_record_the_socket_address_is_the_destination() -> None:
    sock = typing.cast(socket.socket, HandedOverSocket("10.96.0.10", 8443))
    assert pod_network.original_dst(sock) == ("10.96.0.10", 8443)


@pytest.mark.parametrize("port", sorted(pod_network.LISTENER_PORTS))
def test_a_connection_made_to_a_listener_itself_names_no_destination(port: int) -> None:
    sock = typing.cast(socket.socket, HandedOverSocket("10.244.0.5", port))
    with pytest.raises(OSError, match=f"no original destination: .* to 10.244.0.5:{port}"):
        pod_network.original_dst(sock)


def test_other_getsockopt_errors_are_not_hidden() -> None:
    sock = typing.cast(socket.socket, HandedOverSocket("10.96.0.10", 80, errno.EBADF))
    with pytest.raises(OSError) as caught:
        pod_network.original_dst(sock)
    assert caught.value.errno == errno.EBADF
