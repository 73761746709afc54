"""What the redirection tests share: a pod netns wired to a peer netns, and checks of what our
redirection leaves in a namespace. The fixtures (`pod_and_peer`, `sockets`) are in conftest."""

from __future__ import annotations

import os

from cni.redirect import netlink
from meshcore import netns
from tests.netns import netns_util

POD_IP = "10.77.0.1"
PEER_IP = "10.77.0.2"
APP_PORT = 8080

PodAndPeer = tuple[netns_util.Netns, netns_util.Netns]


def saved_rules(ns: netns_util.Netns) -> str:
    return ns.exec("iptables-save").stdout


def routing(ns: netns_util.Netns) -> tuple[bool, bool]:
    fd = netns.open_netns(ns.path)
    try:
        return netlink.has_routing(fd)
    finally:
        os.close(fd)


def assert_clean(ns: netns_util.Netns) -> None:
    assert "ISTIO" not in saved_rules(ns)
    assert routing(ns) == (False, False)
    assert "lookup 100" not in netns_util.ip("-n", ns.name, "rule", "show")
    assert "table 100" not in netns_util.ip("-n", ns.name, "route", "show", "table", "all")
