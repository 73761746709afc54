"""The L4 mesh on a 2-node playground whose node agents capture pods with eBPF
(`meshctl up --redirect-mode ebpf`): real ztunnels, HBONE between the nodes, and no netfilter
rule inside any pod.

node1 runs the client, node2 the server, so every call crosses the fabric between the nodes.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cni.redirect import ebpf
from meshcore import bpffs
from meshcore.kube import resources
from meshctl.playground import procs, record
from tests.netns import mesh_helpers as mh
from tests.netns import netns_util
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

CANARY = "MESH-EBPF-PLAINTEXT-CANARY"

# Echoes the first line of each connection, then adds the address the connection came from.
ECHO = textwrap.dedent(
    """
    import socketserver
    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            self.wfile.write(line + self.client_address[0].encode() + b"\\n")
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Echo).serve_forever()
    """
)

# In the client pod: send a line of canaries, print what came back.
CALL = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(sys.argv[3].encode() * 1000 + b"\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    sys.stdout.write(data.decode())
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground().nodes(2).redirect_mode("ebpf")) as pg:
        yield pg


def _pinned(pod: dict[str, Any], node: str) -> dict[str, Any]:
    pod["spec"]["nodeName"] = node
    return pod


def _deploy(cluster: Playground, ns: str) -> None:
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _pinned(mh.python_pod("echo", ns, ECHO, sa="echo", port=8080), "node2"),
            mh.service("echo", ns, 80, 8080),
            _pinned(mh.sleeper_pod("client", ns, sa="client"), "node1"),
        )
    )
    for pod in ("echo", "client"):
        cluster.wait_pod_ready(ns, pod)
        mh.wait_captured(cluster, ns, pod)


def _call(cluster: Playground, ns: str) -> list[str]:
    """The echoed canaries and the address the server saw, or the client's error."""
    done = cluster.exec(
        ns, "client", [sys.executable, "-c", CALL, f"echo.{ns}", "80", CANARY], timeout=60
    )
    assert done.returncode == 0, f"client failed: {done.stderr}\n{cluster.logs('ztunnel')[-3000:]}"
    return done.stdout.splitlines()


def _pod_ip(cluster: Playground, ns: str, name: str) -> str:
    pod = cluster.get(resources.PODS, name, ns)
    return str(pod["status"]["podIP"])


def _tc_filters(cluster: Playground, ns: str, pod: str) -> str:
    return "".join(
        mh.in_pod_netns(cluster, ns, pod, ["tc", "filter", "show", "dev", dev, hook]).stdout
        for dev, hook in (("eth0", "egress"), ("eth0", "ingress"), ("lo", "ingress"))
    )


def test_cross_node_calls_are_mutual_tls_with_no_netfilter_in_the_pods(
    cluster: Playground,
) -> None:
    ns = "ebpf"
    _deploy(cluster, ns)

    for pod in ("echo", "client"):
        # Captured by our tc programs, with no netfilter rule (and so no conntrack) in the pod.
        filters = _tc_filters(cluster, ns, pod)
        for program in ("ambient_egress", "ambient_ingress", "ambient_lo_in"):
            assert f"ambient-mesh:{program}" in filters, filters
        assert mh.in_pod_netns(cluster, ns, pod, ["nft", "list", "ruleset"]).stdout.strip() == ""

    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "client.pcap")
        with mh.capture(mh.pod_netns(cluster, ns, "client"), pcap):
            echoed, seen_from = _call(cluster, ns)
        packets = mh.read_capture(pcap)
        raw = mh.file_bytes(pcap)

    assert echoed == CANARY * 1000
    # The server saw the client pod's own address: ztunnel on node2 connected as the client.
    assert seen_from == _pod_ip(cluster, ns, "client")
    # On the client pod's interface: only HBONE, never the app's port or plaintext.
    assert packets
    assert all(15008 in mh.packet_ports(p) for p in packets), packets[:5]
    assert CANARY.encode() not in raw

    # node2's ztunnel authenticated the caller's SPIFFE identity.
    inbound = mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster, "node2")
            if r["direction"] == "inbound" and r["dst.workload"] == "echo"
        ],
        what="node2's inbound access-log record",
    )
    assert inbound[-1]["src.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/client"
    assert inbound[-1]["error"] is None


def test_releasing_a_namespace_detaches_the_programs(cluster: Playground) -> None:
    ns = "ebpf-release"
    _deploy(cluster, ns)
    assert "ambient-mesh:" in _tc_filters(cluster, ns, "client")

    cluster.label_namespace(ns, {"istio.io/dataplane-mode": None})
    for pod in ("echo", "client"):
        mh.wait_released(cluster, ns, pod)
        assert "ambient-mesh:" not in _tc_filters(cluster, ns, pod)

    # Plain TCP between the pods now, to the service's port (the node's kube-proxy maps it).
    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "client.pcap")
        with mh.capture(mh.pod_netns(cluster, ns, "client"), pcap):
            echoed, seen_from = _call(cluster, ns)
        packets = mh.read_capture(pcap)
    assert echoed == CANARY * 1000
    assert seen_from == _pod_ip(cluster, ns, "client")
    assert any(80 in mh.packet_ports(p) for p in packets)
    assert not any(15008 in mh.packet_ports(p) for p in packets)


def test_a_restarted_agent_keeps_capturing(cluster: Playground) -> None:
    """The tc filters hold their programs, so capture does not depend on the agent process; a
    new agent compiles its own and captures new pods with them."""
    ns = "ebpf-restart"
    _deploy(cluster, ns)

    def agent() -> record.ProcessRecord:
        (found,) = [p for p in cluster.record.processes if p.name == "agent" and p.node == "node1"]
        return found

    old = agent()
    os.kill(old.pid, signal.SIGKILL)  # started by this test's playground
    mh.wait_until(
        lambda: agent().pid != old.pid and procs.is_record_alive(agent()),
        60,
        what="the supervisor to restart node1's agent",
    )
    assert "ambient-mesh:ambient_egress" in _tc_filters(cluster, ns, "client")
    echoed, _ = _call(cluster, ns)
    assert echoed == CANARY * 1000
    # The map of captured connections outlived the old agent: it is pinned in node1's own bpf
    # filesystem, which the supervisor mounted and the fixture's teardown checks is gone.
    pin_dir = cluster.paths.bpf_dir("node1")
    assert bpffs.is_bpffs(pin_dir)
    assert os.path.exists(os.path.join(pin_dir, ebpf.CAPTURED_SOCKETS_PIN))

    # A pod created after the restart is captured by the new agent.
    cluster.apply(mh.manifest(_pinned(mh.sleeper_pod("late", ns, sa="late"), "node1")))
    cluster.wait_pod_ready(ns, "late")
    mh.wait_captured(cluster, ns, "late")
    assert "ambient-mesh:ambient_egress" in _tc_filters(cluster, ns, "late")
    assert mh.in_pod_netns(cluster, ns, "late", ["nft", "list", "ruleset"]).stdout.strip() == ""


# From the client pod to a listener on a secondary network: send a line, print the reply.
SECONDARY_CALL = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(b"via the secondary network\\n")
        sys.stdout.write(s.recv(100).decode())
    """
)


def test_a_link_added_to_a_captured_pod_is_captured_too(
    cluster: Playground, namespaces: netns_util.Namespaces
) -> None:
    """A secondary network attached after the pod was captured (as Multus does after the
    default network's CNI chain): the agent sees the new link and attaches the programs to it,
    so the app's connections through it go to ztunnel too."""
    ns = "ebpf-links"
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _pinned(mh.sleeper_pod("client", ns, sa="client"), "node1"),
        )
    )
    cluster.wait_pod_ready(ns, "client")
    mh.wait_captured(cluster, ns, "client")

    secondary = namespaces.add("sec")  # removed by the fixture, with the veth pair
    pod = netns_util.Netns(mh.pod_netns(cluster, ns, "client"))
    namespaces.veth(pod, "net1", "10.77.0.1/24", secondary, "eth0", "10.77.0.2/24")
    mh.wait_until(
        lambda: (
            "ambient-mesh:ambient_egress"
            in mh.in_pod_netns(
                cluster, ns, "client", ["tc", "filter", "show", "dev", "net1", "egress"]
            ).stdout
        ),
        what="the agent to attach the programs to the new link",
    )

    listener = netns_util.tcp_listener(secondary, 9000)
    received: list[bytes] = []

    def serve() -> None:
        with netns_util.accept(listener, timeout=30) as served:
            received.append(served.recv(100))
            served.sendall(b"ok\n")

    server = threading.Thread(target=serve)
    server.start()
    try:
        done = cluster.exec(
            ns, "client", [sys.executable, "-c", SECONDARY_CALL, "10.77.0.2", "9000"]
        )
    finally:
        server.join(30)
        listener.close()
    assert done.returncode == 0, done.stderr
    assert (done.stdout, received) == ("ok\n", [b"via the secondary network\n"])
    # ztunnel carried it: node1's access log has the outbound connection to that address.
    outbound = mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster, "node1")
            if r["direction"] == "outbound" and r["dst.addr"] == "10.77.0.2:9000"
        ],
        what="node1's outbound access-log record",
    )
    assert outbound[-1]["src.namespace"] == ns
