"""`PodNetwork`: upstream sockets made in the pod's namespace, a few per trip into it."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from meshcore import netns
from tests.netns import netns_util
from tests.netns.netns_util import Namespaces
from ztunnel.inpod import pod_network

POD_IP = "10.251.0.7"  # exists only inside the pod: a socket that reaches it is the pod's
CLIENT_IP = "10.251.0.9"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _pod_network(namespaces: Namespaces) -> tuple[pod_network.PodNetwork, netns_util.Netns]:
    pod = namespaces.add("pod")
    pod.exec("ip", "addr", "add", f"{POD_IP}/32", "dev", "lo")
    pod.exec("ip", "addr", "add", f"{CLIENT_IP}/32", "dev", "lo")
    fd = netns.open_netns(pod.path)
    try:
        return pod_network.PodNetwork(fd, "pod"), pod
    finally:
        os.close(fd)


def test_every_upstream_socket_is_the_pods_and_carries_the_mark(namespaces: Namespaces) -> None:
    network, pod = _pod_network(namespaces)
    listener = netns_util.tcp_listener(pod, 8080, host=POD_IP)
    try:

        async def main() -> list[socket.socket]:
            # Past one batch of spares, so a second trip into the namespace is made too.
            return [
                await network.connect((POD_IP, 8080), timeout=5)
                for _ in range(pod_network.SPARE_SOCKETS + 2)
            ]

        socks = asyncio.run(main())
        try:
            for sock in socks:
                assert sock.getpeername() == (POD_IP, 8080)
                assert sock.getsockname()[0] == POD_IP
                assert sock.getsockopt(socket.SOL_SOCKET, netns_util.SO_MARK) == 0x539
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                assert sock.getblocking() is False
        finally:
            for sock in socks:
                sock.close()
    finally:
        listener.close()
        network.close()


def test_source_ip_is_what_the_peer_sees(namespaces: Namespaces) -> None:
    network, pod = _pod_network(namespaces)
    listener = netns_util.tcp_listener(pod, 8080, host=POD_IP)
    try:

        async def main() -> socket.socket:
            return await network.connect((POD_IP, 8080), timeout=5, source_ip=CLIENT_IP)

        sock = asyncio.run(main())
        with sock:
            accepted, peer = listener.accept()
            accepted.close()
            assert peer[0] == CLIENT_IP
    finally:
        listener.close()
        network.close()


def test_the_clients_port_is_kept_when_free_and_left_to_the_kernel_when_not(
    namespaces: Namespaces,
) -> None:
    network, pod = _pod_network(namespaces)
    listener = netns_util.tcp_listener(pod, 8080, host=POD_IP)
    try:

        async def main() -> tuple[socket.socket, socket.socket]:
            first = await network.connect(
                (POD_IP, 8080), timeout=5, source_ip=CLIENT_IP, source_port=40123
            )
            # The same client port again while the first holds it: the kernel picks another.
            second = await network.connect(
                (POD_IP, 8080), timeout=5, source_ip=CLIENT_IP, source_port=40123
            )
            return first, second

        first, second = asyncio.run(main())
        with first, second:
            peers = []
            for _ in range(2):
                accepted, peer = listener.accept()
                accepted.close()
                peers.append(peer)
            assert peers[0] == (CLIENT_IP, 40123)
            assert peers[1][0] == CLIENT_IP
            assert peers[1][1] != 40123
    finally:
        listener.close()
        network.close()


def test_a_failed_connect_closes_its_socket(namespaces: Namespaces) -> None:
    network, _pod = _pod_network(namespaces)
    try:

        async def main() -> None:
            await network.connect((POD_IP, 8080), timeout=5)  # nothing listens

        before = _open_fds()
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(main())
        # Only the spares of the first trip remain; the refused socket was closed.
        assert len(_open_fds() - before) == pod_network.SPARE_SOCKETS - 1
    finally:
        network.close()


def test_close_closes_the_spares_and_refuses_more(namespaces: Namespaces) -> None:
    before = _open_fds()
    network, pod = _pod_network(namespaces)
    listener = netns_util.tcp_listener(pod, 8080, host=POD_IP)
    try:

        async def main() -> socket.socket:
            return await network.connect((POD_IP, 8080), timeout=5)

        asyncio.run(main()).close()
    finally:
        listener.close()
        network.close()
    assert _open_fds() <= before
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())
