"""The playground network for real: namespaces, the fabric bridge, veths, routes, host access,
and a teardown that leaves nothing behind (also from the record alone, after a crash)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from meshcore import netns
from meshctl.playground import netcmd, record, topology

pytestmark = pytest.mark.netns


def new_prefix() -> tuple[str, str]:
    token = secrets.token_hex(3)
    return f"mt{token}", f"/tmp/mt-{token}"


@pytest.fixture
def make_topology() -> Iterator[Callable[..., topology.Topology]]:
    """Topologies with per-test prefixes; all torn down (and checked) even if the test fails."""
    made: list[topology.Topology] = []

    def make(*, host_access: bool = False) -> topology.Topology:
        prefix, state_dir = new_prefix()
        topo = topology.Topology(prefix=prefix, state_dir=state_dir, host_access=host_access)
        made.append(topo)
        return topo

    yield make
    for topo in made:
        report = topology.teardown_topology(None, topo.prefix)
        shutil.rmtree(topo.state_dir, ignore_errors=True)
        assert report.is_clean, report.describe_leftovers()


def add_pod(node: record.NodeRecord, name: str, host: int) -> tuple[str, str]:
    """A pod-like namespace on a test bridge inside `node` (what the CNI bridge plugin does)."""
    prefix = node.netns.rsplit("-", 1)[0]
    pod_ns = f"{prefix}-p-{name}"
    base = node.pod_cidr.rsplit(".", 1)[0]
    netcmd.ip("netns", "add", pod_ns)
    if "tbr0" not in netcmd.ip("link", "show", netns=node.netns):
        netcmd.ip("link", "add", "tbr0", "type", "bridge", netns=node.netns)
        netcmd.ip("addr", "add", f"{base}.1/24", "dev", "tbr0", netns=node.netns)
        netcmd.ip("link", "set", "tbr0", "up", netns=node.netns)
    veth = f"v{name}"
    netcmd.ip(
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
        netns=node.netns,
    )  # fmt: skip
    netcmd.ip("link", "set", veth, "master", "tbr0", "up", netns=node.netns)
    netcmd.ip("addr", "add", f"{base}.{host}/24", "dev", "eth0", netns=pod_ns)
    netcmd.ip("link", "set", "eth0", "up", netns=pod_ns)
    netcmd.ip("link", "set", "lo", "up", netns=pod_ns)
    netcmd.ip("route", "add", "default", "via", f"{base}.1", netns=pod_ns)
    return pod_ns, f"{base}.{host}"


def run_in(name: str, fn: Callable[[], object]) -> object:
    fd = netns.open_netns(netns.path_for(name))
    try:
        return netns.run_in(fd, fn)
    finally:
        os.close(fd)


def tcp_roundtrip(client_ns: str, server_ns: str, server_ip: str) -> bytes:
    """Connect from `client_ns` to a listener in `server_ns`; what the server echoed."""

    def listen() -> socket.socket:
        s = socket.socket()
        s.bind((server_ip, 0))
        s.listen(1)
        return s

    listener = run_in(server_ns, listen)
    assert isinstance(listener, socket.socket)
    port = listener.getsockname()[1]

    def connect() -> socket.socket:
        return socket.create_connection((server_ip, port), timeout=5)

    try:
        client = run_in(client_ns, connect)
        assert isinstance(client, socket.socket)
        listener.settimeout(5)
        conn, peer = listener.accept()
        with client, conn:
            client.sendall(b"ping")
            conn.sendall(conn.recv(4) + f" from {peer[0]}".encode())
            return client.recv(100)
    finally:
        listener.close()


def read_sysctl(name: str, key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    result = run_in(name, read)
    assert isinstance(result, str)
    return result


def test_one_node(make_topology: Callable[..., topology.Topology]) -> None:
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        root_forwarding = f.read()
    topo = make_topology().node("node1")
    rec = topo.build()
    (node,) = rec.nodes
    assert node.netns == f"{topo.prefix}-node1"
    assert node.address == "172.30.0.10"
    assert node.pod_cidr == "10.244.0.0/24"
    assert topology.netns_exists(rec.fabric_netns)
    assert topology.netns_exists(node.netns)
    assert "inet 172.30.0.10/24" in netcmd.ip("addr", "show", "dev", "eth0", netns=node.netns)
    assert read_sysctl(node.netns, "net.ipv4.ip_forward") == "1"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == root_forwarding, "the root namespace's sysctls are never touched"
    stored = record.RecordFile(topo.state_dir).load()
    assert stored is not None
    assert stored.topology == rec

    report = topo.teardown()
    assert report.is_clean
    assert set(report.removed_netns) == {rec.fabric_netns, node.netns}
    assert topology.find_netns_with_prefix(topo.prefix) == []
    # Idempotent.
    assert topo.teardown().removed_netns == ()


def test_pods_on_two_nodes_reach_each_other_over_the_fabric(
    make_topology: Callable[..., topology.Topology],
) -> None:
    topo = make_topology().node("node1").node("node2")
    rec = topo.build()
    node1, node2 = rec.nodes
    assert node2.address == "172.30.0.11"
    assert node2.pod_cidr == "10.244.1.0/24"
    routes = netcmd.ip("route", "show", netns=node1.netns)
    assert "10.244.1.0/24 via 172.30.0.11 dev eth0" in routes
    pod_a, ip_a = add_pod(node1, "a", 5)
    pod_b, ip_b = add_pod(node2, "b", 6)
    ping = subprocess.run(
        ["ip", "netns", "exec", pod_a, "ping", "-c1", "-W2", ip_b], capture_output=True, check=False
    )
    assert ping.returncode == 0, ping.stdout
    # TCP across nodes, and the source address survives (routed, not NATed).
    assert tcp_roundtrip(pod_a, pod_b, ip_b) == f"ping from {ip_a}".encode()
    # Teardown removes pod namespaces too (found by prefix).
    report = topo.teardown()
    assert {pod_a, pod_b} <= set(report.removed_netns)
    assert report.is_clean


def test_nodes_added_after_build_get_routes_both_ways(
    make_topology: Callable[..., topology.Topology],
) -> None:
    topo = make_topology().node("node1")
    topo.build()
    rec = topo.node("node2").build()
    node1, node2 = rec.nodes
    assert "10.244.1.0/24 via 172.30.0.11" in netcmd.ip("route", netns=node1.netns)
    assert "10.244.0.0/24 via 172.30.0.10" in netcmd.ip("route", netns=node2.netns)


def test_host_access_and_subnet_choice_avoid_overlaps(
    make_topology: Callable[..., topology.Topology],
) -> None:
    first = make_topology(host_access=True).node("node1")
    rec1 = first.build()
    assert rec1.host_link == f"{first.prefix}-host"
    assert rec1.host_link in topology.find_root_links()
    # The root namespace now routes rec1's subnet: a second playground must pick another one.
    second = make_topology(host_access=True).node("node1")
    rec2 = second.build()
    assert rec2.subnet != rec1.subnet
    for rec in (rec1, rec2):
        node = rec.nodes[0]

        def listen(ip: str = node.address) -> socket.socket:
            s = socket.socket()
            s.bind((ip, 0))
            s.listen(1)
            return s

        listener = run_in(node.netns, listen)
        assert isinstance(listener, socket.socket)
        with listener, socket.create_connection(listener.getsockname(), timeout=5) as client:
            listener.settimeout(5)
            conn, peer = listener.accept()
            conn.close()
            # The host reaches the node from its own fabric address (.1 of the subnet).
            assert rec.host_address is not None
            assert peer[0] == rec.host_address.split("/")[0]
            assert client.getpeername()[0] == node.address
    first.teardown()
    assert rec1.host_link not in topology.find_root_links()
    assert rec2.host_link in topology.find_root_links(), "the other playground is untouched"


def test_two_topologies_with_different_prefixes_coexist(
    make_topology: Callable[..., topology.Topology],
) -> None:
    a = make_topology().node("node1")
    b = make_topology().node("node1")
    rec_a, rec_b = a.build(), b.build()
    # Same addresses, separate fabrics: each node reaches only its own fabric peers.
    assert rec_a.nodes[0].address == rec_b.nodes[0].address
    a.teardown()
    assert topology.netns_exists(rec_b.nodes[0].netns)
    assert topology.find_netns_with_prefix(a.prefix) == []
    assert "172.30.0.10/24" in netcmd.ip("addr", "show", "dev", "eth0", netns=rec_b.nodes[0].netns)


def test_same_prefix_twice_is_refused_without_touching_the_first(
    make_topology: Callable[..., topology.Topology],
) -> None:
    first = make_topology().node("node1")
    rec = first.build()
    clash = topology.Topology(prefix=first.prefix, state_dir=first.state_dir + "-2").node("node1")
    try:
        with pytest.raises(topology.TopologyError, match="already exists"):
            clash.build()
        assert topology.netns_exists(rec.fabric_netns)
        assert topology.netns_exists(rec.nodes[0].netns)
    finally:
        shutil.rmtree(first.state_dir + "-2", ignore_errors=True)


CRASHING_BUILDER = """
import os, sys
from meshctl.playground import topology
topo = topology.Topology(prefix=sys.argv[1], state_dir=sys.argv[2], host_access=True)
topo.nodes(2).build()
print("built", flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_teardown_from_the_record_alone_after_a_crash(
    make_topology: Callable[..., topology.Topology],
) -> None:
    prefix, state_dir = new_prefix()
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_BUILDER, prefix, state_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"built\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        stored = record.RecordFile(state_dir).load()
        assert stored is not None
        assert stored.topology is not None
        assert len(topology.find_netns_with_prefix(prefix)) == 3
        assert f"{prefix}-host" in topology.find_root_links()
        report = topology.teardown_from_state(state_dir)
        assert report.is_clean
        assert sorted(report.removed_netns) == sorted(stored.topology.netns)
        assert report.removed_links == (f"{prefix}-host",)
        assert topology.find_netns_with_prefix(prefix) == []
        assert f"{prefix}-host" not in topology.find_root_links()
    finally:
        topology.teardown_topology(None, prefix)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_teardown_reports_processes_still_inside(
    make_topology: Callable[..., topology.Topology],
) -> None:
    topo = make_topology().node("node1")
    rec = topo.build()
    sleeper = subprocess.Popen(["ip", "netns", "exec", rec.nodes[0].netns, "sleep", "60"])
    try:
        # Popen returns before `ip netns exec` has entered the namespace: wait until it has.
        target = os.stat(f"/var/run/netns/{rec.nodes[0].netns}").st_ino
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != target:
            assert time.monotonic() < deadline, "the process never entered the node namespace"
            time.sleep(0.01)
        report = topology.teardown_topology(rec, topo.prefix, timeout=0.5)
        assert sleeper.pid in report.lingering_pids
        assert not report.is_clean
    finally:
        sleeper.kill()
        sleeper.wait()
    final = topology.teardown_topology(rec, topo.prefix)
    assert final.is_clean
