"""In-pod iptables rules (spec 3.2) as `iptables-restore --noflush` input. Pure functions.

The rules follow istio-cni's REDIRECT-mode golden files (I:`cni/pkg/iptables/testdata/`): mangle
marks ztunnel's spoofed-source connections so replies route back to it, nat redirects app
traffic to ztunnel's ports, raw keeps ztunnel's DNS upstream flows in their own conntrack zone.

Atomicity, measured with iptables-nft 1.8.9 (and legacy behaves the same): iptables-restore
commits each `*table ... COMMIT` block as its own transaction. A failure in a later block leaves
earlier blocks applied. So the install orders the tables raw, mangle, nat: the nat block is what
actually captures traffic, and it is committed last, only after everything it relies on is in
place; and the caller must clean up whatever a failed call left (see `redirector.py`).

Idempotency: a `:CHAIN - [0:0]` line creates the chain or flushes an existing one, but jump
rules would be appended twice. `install_rules` therefore takes the `InstalledState` found by
`parse_saved(iptables-save output)` and deletes the jumps that are already there in the same
block that re-adds them, so a reinstall is atomic per table and never leaves a gap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from meshcore import errors

# Spec 3.1 (I:`cni/pkg/config/config.go`).
INPOD_MARK = 0x539
INPOD_MASK = 0xFFF
INPOD_TPROXY_MARK = 0x111
INPOD_TPROXY_MASK = 0xFFF
INPOD_RESTORE_MASK = 0xFFFFFFFF
ROUTE_TABLE_INBOUND = 100
ZTUNNEL_OUTBOUND_PORT = 15001
ZTUNNEL_INBOUND_PLAINTEXT_PORT = 15006
ZTUNNEL_INBOUND_PORT = 15008
ZTUNNEL_DNS_PORT = 15053
DNS_PORT = 53
DNS_CONNTRACK_ZONE = 1

CHAIN_PREROUTING = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
# Our chain per built-in hook.
HOOKS = {"PREROUTING": CHAIN_PREROUTING, "OUTPUT": CHAIN_OUTPUT}
# Application order for install; removal runs it backwards so capture stops first.
TABLES = ("raw", "mangle", "nat")

_MARK = f"0x{INPOD_MARK:x}/0x{INPOD_MASK:x}"
_TPROXY_MARK = f"0x{INPOD_TPROXY_MARK:x}/0x{INPOD_TPROXY_MASK:x}"
_RESTORE_MASK = f"0x{INPOD_RESTORE_MASK:x}"

# Linux interface names: 1-15 bytes, no '/', ':' or whitespace. Narrower here on purpose: the
# names come from a pod annotation and end up in iptables-restore input, so nothing that could
# start a new token or line gets through.
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}")


class RedirectError(errors.MeshError):
    """Programming or removing the in-pod redirection failed."""


class InvalidOptionsError(RedirectError, ValueError):
    """A RedirectOptions value is not acceptable (names the field and value)."""


@dataclass(frozen=True)
class IpFamily:
    """What differs between the IPv4 and IPv6 rule sets (only the addresses)."""

    name: str
    loopback: str
    probe_snat: str


IPV4 = IpFamily("ipv4", loopback="127.0.0.1/32", probe_snat="169.254.7.127/32")
# For the ip6tables variant (not installed yet): same rules, these addresses.
IPV6 = IpFamily(
    "ipv6", loopback="::1/128", probe_snat="fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128"
)


@dataclass(frozen=True)
class RedirectOptions:
    """Per-pod variants (spec 3.3)."""

    dns_capture: bool = False
    # False: "ingress mode" (ambient.istio.io/bypass-inbound-capture): only outbound is captured.
    inbound_capture: bool = True
    # istio.io/reroute-virtual-interfaces: TCP arriving on these is treated as outbound.
    reroute_interfaces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.reroute_interfaces, tuple):
            raise InvalidOptionsError(
                f"reroute_interfaces must be a tuple, got {type(self.reroute_interfaces).__name__}"
            )
        for i, name in enumerate(self.reroute_interfaces):
            if not isinstance(name, str) or not _IFNAME.fullmatch(name):
                raise InvalidOptionsError(
                    f"reroute_interfaces[{i}]: {name!r} is not a valid interface name "
                    "(1-15 characters: letters, digits, '_', '.', '@', '-')"
                )


@dataclass(frozen=True)
class InstalledState:
    """What of ours `iptables-save` shows in a netns.

    `jumps` has one (table, hook) entry per `-A <hook> -j <our chain>` rule found (duplicates
    repeat); `chains` holds (table, chain) for each of our chains that exists.
    """

    jumps: tuple[tuple[str, str], ...] = ()
    chains: frozenset[tuple[str, str]] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not self.chains and not self.jumps

    @property
    def is_capturing(self) -> bool:
        """Both chains of mangle and nat exist and are hooked in (a completed install)."""
        return all(
            (table, chain) in self.chains and self.jump_count(table, hook) > 0
            for table in ("mangle", "nat")
            for hook, chain in HOOKS.items()
        )

    def jump_count(self, table: str, hook: str) -> int:
        return self.jumps.count((table, hook))


def parse_saved(text: str) -> InstalledState:
    """Find our chains and jumps in `iptables-save` output (other lines are ignored)."""
    table = ""
    jumps: list[tuple[str, str]] = []
    chains: set[tuple[str, str]] = set()
    ours = set(HOOKS.values())
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in ours:
                chains.add((table, name))
        elif line.startswith("-A "):
            words = line.split()
            if len(words) == 4 and words[2] == "-j" and HOOKS.get(words[1]) == words[3]:
                jumps.append((table, words[1]))
    return InstalledState(jumps=tuple(jumps), chains=frozenset(chains))


def _rules(options: RedirectOptions, family: IpFamily) -> dict[str, list[str]]:
    """Rules per table, in the order they must be evaluated (chain bodies only)."""
    lo, snat = family.loopback, family.probe_snat
    pre, out = CHAIN_PREROUTING, CHAIN_OUTPUT
    mangle = [
        # ztunnel's packets (SO_MARK 0x539) mark their connection, so the app's replies can be
        # routed back to ztunnel's spoofed-source socket (ip rule fwmark 0x111 -> table 100).
        f"-A {pre} -m mark --mark {_MARK} -j CONNMARK --set-xmark {_TPROXY_MARK}",
        f"-A {out} -m connmark --mark {_TPROXY_MARK} -j CONNMARK --restore-mark "
        f"--nfmask {_RESTORE_MASK} --ctmask {_RESTORE_MASK}",
    ]
    nat: list[str] = []
    for ifname in options.reroute_interfaces:
        nat += [
            f"-A {pre} -i {ifname} -p tcp -j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}",
            f"-A {pre} -i {ifname} -p tcp -j RETURN",
        ]
    if options.inbound_capture:
        nat += [
            # Kubelet probes arrive SNATed to the probe address and are not captured.
            f"-A {pre} -s {snat} -p tcp -m tcp -j ACCEPT",
            f"-A {pre} ! -d {lo} -p tcp -m tcp ! --dport {ZTUNNEL_INBOUND_PORT} "
            f"-m mark ! --mark {_MARK} -j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
        ]
    nat.append(f"-A {out} -d {snat} -p tcp -m tcp -j ACCEPT")
    if options.dns_capture:
        nat += [
            f"-A {out} ! -o lo -p udp -m mark ! --mark {_MARK} -m udp --dport {DNS_PORT} "
            f"-j REDIRECT --to-ports {ZTUNNEL_DNS_PORT}",
            f"-A {out} ! -d {lo} -p tcp -m tcp --dport {DNS_PORT} -m mark ! --mark {_MARK} "
            f"-j REDIRECT --to-ports {ZTUNNEL_DNS_PORT}",
        ]
    nat += [
        # Replies to ztunnel's spoofed-source connections must not be captured again.
        f"-A {out} -p tcp -m mark --mark {_TPROXY_MARK} -j ACCEPT",
        # A pod calling its own IP goes out lo; not captured.
        f"-A {out} ! -d {lo} -o lo -j ACCEPT",
        f"-A {out} ! -d {lo} -p tcp -m mark ! --mark {_MARK} "
        f"-j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}",
    ]
    rules = {"mangle": mangle, "nat": nat}
    if options.dns_capture:
        # Keeps ztunnel's upstream DNS flows apart from app<->ztunnel DNS flows in conntrack
        # (port collisions, istio/istio#33469).
        rules["raw"] = [
            f"-A {out} -p udp -m mark --mark {_MARK} -m udp --dport {DNS_PORT} "
            f"-j CT --zone {DNS_CONNTRACK_ZONE}",
            f"-A {pre} -p udp -m mark ! --mark {_MARK} -m udp --sport {DNS_PORT} "
            f"-j CT --zone {DNS_CONNTRACK_ZONE}",
        ]
    return rules


def _unhook(table: str, existing: InstalledState) -> list[str]:
    return [
        f"-D {hook} -j {chain}"
        for hook, chain in HOOKS.items()
        for _ in range(existing.jump_count(table, hook))
    ]


def _removal_block(table: str, existing: InstalledState) -> list[str]:
    present = [chain for chain in HOOKS.values() if (table, chain) in existing.chains]
    return [
        *_unhook(table, existing),
        *(f"-F {chain}" for chain in present),
        *(f"-X {chain}" for chain in present),
    ]


def _render(blocks: Iterable[tuple[str, list[str]]]) -> str:
    out: list[str] = []
    for table, lines in blocks:
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def install_rules(
    options: RedirectOptions,
    existing: InstalledState | None = None,
    family: IpFamily = IPV4,
) -> str:
    """`iptables-restore --noflush` input that captures the pod (tables raw, mangle, nat).

    `existing` is what is already installed (from `parse_saved`): those jumps are replaced, and
    our chains in tables the new options do not use (raw without DNS capture) are removed.
    """
    existing = existing or InstalledState()
    rules = _rules(options, family)
    blocks: list[tuple[str, list[str]]] = []
    for table in TABLES:
        if table not in rules:
            blocks.append((table, _removal_block(table, existing)))
            continue
        blocks.append(
            (
                table,
                [
                    # Creates the chain, or flushes it if it exists.
                    *(f":{chain} - [0:0]" for chain in HOOKS.values()),
                    *_unhook(table, existing),
                    *(f"-A {hook} -j {chain}" for hook, chain in HOOKS.items()),
                    *rules[table],
                ],
            )
        )
    return _render(blocks)


def remove_rules(existing: InstalledState | None = None) -> str:
    """`iptables-restore --noflush` input that removes our jumps and chains (nat first).

    With no `existing`, it removes everything a full install (DNS capture on) creates; that
    text fails on a pod missing any of it, so callers pass what `parse_saved` found, which makes
    removal idempotent ("" when nothing is left).
    """
    if existing is None:
        everything = [(table, chain) for table in TABLES for chain in HOOKS.values()]
        existing = InstalledState(
            jumps=tuple((table, hook) for table in TABLES for hook in HOOKS),
            chains=frozenset(everything),
        )
    return _render((table, _removal_block(table, existing)) for table in reversed(TABLES))
