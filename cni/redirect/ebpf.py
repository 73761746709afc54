"""In-pod redirection with eBPF instead of iptables (`REDIRECT_MODE=ebpf`).

The same capture as spec 3.2, with no netfilter rule in the pod: three tc programs
(`ebpf_redirect.c`, which says what each does) steer the app's connections to ztunnel's listeners
with `bpf_sk_assign`, the socket-level equivalent of TPROXY, and turn the packets of ztunnel's
own pod-side sockets back into the pod through lo. Without any rule in the namespace the kernel
keeps no conntrack state there. ztunnel reads the original destination from the accepted
socket's own address.

What the programs need besides themselves, all inside the pod's namespace:
- the policy routing of spec 3.2 (`netlink.add_routing`): packets marked 0x111 are local;
- `net.ipv4.conf.lo.accept_local=1`: packets turned back through lo carry the pod's own address
  as source, which the kernel otherwise drops as a martian on a redirected packet;
- ztunnel's 15001 listener is IP_TRANSPARENT (it answers for the original destination).

The programs are compiled once per agent with BCC (Debian's python3-bpfcc and kernel headers,
which `scripts/bootstrap` installs) and attached per pod with a clsact qdisc, as filters of our
own priority and name, so that they can be found, replaced and removed without touching anyone
else's. A filter holds its program, so capture outlives an agent restart; the new agent's
install replaces each filter in place (tc replace, no gap). The map of captured app sockets is
pinned in a bpf filesystem (BPF_PIN_DIR, /sys/fs/bpf/ambient-mesh by default), and a new agent's
programs open the pinned map instead of making their own: connections captured before a restart
stay guarded after it. An agent whose BPF_PIN_DIR is not on a bpf filesystem refuses to start.
A link added to a pod later has no filter until the agent, which watches each captured pod's
links (`netlink.LinkWatch`), reinstalls.

Not supported here, refused or said so: IPv6 (neither mode captures it yet), DNS capture (ztunnel
has no DNS proxy yet, so it is left off with a warning) and `istio.io/reroute-virtual-interfaces`
(an install with it fails, naming the option).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.redirect import iptables
from meshcore import bpffs, log, netns

logger = logging.getLogger("cni.redirect.ebpf")

SOURCE = Path(__file__).with_name("ebpf_redirect.c")
# The host SNATs kubelet probes to this address (spec 3.2); the iptables rules exempt it too.
PROBE_SNAT_ADDRESS = int(ipaddress.ip_network(iptables.IPV4.probe_snat).network_address)
MIN_KERNEL = (6, 5)
CAPTURED_SOCKETS = 131072  # LRU entries: app sockets whose SYN was captured, per node
# The pinned map's file in BPF_PIN_DIR. A change to its key or value type needs a new name.
CAPTURED_SOCKETS_PIN = "captured_sockets"

FILTER_PRIORITY = 0x4D53  # our filters' tc priority ("MS"); handle 1 within it
FILTER_HANDLE = 1
EGRESS_PARENT = 0xFFFFFFF3
INGRESS_PARENT = 0xFFFFFFF2
NAME_PREFIX = "ambient-mesh:"
ACCEPT_LOCAL = "/proc/sys/net/ipv4/conf/lo/accept_local"

EGRESS = "ambient_egress"
LO_INGRESS = "ambient_lo_in"
INGRESS = "ambient_ingress"
PROGRAMS = (EGRESS, LO_INGRESS, INGRESS)


class BpfUnavailableError(iptables.RedirectError):
    """BCC or the kernel headers are missing, the kernel is too old, or it refused the programs."""


@dataclass(frozen=True)
class Attached:
    """One of our filters: where it is and which program it runs."""

    ifname: str
    direction: str  # "egress" or "ingress"
    program: str


@dataclass(frozen=True)
class EbpfState:
    """What of ours a pod's namespace holds."""

    filters: tuple[Attached, ...] = ()

    @property
    def is_capturing(self) -> bool:
        """Outbound capture is complete: lo's ingress and at least one link's egress."""
        attached = {(f.direction, f.program) for f in self.filters}
        return ("ingress", LO_INGRESS) in attached and ("egress", EGRESS) in attached

    @property
    def is_empty(self) -> bool:
        return not self.filters


class Programs:
    """The compiled programs: one BCC module per agent, loaded on first use, with the map of
    captured sockets pinned in `pin_dir` (a directory in a bpf filesystem, created if missing)."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self._lock = threading.Lock()
        self._module: Any = None
        self._fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        self.load()
        return self._fds[name]

    def load(self) -> None:
        """Compile and load the programs unless done already (about half a second)."""
        with self._lock:
            if not self._fds:
                self._load()

    def _load(self) -> None:
        started = time.monotonic()
        check_kernel(os.uname().release)
        bcc = _import_bcc()
        pinned = prepare_pin_dir(self.pin_dir)
        cflags = [
            f"-DINPOD_MARK={iptables.INPOD_MARK:#x}",
            f"-DRETURN_MARK={iptables.INPOD_TPROXY_MARK:#x}",
            f"-DMARK_MASK={iptables.INPOD_TPROXY_MASK:#x}",
            f"-DOUTBOUND_PORT={iptables.ZTUNNEL_OUTBOUND_PORT}",
            f"-DINBOUND_PORT={iptables.ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
            f"-DHBONE_PORT={iptables.ZTUNNEL_INBOUND_PORT}",
            f"-DPROBE_ADDR={PROBE_SNAT_ADDRESS:#x}",
            f"-DCAPTURED_SOCKETS={CAPTURED_SOCKETS}",
            f'-DCAPTURED_SOCKETS_PIN="{pinned}"',
        ]
        try:
            module = bcc.BPF(src_file=os.fsencode(SOURCE), cflags=cflags)
            fds = {name: module.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd for name in PROGRAMS}
        except Exception as exc:  # BCC raises bare Exception for compile and load failures
            raise BpfUnavailableError(
                f"could not compile or load {SOURCE.name}: {exc} (eBPF redirection needs the "
                "kernel headers, linked from /lib/modules/$(uname -r)/build: see scripts/bootstrap)"
            ) from exc
        self._module, self._fds = module, fds
        logger.info(
            "eBPF redirection programs loaded",
            extra=log.fields(
                duration_ms=round((time.monotonic() - started) * 1000, 1), pinned_map=pinned
            ),
        )


def prepare_pin_dir(pin_dir: str) -> str:
    """Check that `pin_dir` is (or would be created) inside a bpf filesystem, create it, and
    return the pinned map's path. Nothing is created anywhere else."""
    if not os.path.isabs(pin_dir) or any(c in pin_dir for c in '"\\\n'):
        raise BpfUnavailableError(
            f"BPF_PIN_DIR={pin_dir!r} must be an absolute path without quotes or backslashes"
        )
    existing = pin_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        on_bpffs = bpffs.is_bpffs(existing)
        if on_bpffs:
            os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise BpfUnavailableError(f"BPF_PIN_DIR={pin_dir}: {exc.strerror}") from exc
    if not on_bpffs:
        raise BpfUnavailableError(
            f"BPF_PIN_DIR={pin_dir} is not on a bpf filesystem ({existing} is not), so the map "
            "of captured connections could not outlive an agent restart: mount one "
            "(mount -t bpf bpf /sys/fs/bpf; in a cluster, a hostPath volume of /sys/fs/bpf) "
            "or point BPF_PIN_DIR into one"
        )
    return os.path.join(pin_dir, CAPTURED_SOCKETS_PIN)


def check_kernel(release: str) -> None:
    """bpf_sk_assign takes ztunnel's SO_REUSEPORT listeners from Linux 6.5 on; before, it
    refuses them and every captured connection would be dropped."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None or (int(match[1]), int(match[2])) < MIN_KERNEL:
        raise BpfUnavailableError(
            f"eBPF redirection needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or later (bpf_sk_assign "
            f"with SO_REUSEPORT listeners); this kernel is {release!r}: use REDIRECT_MODE=iptables"
        )


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise BpfUnavailableError(
            "eBPF redirection needs BCC: install Debian's python3-bpfcc (not the unrelated PyPI "
            "package named bcc) and make it importable (scripts/bootstrap links it into .venv), "
            "or use REDIRECT_MODE=iptables"
        ) from None
    return bcc


def check_options(options: iptables.RedirectOptions, netns_path: str) -> None:
    """Refuse what the programs cannot do; warn about DNS capture, which they leave off."""
    if options.reroute_interfaces:
        raise iptables.RedirectError(
            "istio.io/reroute-virtual-interfaces is not supported with REDIRECT_MODE=ebpf "
            f"(asked for {', '.join(options.reroute_interfaces)}); use iptables mode"
        )
    if options.dns_capture:
        logger.warning(
            "DNS capture is not available with REDIRECT_MODE=ebpf; DNS is not captured",
            extra=log.fields(netns=netns_path),
        )


def attach(netns_fd: int, programs: Programs, options: iptables.RedirectOptions) -> None:
    """Attach (or replace in place) our filters in the namespace, and set accept_local."""
    fds = {name: programs.fd(name) for name in PROGRAMS}
    netns.run_in(netns_fd, lambda: _attach(fds, inbound=options.inbound_capture))


def detach(netns_fd: int) -> None:
    """Remove our filters (nobody else's) and reset accept_local. Fine when there are none."""
    netns.run_in(netns_fd, _detach)


def find_state(netns_fd: int) -> EbpfState:
    def work() -> EbpfState:
        with IPRoute() as ipr:
            return _state(ipr)

    return netns.run_in(netns_fd, work)


def _attach(fds: dict[str, int], *, inbound: bool) -> None:
    """In the pod's namespace: lo's program first (alone it does nothing: it only acts on what
    the egress program sends it), then accept_local, then each link's egress and ingress (or the
    ingress filter's removal in ingress mode)."""
    with IPRoute() as ipr:
        links = _links(ipr)
        lo = links.pop("lo", None)
        if lo is None:
            raise iptables.RedirectError("the pod's namespace has no lo")
        if not links:
            raise iptables.RedirectError("the pod's namespace has no link besides lo")
        _replace(ipr, lo, "lo", INGRESS_PARENT, fds, LO_INGRESS)
        _write_sysctl(ACCEPT_LOCAL, "1")
        for ifname, index in links.items():
            _replace(ipr, index, ifname, EGRESS_PARENT, fds, EGRESS)
            if inbound:
                _replace(ipr, index, ifname, INGRESS_PARENT, fds, INGRESS)
            else:
                _delete(ipr, index, ifname, INGRESS_PARENT)


def _detach() -> None:
    """Our filters go; accept_local is reset only where we had set it (a namespace with our
    lo filter), so a pod that never ran in eBPF mode keeps its own setting."""
    with IPRoute() as ipr:
        if _state(ipr).is_empty:
            return
        for ifname, index in _links(ipr).items():
            for parent in (EGRESS_PARENT, INGRESS_PARENT):
                _delete(ipr, index, ifname, parent)
    _write_sysctl(ACCEPT_LOCAL, "0")


def _state(ipr: IPRoute) -> EbpfState:
    found: list[Attached] = []
    for ifname, index in _links(ipr).items():
        for direction, parent in (("egress", EGRESS_PARENT), ("ingress", INGRESS_PARENT)):
            for msg in (
                _call(
                    f"list the tc filters of {ifname}",
                    ipr.get_filters,
                    index=index,
                    parent=parent,
                    tolerate=(errno.EINVAL, errno.ENOENT),
                )
                or ()
            ):
                name = _bpf_name(msg)
                if name is not None and name.startswith(NAME_PREFIX):
                    found.append(Attached(ifname, direction, name[len(NAME_PREFIX) :]))
    return EbpfState(tuple(found))


def _links(ipr: IPRoute) -> dict[str, int]:
    return {link.get("ifname"): link["index"] for link in ipr.get_links()}


def _replace(
    ipr: IPRoute, index: int, ifname: str, parent: int, fds: dict[str, int], program: str
) -> None:
    _call(
        f"add the clsact qdisc on {ifname}",
        ipr.tc,
        "add",
        "clsact",
        index=index,
        tolerate=(errno.EEXIST,),
    )
    _call(
        f"attach {program} to {ifname}",
        ipr.tc,
        "replace-filter",
        "bpf",
        index=index,
        handle=FILTER_HANDLE,
        prio=FILTER_PRIORITY,
        parent=parent,
        fd=fds[program],
        name=NAME_PREFIX + program,
        classid=1,
        direct_action=True,
    )


def _delete(ipr: IPRoute, index: int, ifname: str, parent: int) -> None:
    """Remove our filter from one hook; a hook (or qdisc) without it is fine."""
    _call(
        f"detach our filter from {ifname}",
        ipr.tc,
        "del-filter",
        "bpf",
        index=index,
        handle=FILTER_HANDLE,
        prio=FILTER_PRIORITY,
        parent=parent,
        tolerate=(errno.ENOENT, errno.EINVAL),
    )


def _bpf_name(msg: Any) -> str | None:
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    return None if options is None else options.get_attr("TCA_BPF_NAME")


def _call(
    what: str, fn: Callable[..., Any], *args: Any, tolerate: tuple[int, ...] = (), **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)`; netlink errors in `tolerate` give None, others RedirectError."""
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code in tolerate:
            return None
        raise iptables.RedirectError(f"could not {what}: {exc}") from exc


def _write_sysctl(path: str, value: str) -> None:
    """Written from a thread inside the pod's namespace: /proc/sys/net is that namespace's."""
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as exc:
        raise iptables.RedirectError(f"could not write {value} to {path}: {exc}") from exc
