"""In-pod policy routing for ztunnel's return path (spec 3.2), through pyroute2.

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route add local 0.0.0.0/0 dev lo table 100

Replies to ztunnel's spoofed-source connections carry mark 0x111 (restored from the connmark by
the mangle rules); this rule delivers them locally to ztunnel's socket instead of routing them
out of eth0. Harmless on its own: without the iptables rules nothing carries that mark.

Every function takes an open netns fd and does its netlink work on a short-lived thread that
joined that namespace (a netlink socket binds to its creator's netns). Adding what exists and
removing what is missing are not errors.

`LinkWatch` tells when links appear in a pod: eBPF mode attaches its programs per link, so a
link added after capture (a secondary network attached later) must get them too.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.redirect import iptables
from meshcore import netns

RULE_PRIORITY = 32764


@dataclass(frozen=True)
class RoutingFamily:
    family: int
    default_dst: str


ROUTING_V4 = RoutingFamily(socket.AF_INET, "0.0.0.0/0")
# When IPv6 capture arrives: the same rule and route with "::/0" (unless lo has IPv6 disabled).
ROUTING_V6 = RoutingFamily(socket.AF_INET6, "::/0")


def _rule_args(fam: RoutingFamily) -> dict[str, int]:
    return {
        "family": fam.family,
        "fwmark": iptables.INPOD_TPROXY_MARK,
        "fwmask": iptables.INPOD_TPROXY_MASK,
        "priority": RULE_PRIORITY,
        "table": iptables.ROUTE_TABLE_INBOUND,
    }


def _route_args(ipr: IPRoute, fam: RoutingFamily) -> dict[str, object]:
    return {
        "family": fam.family,
        "dst": fam.default_dst,
        "type": "local",
        "oif": ipr.link_lookup(ifname="lo")[0],
        "table": iptables.ROUTE_TABLE_INBOUND,
        "scope": "host",
    }


class _Tolerating:
    """Netlink errors meaning "already done" become no-ops, the rest RedirectError."""

    def __init__(self, action: str, *tolerated: int) -> None:
        self._action = action
        self._tolerated = tolerated

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, NetlinkError):
            if exc.code in self._tolerated:
                return True
            raise iptables.RedirectError(f"{self._action} failed: {exc}") from exc
        return False


def add_routing(netns_fd: int, fam: RoutingFamily = ROUTING_V4) -> None:
    def work() -> None:
        with IPRoute() as ipr:
            with _Tolerating("ip rule add", errno.EEXIST):
                ipr.rule("add", **_rule_args(fam))
            with _Tolerating("ip route add", errno.EEXIST):
                ipr.route("add", **_route_args(ipr, fam))

    netns.run_in(netns_fd, work)


def remove_routing(netns_fd: int, fam: RoutingFamily = ROUTING_V4) -> None:
    def work() -> None:
        with IPRoute() as ipr:
            with _Tolerating("ip rule del", errno.ENOENT):
                ipr.rule("del", **_rule_args(fam))
            with _Tolerating("ip route del", errno.ESRCH, errno.ENOENT):
                ipr.route("del", **_route_args(ipr, fam))

    netns.run_in(netns_fd, work)


def has_routing(netns_fd: int, fam: RoutingFamily = ROUTING_V4) -> tuple[bool, bool]:
    """(rule present, route present)."""

    def work() -> tuple[bool, bool]:
        with IPRoute() as ipr:
            rule = any(
                r.get("priority") == RULE_PRIORITY
                and r.get("fwmark") == iptables.INPOD_TPROXY_MARK
                and r.get("fwmask") == iptables.INPOD_TPROXY_MASK
                and r.get("table") == iptables.ROUTE_TABLE_INBOUND
                for r in ipr.get_rules(family=fam.family)
            )
            route = any(
                r.get("type") == 2  # RTN_LOCAL
                and r.get("dst_len") == 0
                for r in ipr.get_routes(family=fam.family, table=iptables.ROUTE_TABLE_INBOUND)
            )
            return rule, route

    return netns.run_in(netns_fd, work)


RTMGRP_LINK = 1  # multicast group of link changes (linux/rtnetlink.h)
RTM_NEWLINK = 16
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_LINK_WATCH_RCVBUF = 256 << 10


class LinkWatch:
    """Link announcements (RTM_NEWLINK) from one network namespace: a link that was added,
    moved in or changed. The socket is non-blocking; poll `fileno()`, then `drain()`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls, netns_fd: int) -> LinkWatch:
        """Subscribe inside the namespace (a netlink socket belongs to its creator's netns)."""

        def work() -> socket.socket:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
            )
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LINK_WATCH_RCVBUF)
                sock.bind((0, RTMGRP_LINK))
            except OSError:
                sock.close()
                raise
            return sock

        try:
            return cls(netns.run_in(netns_fd, work))
        except OSError as exc:
            raise iptables.RedirectError(f"cannot watch the pod's links: {exc}") from exc

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read everything pending; True if a link was announced (or announcements were lost:
        the receive buffer overflowed, so assume one was)."""
        announced = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return announced
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    announced = True
                    continue
                raise
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                announced = announced or kind == RTM_NEWLINK
                if length < _NLMSG_HEADER.size:
                    break
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
