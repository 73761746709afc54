"""pod_network.original_dst: reading where the app meant to connect."""

from __future__ import annotations

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
