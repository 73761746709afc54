"""In-pod redirection in real namespaces: a pod netns with a veth to a peer netns (spec 3.2)."""

from __future__ import annotations

import socket

import pytest

from cni.redirect import iptables, redirector
from meshcore import netns
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

pytestmark = pytest.mark.netns


def test_install_captures_traffic_and_remove_restores_it(
    pod_and_peer: PodAndPeer, sockets: list[socket.socket]
) -> None:
    pod, peer = pod_and_peer
    redirect = redirector.Redirector()
    assert not redirect.is_installed(pod.path)

    redirect.install(pod.path, iptables.RedirectOptions())

    assert redirect.is_installed(pod.path)
    saved = saved_rules(pod)
    for line in (
        ":ISTIO_PRERT",
        ":ISTIO_OUTPUT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A PREROUTING -j ISTIO_PRERT",
        "-j REDIRECT --to-ports 15001",
        "-j REDIRECT --to-ports 15006",
    ):
        assert line in saved
    assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in netns_util.ip(
        "-n", pod.name, "rule", "show"
    )
    assert "local default dev lo" in netns_util.ip("-n", pod.name, "route", "show", "table", "100")
    assert routing(pod) == (True, True)

    outbound = netns_util.tcp_listener(pod, 15001)
    inbound_plain = netns_util.tcp_listener(pod, 15006)
    inbound_hbone = netns_util.tcp_listener(pod, 15008)
    own_app = netns_util.tcp_listener(pod, 9090)
    upstream = netns_util.tcp_listener(peer, APP_PORT)
    sockets += [outbound, inbound_plain, inbound_hbone, own_app, upstream]

    # App egress is redirected to 15001 and SO_ORIGINAL_DST names the real destination.
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    captured = netns_util.accept(outbound)
    sockets.append(captured)
    assert netns_util.original_dst(captured) == (PEER_IP, APP_PORT)
    assert captured.getpeername()[0] == POD_IP
    assert not netns_util.has_pending(upstream)

    # ztunnel's own sockets (SO_MARK 0x539) are not redirected: they reach the peer.
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT, mark=iptables.INPOD_MARK))
    direct = netns_util.accept(upstream)
    sockets.append(direct)
    assert direct.getpeername()[0] == POD_IP
    assert not netns_util.has_pending(outbound)

    # Inbound plaintext to an app port lands on 15006 ...
    sockets.append(netns_util.tcp_connect(peer, POD_IP, APP_PORT))
    inbound = netns_util.accept(inbound_plain)
    sockets.append(inbound)
    assert netns_util.original_dst(inbound) == (POD_IP, APP_PORT)
    assert inbound.getpeername()[0] == PEER_IP
    # ... but HBONE on 15008 reaches 15008 directly.
    sockets.append(netns_util.tcp_connect(peer, POD_IP, 15008))
    sockets.append(netns_util.accept(inbound_hbone))
    assert not netns_util.has_pending(inbound_plain)

    # A pod calling its own IP, or localhost, is not captured.
    sockets.append(netns_util.tcp_connect(pod, POD_IP, 9090))
    sockets.append(netns_util.tcp_connect(pod, "127.0.0.1", 9090))
    sockets += [netns_util.accept(own_app), netns_util.accept(own_app)]
    assert not netns_util.has_pending(outbound)

    redirect.remove(pod.path)

    assert_clean(pod)
    assert not redirect.is_installed(pod.path)
    sockets.append(netns_util.tcp_connect(pod, PEER_IP, APP_PORT))
    sockets.append(netns_util.accept(upstream))
    assert not netns_util.has_pending(outbound)
    # Inbound is no longer redirected: nothing listens on the app port itself.
    with pytest.raises(ConnectionRefusedError):
        netns_util.tcp_connect(peer, POD_IP, APP_PORT)
    assert not netns_util.has_pending(inbound_plain)


def test_reinstall_is_idempotent_and_follows_the_options(pod_and_peer: PodAndPeer) -> None:
    pod, _ = pod_and_peer
    redirect = redirector.Redirector()
    redirect.install(pod.path, iptables.RedirectOptions())
    redirect.install(pod.path, iptables.RedirectOptions(dns_capture=True))
    saved = saved_rules(pod)
    # One jump per hook in each of raw, mangle and nat, never duplicates.
    assert saved.count("-A OUTPUT -j ISTIO_OUTPUT") == 3
    assert saved.count("-A PREROUTING -j ISTIO_PRERT") == 3
    assert "--to-ports 15053" in saved
    assert "-j CT --zone 1" in saved

    redirect.install(pod.path, iptables.RedirectOptions())
    saved = saved_rules(pod)
    assert saved.count("-A OUTPUT -j ISTIO_OUTPUT") == 2
    assert "15053" not in saved
    assert "CT --zone" not in saved
    assert redirect.is_installed(pod.path)

    redirect.remove(pod.path)
    redirect.remove(pod.path)  # removing twice is fine
    assert_clean(pod)


def test_iptables_failure_before_commit_leaves_nothing_behind(
    pod_and_peer: PodAndPeer,
) -> None:
    pod, _ = pod_and_peer
    broken = redirector.Redirector(
        tools=redirector.IptablesTools(restore=("iptables-restore", "--no-such-option"))
    )
    with pytest.raises(redirector.RedirectError, match="no-such-option"):
        broken.install(pod.path, iptables.RedirectOptions())
    assert_clean(pod)


# Applies its input for real, then fails if it was an install (it contains rules to append):
# what a failure in a late table looks like after earlier tables were committed.
FAIL_AFTER_COMMIT = (
    "sh",
    "-c",
    'input=$(cat); printf "%s\\n" "$input" | iptables-restore "$@" || exit $?; '
    'case "$input" in *"-A "*) echo "simulated failure after commit" >&2; exit 3;; esac',
    "iptables-restore",
)


def test_iptables_failure_after_a_partial_commit_is_undone(
    pod_and_peer: PodAndPeer,
) -> None:
    pod, _ = pod_and_peer
    flaky = redirector.Redirector(tools=redirector.IptablesTools(restore=FAIL_AFTER_COMMIT))
    with pytest.raises(redirector.RedirectError, match="simulated failure after commit"):
        flaky.install(pod.path, iptables.RedirectOptions(dns_capture=True))
    assert_clean(pod)


def test_remove_is_fine_on_uncaptured_pods_and_vanished_namespaces(
    pod_and_peer: PodAndPeer, netns_prefix: str
) -> None:
    pod, _ = pod_and_peer
    redirect = redirector.Redirector()
    redirect.remove(pod.path)
    assert_clean(pod)
    redirect.remove(netns.path_for(f"{netns_prefix}-never-created"))
    with pytest.raises(redirector.RedirectError, match="never-created"):
        redirect.install(
            netns.path_for(f"{netns_prefix}-never-created"), iptables.RedirectOptions()
        )


def test_state_of_a_missing_namespace_is_an_error(netns_prefix: str) -> None:
    with pytest.raises(redirector.RedirectError, match="missing"):
        redirector.Redirector().is_installed(netns.path_for(f"{netns_prefix}-missing"))
