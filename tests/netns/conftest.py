"""Shared fixtures for the netns tests: a unique prefix per test and guaranteed cleanup."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.netns import netns_util
from tests.netns.redirect_util import PEER_IP, POD_IP, PodAndPeer


@pytest.fixture
def netns_prefix(request: pytest.FixtureRequest) -> str:
    return netns_util.unique_prefix(request.node.name)


@pytest.fixture
def namespaces(netns_prefix: str) -> Iterator[netns_util.Namespaces]:
    """Namespaces and links for one test; all removed afterwards, also when the test fails."""
    topology = netns_util.Namespaces(netns_prefix)
    try:
        yield topology
    finally:
        topology.cleanup()


@pytest.fixture
def pod_and_peer(namespaces: netns_util.Namespaces) -> PodAndPeer:
    """A pod namespace (eth0, POD_IP) on a veth to a peer namespace (eth0, PEER_IP)."""
    pod = namespaces.add("pod")
    peer = namespaces.add("peer")
    namespaces.veth(pod, "eth0", f"{POD_IP}/24", peer, "eth0", f"{PEER_IP}/24")
    return pod, peer


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Every socket a test registers here is closed at the end."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()
