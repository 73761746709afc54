"""eBPF redirection (REDIRECT_MODE=ebpf) in real namespaces: a pod netns with a veth to a peer.

The same capture as iptables mode (test_redirect.py) with no netfilter in the pod: the programs
are compiled with BCC and attached with tc, and every check below uses real sockets and packets.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import bcc
import pytest
from pyroute2 import IPRoute

from cni.redirect import ebpf, iptables, redirector
from meshcore import bpffs
from tests.netns import netns_util
from tests.netns.redirect_util import (
    APP_PORT,
    PEER_IP,
    POD_IP,
    PodAndPeer,
    assert_clean,
    routing,
    saved_rules,
)
from ztunnel.inpod import pod_network

pytestmark = pytest.mark.netns

PROBE_IP = "169.254.7.127"
OWN_APP_PORT = 9090
SHORT = 1.0  # seconds a connection attempt gets where the test expects it to go nowhere


@pytest.fixture(scope="module")
def pin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bpf filesystem of the module's own (unmounted at the end), as the node's /sys/fs/bpf."""
    mount_point = str(tmp_path_factory.mktemp("mt-bpffs"))
    bpffs.mount(mount_point)
    try:
        yield os.path.join(mount_point, "ambient-mesh")
    finally:
        bpffs.unmount(mount_point)


@pytest.fixture(scope="module")
def programs(pin_dir: str) -> ebpf.Programs:
    """Compiled once for the module, as the agent does once per node."""
    loaded = ebpf.Programs(pin_dir)
    loaded.load()
    return loaded


@pytest.fixture
def redirect(programs: ebpf.Programs) -> redirector.Redirector:
    return redirector.Redirector(mode="ebpf", programs=programs)


def echo(a: socket.socket, b: socket.socket, data: bytes) -> None:
    """`data` from a to b and back: both directions of an established connection carry."""
    a.sendall(data)
    assert receive(b, len(data)) == data
    b.sendall(data[::-1])
    assert receive(a, len(data)) == data[::-1]


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes (fewer only if the peer closes first)."""
    sock.settimeout(5)
    got = b""
    while len(got) < size and (chunk := sock.recv(size - len(got))):
        got += chunk
    return got


def accept_local(ns: netns_util.Netns) -> str:
    return ns.exec("sysctl", "-n", "net.ipv4.conf.lo.accept_local").stdout.strip()


def nft_ruleset(ns: netns_util.Netns) -> str:
    return ns.exec("nft", "list", "ruleset").stdout.strip()


def attached(redirect: redirector.Redirector, ns: netns_util.Netns) -> set[tuple[str, str, str]]:
    return {(f.ifname, f.direction, f.program) for f in redirect.find_ebpf_state(ns.path).filters}


ALL_FILTERS = {
    ("lo", "ingress", ebpf.LO_INGRESS),
    ("eth0", "egress", ebpf.EGRESS),
    ("eth0", "ingress", ebpf.INGRESS),
}


def test_captures_both_ways_with_no_netfilter_and_remove_restores_direct_traffic(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket], redirect: redirector.Redirector
) -> None:
    pod, peer = pod_and_peer
    assert not redirect.is_installed(pod.path)

    redirect.install(pod.path, iptables.RedirectOptions())

    assert redirect.is_installed(pod.path)
    assert attached(redirect, pod) == ALL_FILTERS
    # No netfilter rule at all in the pod, so no conntrack either: the point of this mode.
    assert nft_ruleset(pod) == ""
    assert "ISTIO" not in saved_rules(pod)
    assert routing(pod) == (True, True)
    assert accept_local(pod) == "1"

    outbound = netns_util.tcp_listener(pod, 15001, transparent=True)
    inbound_plain = netns_util.tcp_listener(pod, 15006)
    inbound_hbone = netns_util.tcp_listener(pod, 15008)
    own_app = netns_util.tcp_listener(pod, OWN_APP_PORT)
    upstream = netns_util.tcp_listener(peer, APP_PORT)
    sockets += [outbound, inbound_plain, inbound_hbone, own_app, upstream]

    # App egress lands on 15001; the accepted socket's own address is the real destination.
    app = netns_util.tcp_connect(pod, PEER_IP, APP_PORT)
    sockets.append(app)
    captured = netns_util.accept(outbound)
    sockets.append(captured)
    assert captured.getsockname() == (PEER_IP, APP_PORT)
    assert pod_network.original_dst(captured) == (PEER_IP, APP_PORT)
    assert captured.getpeername() == app.getsockname()
    assert app.getpeername() == (PEER_IP, APP_PORT)  # the app sees where it called
    echo(app, captured, b"through ztunnel's outbound listener" * 100)
    assert not netns_util.has_pending(upstream)

    # ztunnel's own sockets (SO_MARK 0x539) are not redirected: they reach the peer.
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT, mark=iptables.INPOD_MARK))
    direct = netns_util.accept(upstream)
    sockets.append(direct)
    assert direct.getpeername()[0] == POD_IP

    # Inbound plaintext to an app port lands on 15006 ...
    client = netns_util.tcp_connect(peer, POD_IP, APP_PORT)
    sockets.append(client)
    inbound = netns_util.accept(inbound_plain)
    sockets.append(inbound)
    assert pod_network.original_dst(inbound) == (POD_IP, APP_PORT)
    assert inbound.getpeername() == client.getsockname()
    echo(client, inbound, b"inbound plaintext" * 100)
    # ... but HBONE on 15008 reaches 15008 directly.
    sockets.append(netns_util.tcp_connect(peer, POD_IP, 15008))
    sockets.append(netns_util.accept(inbound_hbone))
    assert not netns_util.has_pending(inbound_plain)

    # ztunnel connects to the app as the original client: the app's replies (addressed to the
    # peer) come back to ztunnel's socket instead of leaving through eth0.
    spoofed = netns_util.tcp_connect(
        pod, POD_IP, OWN_APP_PORT, mark=iptables.INPOD_MARK, source=PEER_IP, transparent=True
    )
    sockets.append(spoofed)
    served = netns_util.accept(own_app)
    sockets.append(served)
    assert served.getpeername() == spoofed.getsockname()
    assert served.getpeername()[0] == PEER_IP
    echo(spoofed, served, b"as the original client" * 100)

    # A pod calling its own IP, or localhost, is not captured.
    sockets.append(netns_util.tcp_connect(pod, POD_IP, OWN_APP_PORT))
    sockets.append(netns_util.tcp_connect(pod, "127.0.0.1", OWN_APP_PORT))
    sockets += [netns_util.accept(own_app), netns_util.accept(own_app)]
    assert not netns_util.has_pending(outbound)

    redirect.remove(pod.path)

    assert_clean(pod)
    assert redirect.find_ebpf_state(pod.path).is_empty
    assert accept_local(pod) == "0"
    assert not redirect.is_installed(pod.path)
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    sockets.append(netns_util.accept(upstream))
    assert not netns_util.has_pending(outbound)
    # Inbound is no longer redirected: nothing listens on the app port itself.
    with pytest.raises(ConnectionRefusedError):
        netns_util.tcp_connect(peer, POD_IP, APP_PORT)
    assert not netns_util.has_pending(inbound_plain)


def test_without_ztunnel_listening_nothing_gets_through(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket], redirect: redirector.Redirector
) -> None:
    pod, peer = pod_and_peer
    upstream = netns_util.tcp_listener(peer, APP_PORT)
    app_listener = netns_util.tcp_listener(pod, APP_PORT)
    sockets += [upstream, app_listener]
    redirect.install(pod.path, iptables.RedirectOptions())

    # No 15001 in the pod: the app's SYNs are dropped, never sent to the peer.
    with pytest.raises(TimeoutError):
        netns_util.tcp_connect(pod, PEER_IP, APP_PORT, timeout=SHORT)
    assert not netns_util.has_pending(upstream)
    # No 15006: inbound SYNs are dropped, never handed to the app directly.
    with pytest.raises(TimeoutError):
        netns_util.tcp_connect(peer, POD_IP, APP_PORT, timeout=SHORT)
    assert not netns_util.has_pending(app_listener)


@pytest.mark.parametrize("agent_restarted", [False, True], ids=["same-agent", "agent-restarted"])
def test_a_captured_connection_whose_ztunnel_side_is_gone_stays_dark(
    pod_and_peer: PodAndPeer,
    sockets: list[socket.socket],
    redirect: redirector.Redirector,
    programs: ebpf.Programs,
    agent_restarted: bool,
) -> None:
    """What conntrack gives iptables mode: once captured, a connection never leaves the pod
    in plaintext, even after ztunnel's socket vanished without the app hearing of it; also
    when a restarted agent's programs replaced those that captured it."""
    pod, peer = pod_and_peer
    outbound = netns_util.tcp_listener(pod, 15001, transparent=True)
    upstream = netns_util.tcp_listener(peer, APP_PORT)
    sockets += [outbound, upstream]
    redirect.install(pod.path, iptables.RedirectOptions())
    app = netns_util.tcp_connect(pod, PEER_IP, APP_PORT)
    sockets.append(app)
    captured = netns_util.accept(outbound)
    if agent_restarted:
        # A new agent compiles its own programs and replaces the filters in place; they open
        # the map the first ones pinned, which remembers the app's connection.
        restarted = ebpf.Programs(programs.pin_dir)
        redirector.Redirector(mode="ebpf", programs=restarted).install(
            pod.path, iptables.RedirectOptions()
        )

    # ztunnel's socket goes with a RST that the app never sees (a filter-only nft rule drops
    # it on lo: no conntrack involved).
    pod.exec(
        "nft",
        "add table inet mt_rst; "
        "add chain inet mt_rst out { type filter hook output priority 0; }; "
        "add rule inet mt_rst out oif lo tcp flags rst drop",
    )
    captured.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    captured.close()

    # The app writes on. Sent out of eth0, the packet would reach the peer, whose kernel knows
    # no such connection and answers with a RST: the app's read would fail at once.
    app.sendall(b"secret")
    app.settimeout(SHORT)
    with pytest.raises(TimeoutError):
        app.recv(1)
    assert not netns_util.has_pending(upstream)


def test_ingress_mode_captures_only_outbound(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket], redirect: redirector.Redirector
) -> None:
    pod, peer = pod_and_peer
    outbound = netns_util.tcp_listener(pod, 15001, transparent=True)
    inbound_plain = netns_util.tcp_listener(pod, 15006)
    app_listener = netns_util.tcp_listener(pod, APP_PORT)
    sockets += [outbound, inbound_plain, app_listener]
    redirect.install(pod.path, iptables.RedirectOptions())
    redirect.install(pod.path, iptables.RedirectOptions(inbound_capture=False))

    assert attached(redirect, pod) == ALL_FILTERS - {("eth0", "ingress", ebpf.INGRESS)}
    assert redirect.is_installed(pod.path)
    # Inbound reaches the app itself, and its replies go back out (they are not captured).
    client = netns_util.tcp_connect(peer, POD_IP, APP_PORT)
    sockets.append(client)
    served = netns_util.accept(app_listener)
    sockets.append(served)
    echo(client, served, b"ingress mode" * 100)
    assert not netns_util.has_pending(inbound_plain)
    # Outbound is still captured.
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    sockets.append(netns_util.accept(outbound))


def test_kubelet_probes_reach_the_app_directly(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket], redirect: redirector.Redirector
) -> None:
    """The host SNATs probes to 169.254.7.127 (spec 3.2); they and their replies pass."""
    pod, peer = pod_and_peer
    peer.exec("ip", "addr", "add", f"{PROBE_IP}/32", "dev", "eth0")
    pod.exec("ip", "route", "add", f"{PROBE_IP}/32", "dev", "eth0")
    inbound_plain = netns_util.tcp_listener(pod, 15006)
    app_listener = netns_util.tcp_listener(pod, APP_PORT)
    sockets += [inbound_plain, app_listener]
    redirect.install(pod.path, iptables.RedirectOptions())

    prober = netns_util.tcp_connect(peer, POD_IP, APP_PORT, source=PROBE_IP)
    sockets.append(prober)
    served = netns_util.accept(app_listener)
    sockets.append(served)
    assert served.getpeername()[0] == PROBE_IP
    echo(prober, served, b"healthz")
    assert not netns_util.has_pending(inbound_plain)


def test_switching_modes_leaves_exactly_one_capture(
    pod_and_peer: PodAndPeer, programs: ebpf.Programs
) -> None:
    pod, _ = pod_and_peer
    by_rules = redirector.Redirector(mode="iptables")
    by_programs = redirector.Redirector(mode="ebpf", programs=programs)

    by_rules.install(pod.path, iptables.RedirectOptions())
    by_programs.install(pod.path, iptables.RedirectOptions())
    # Our rules are gone (iptables-nft keeps its emptied tables: harmless, though they keep
    # conntrack on in a pod captured before the switch).
    assert "ISTIO" not in saved_rules(pod)
    assert "redirect" not in nft_ruleset(pod)
    assert by_programs.is_installed(pod.path)

    by_rules.install(pod.path, iptables.RedirectOptions())
    assert by_programs.find_ebpf_state(pod.path).is_empty
    assert accept_local(pod) == "0"
    assert by_rules.is_installed(pod.path)

    by_programs.install(pod.path, iptables.RedirectOptions())
    by_rules.remove(pod.path)  # either mode's removal clears both
    assert_clean(pod)
    assert by_programs.find_ebpf_state(pod.path).is_empty


def test_reinstall_replaces_in_place(
    pod_and_peer: PodAndPeer, redirect: redirector.Redirector
) -> None:
    pod, _ = pod_and_peer
    redirect.install(pod.path, iptables.RedirectOptions())
    redirect.install(pod.path, iptables.RedirectOptions())
    filters = redirect.find_ebpf_state(pod.path).filters
    assert sorted((f.ifname, f.direction, f.program) for f in filters) == sorted(ALL_FILTERS)
    redirect.remove(pod.path)
    redirect.remove(pod.path)  # removing twice is fine
    assert_clean(pod)
    assert redirect.find_ebpf_state(pod.path).is_empty


def test_a_link_added_later_is_announced_and_a_reinstall_covers_it(
    pod_and_peer: PodAndPeer, redirect: redirector.Redirector
) -> None:
    """The agent watches each captured pod's links (the programs are attached per link) and
    reinstalls when one appears; iptables mode needs no watch, its rules cover every link."""
    pod, _ = pod_and_peer
    assert redirector.Redirector(mode="iptables").watch_links(pod.path) is None
    watch = redirect.watch_links(pod.path)
    assert watch is not None
    try:
        redirect.install(pod.path, iptables.RedirectOptions())
        assert not watch.drain()  # attaching programs announces no link

        # A veth pair inside the pod (this kernel has no dummy links); gone with the namespace.
        pod.exec("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
        readable, _, _ = select.select([watch], [], [], 10.0)
        assert readable, "no announcement of the new link"
        assert watch.drain()
        assert ("eth1", "egress", ebpf.EGRESS) not in attached(redirect, pod)
        redirect.install(pod.path, iptables.RedirectOptions())
        added = {
            (link, direction, program)
            for link in ("eth1", "eth1p")
            for direction, program in (("egress", ebpf.EGRESS), ("ingress", ebpf.INGRESS))
        }
        assert attached(redirect, pod) == ALL_FILTERS | added
    finally:
        watch.close()


def test_unsupported_options_are_refused_and_nothing_is_installed(
    pod_and_peer: PodAndPeer, redirect: redirector.Redirector
) -> None:
    pod, _ = pod_and_peer
    with pytest.raises(redirector.RedirectError, match=r"reroute-virtual-interfaces .* virt0"):
        redirect.install(pod.path, iptables.RedirectOptions(reroute_interfaces=("virt0",)))
    assert redirect.find_ebpf_state(pod.path).is_empty
    assert_clean(pod)


def test_a_pin_dir_outside_a_bpf_filesystem_is_refused(tmp_path: Path) -> None:
    """Without the pinned map a restart would drop the guard on captured connections: the
    agent refuses to start, and creates nothing on the wrong filesystem."""
    wanted = tmp_path / "ambient-mesh"
    with pytest.raises(ebpf.BpfUnavailableError, match=r"BPF_PIN_DIR=.* not on a bpf filesystem"):
        ebpf.Programs(str(wanted)).load()
    assert not wanted.exists()
    with pytest.raises(ebpf.BpfUnavailableError, match="absolute path"):
        ebpf.prepare_pin_dir("relative/dir")


def test_a_node_without_bcc_fails_at_start_naming_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # `import bcc` raises ImportError
    with pytest.raises(ebpf.BpfUnavailableError, match="python3-bpfcc"):
        redirector.Redirector(mode="ebpf").prepare()


def test_someone_elses_filters_are_left_alone(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket], redirect: redirector.Redirector
) -> None:
    """Another tool's tc program on the same hook (before ours) keeps running, and survives
    our install and removal."""
    pod, peer = pod_and_peer
    other = bcc.BPF(text=b"int other_tool(struct __sk_buff *skb) { return -1; }")  # TC_ACT_UNSPEC
    program = other.load_func(b"other_tool", bcc.BPF.SCHED_CLS)

    def add_theirs() -> None:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.tc("add", "clsact", index=index)
            ipr.tc(
                "add-filter",
                "bpf",
                index=index,
                handle=1,
                prio=1,
                parent=ebpf.EGRESS_PARENT,
                fd=program.fd,
                name="other-tool",
                classid=1,
                direct_action=True,
            )

    def egress_filters() -> str:
        return pod.exec("tc", "filter", "show", "dev", "eth0", "egress").stdout

    pod.run(add_theirs)
    redirect.install(pod.path, iptables.RedirectOptions())
    assert "other-tool" in egress_filters()
    outbound = netns_util.tcp_listener(pod, 15001, transparent=True)
    upstream = netns_util.tcp_listener(peer, APP_PORT)
    sockets += [outbound, upstream]
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    sockets.append(netns_util.accept(outbound))
    assert not netns_util.has_pending(upstream)

    redirect.remove(pod.path)
    assert "other-tool" in egress_filters()
    assert "ambient-mesh" not in egress_filters()
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    sockets.append(netns_util.accept(upstream))
