"""The playground's network: a fabric bridge, one network namespace per node, optional host access.

```
 root netns                 <prefix>-fabric                 <prefix>-node1 (172.30.0.10)
 <prefix>-host 172.30.0.1 ── host0 ─┐                      ┌─ eth0 ── cni0 (10.244.0.1) ── pods
                                    fabric0 (bridge) ── v-node1
                                    └── v-node2 ── eth0 <prefix>-node2 (172.30.0.11) ── 10.244.1/24
```

Invariants:
- Every name starts with ``<prefix>-`` (root link: ``<prefix>-host``), so two playgrounds with
  different prefixes never touch each other's objects, and teardown can find pods' namespaces
  by scanning /var/run/netns for the prefix.
- A namespace or root link is written to ``playground.json`` *before* it is created, so teardown
  from the record alone removes everything even after a crash halfway through `build()`.
- The root namespace gets at most one veth with one address (host access). Its sysctls, routes
  and firewall are never touched; forwarding is enabled inside node namespaces only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import time
from collections.abc import Iterable

from meshcore import netns
from meshctl import errors
from meshctl.playground import netcmd, procs, record

DEFAULT_SUBNET = ipaddress.IPv4Network("172.30.0.0/24")
SUBNET_SPACE = ipaddress.IPv4Network("172.30.0.0/16")
POD_CIDR_BASE = ipaddress.IPv4Network("10.244.0.0/16")
FABRIC_BRIDGE = "fabric0"
NODE_IFACE = "eth0"
HOST_PEER = "host0"  # the host veth's end inside the fabric namespace
FIRST_NODE_HOST = 10  # node i gets the subnet's host number 10 + i
MAX_NODES = 200

_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # "<prefix>-host" must fit IFNAMSIZ (15)
_NODE = re.compile(r"^[a-z][a-z0-9]{0,12}$")  # "v-<node>" must fit IFNAMSIZ too


class TopologyError(errors.MeshctlError):
    """Building or tearing down the playground network failed."""


class SubnetExhaustedError(TopologyError):
    """Every /24 in the search space overlaps a route of the root namespace."""


@dataclasses.dataclass(frozen=True, slots=True)
class TeardownReport:
    removed_netns: tuple[str, ...]
    removed_links: tuple[str, ...]
    remaining_netns: tuple[str, ...] = ()
    remaining_links: tuple[str, ...] = ()
    lingering_pids: tuple[int, ...] = ()  # processes still inside a namespace we deleted

    @property
    def is_clean(self) -> bool:
        return not (self.remaining_netns or self.remaining_links or self.lingering_pids)

    def describe_leftovers(self) -> str:
        parts = []
        if self.remaining_netns:
            parts.append("network namespaces " + ", ".join(self.remaining_netns))
        if self.remaining_links:
            parts.append("links " + ", ".join(self.remaining_links))
        if self.lingering_pids:
            parts.append(
                "processes still inside deleted namespaces: "
                + ", ".join(str(p) for p in self.lingering_pids)
            )
        return "; ".join(parts)


def validate_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise TopologyError(
            f"invalid prefix {prefix!r}: use 1-10 lowercase letters and digits, starting with a"
            " letter (it names network namespaces and the host link <prefix>-host)"
        )
    return prefix


def validate_node_name(name: str) -> str:
    if not _NODE.match(name):
        raise TopologyError(
            f"invalid node name {name!r}: use 1-13 lowercase letters and digits, starting with a"
            " letter"
        )
    return name


def choose_fabric_subnet(
    occupied: Iterable[ipaddress.IPv4Network],
    preferred: ipaddress.IPv4Network = DEFAULT_SUBNET,
    space: ipaddress.IPv4Network = SUBNET_SPACE,
) -> ipaddress.IPv4Network:
    """The first /24 of `space` (trying `preferred` first) that overlaps no occupied network.

    Default routes (0.0.0.0/0) are not counted: everything overlaps them.
    """
    taken = [n for n in occupied if n.prefixlen > 0]
    candidates = [preferred, *(s for s in space.subnets(new_prefix=24) if s != preferred)]
    for cand in candidates:
        if not any(cand.overlaps(n) for n in taken):
            return cand
    raise SubnetExhaustedError(
        f"no free /24 for the playground fabric in {space}: every one overlaps a route or"
        " address of the root network namespace (see `ip route show table all`)"
    )


def build_node_record(
    prefix: str, name: str, index: int, subnet: ipaddress.IPv4Network
) -> record.NodeRecord:
    """Names and addresses of node number `index` (0-based); pure."""
    if not 0 <= index < MAX_NODES:
        raise TopologyError(f"at most {MAX_NODES} nodes are supported")
    address = subnet.network_address + FIRST_NODE_HOST + index
    if address not in subnet or address == subnet.broadcast_address:
        raise TopologyError(f"fabric subnet {subnet} has no room for node {index + 1}")
    pod_cidr = ipaddress.IPv4Network((int(POD_CIDR_BASE.network_address) + (index << 8), 24))
    return record.NodeRecord(
        name=name,
        netns=f"{prefix}-{name}",
        address=str(address),
        pod_cidr=str(pod_cidr),
        fabric_link=f"v-{name}",
    )


def host_address(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address + 1}/{subnet.prefixlen}"


def fetch_root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 route destination and interface network of the root namespace."""
    nets: list[ipaddress.IPv4Network] = []
    for route in netcmd.ip_json("-4", "route", "show", "table", "all"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            nets.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    for link in netcmd.ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                nets.append(
                    ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                )
    return nets


def find_netns_with_prefix(prefix: str) -> list[str]:
    try:
        names = os.listdir(netns.NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{prefix}-"))


def netns_exists(name: str) -> bool:
    return os.path.exists(netns.path_for(name))


def find_root_links() -> set[str]:
    return {str(link.get("ifname")) for link in netcmd.ip_json("link", "show")}


def write_sysctl(netns_name: str, key: str, value: str) -> None:
    """Set a sysctl inside a namespace (from a thread that joined it; never the root's)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)

    fd = netns.open_netns(netns.path_for(netns_name))
    try:
        netns.run_in(fd, write)
    except OSError as exc:
        raise TopologyError(f"cannot set {key}={value} in {netns_name}: {exc}") from exc
    finally:
        os.close(fd)


class Topology:
    """Fluent builder: ``Topology(prefix="mt1", state_dir=d).node("node1").build()``.

    `build()` may be called again after adding nodes: it creates only what is missing and
    refreshes the pod-CIDR routes on every node.
    """

    def __init__(
        self,
        *,
        prefix: str,
        state_dir: str,
        host_access: bool = False,
        subnet: str | None = None,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.state_dir = state_dir
        self.host_access = host_access
        self._subnet = ipaddress.IPv4Network(subnet) if subnet else None
        self._names: list[str] = []
        self._record_file = record.RecordFile(state_dir)
        self._record: record.TopologyRecord | None = None
        self._built_netns: set[str] = set()
        self._built_links: set[str] = set()

    # -- fluent description -------------------------------------------------------------------

    def node(self, name: str) -> Topology:
        validate_node_name(name)
        if name in self._names:
            raise TopologyError(f"node {name!r} is already part of the topology")
        self._names.append(name)
        return self

    def nodes(self, count: int) -> Topology:
        for i in range(len(self._names), count):
            self.node(f"node{i + 1}")
        return self

    # -- queries ------------------------------------------------------------------------------

    @property
    def layout(self) -> record.TopologyRecord:
        if self._record is None:
            raise TopologyError("the topology has not been built")
        return self._record

    def find_node(self, name: str) -> record.NodeRecord:
        node = self.layout.find_node(name)
        if node is None:
            raise TopologyError(f"no node {name!r} in topology {self.prefix}")
        return node

    def node_address(self, name: str) -> str:
        return self.find_node(name).address

    def netns_of(self, name: str) -> str:
        return self.find_node(name).netns

    # -- building -----------------------------------------------------------------------------

    def build(self) -> record.TopologyRecord:
        """Create what is missing; on failure remove what this builder made, then raise.

        Only what this builder created is removed (not everything with the prefix): the failure
        may be that another playground already uses the prefix.
        """
        try:
            return self._build()
        except BaseException:
            if self._record is not None:
                made = dataclasses.replace(
                    self._record,
                    netns=tuple(n for n in self._record.netns if n in self._built_netns),
                    links=tuple(n for n in self._record.links if n in self._built_links),
                )
                teardown_topology(made, self.prefix, scan=False)
            self._built_netns.clear()
            self._built_links.clear()
            self._record = None
            raise

    def _build(self) -> record.TopologyRecord:
        if self._record is None:
            subnet = self._subnet or (
                choose_fabric_subnet(fetch_root_networks()) if self.host_access else DEFAULT_SUBNET
            )
            self._save(
                record.TopologyRecord(
                    prefix=self.prefix,
                    fabric_netns=f"{self.prefix}-fabric",
                    bridge=FABRIC_BRIDGE,
                    subnet=str(subnet),
                )
            )
        subnet = ipaddress.IPv4Network(self.layout.subnet)
        fabric, bridge = self.layout.fabric_netns, self.layout.bridge

        # The fabric: one namespace holding the bridge every node's eth0 is plugged into. Its
        # bridged frames need no firewall, so bridge-netfilter is off there (and only there).
        if self._add_netns(fabric):
            netcmd.ip("link", "set", "lo", "up", netns=fabric)
            netcmd.ip("link", "add", bridge, "type", "bridge", netns=fabric)
            netcmd.ip("link", "set", bridge, "up", netns=fabric)
            if os.path.exists("/proc/sys/net/bridge"):
                write_sysctl(fabric, "net.bridge.bridge-nf-call-iptables", "0")

        # Host access: one veth from the root namespace into the fabric, address .1.
        if self.host_access and self.layout.host_link is None:
            link = f"{self.prefix}-host"
            addr = host_address(subnet)
            self._update(host_link=link, host_address=addr)
            self._add_root_link(link)
            netcmd.ip(
                "link", "add", link, "type", "veth", "peer", "name", HOST_PEER, "netns", fabric
            )  # fmt: skip
            netcmd.ip("link", "set", HOST_PEER, "master", bridge, "up", netns=fabric)
            netcmd.ip("addr", "add", addr, "dev", link)
            netcmd.ip("link", "set", link, "up")

        # Nodes: a namespace each, eth0 on the fabric, forwarding on (pods route through it).
        for index, name in enumerate(self._names):
            if self.layout.find_node(name) is None:
                node = build_node_record(self.prefix, name, index, subnet)
                self._update(nodes=(*self.layout.nodes, node))
            node = self.find_node(name)
            if self._add_netns(node.netns):
                self._wire_node(node, subnet)

        # Routes: every node reaches every other node's pod CIDR through that node's address.
        nodes = self.layout.nodes
        for node in nodes:
            for other in nodes:
                if other.name != node.name:
                    netcmd.ip(
                        "route", "replace", other.pod_cidr, "via", other.address,
                        "dev", NODE_IFACE, netns=node.netns,
                    )  # fmt: skip
        return self.layout

    def _wire_node(self, node: record.NodeRecord, subnet: ipaddress.IPv4Network) -> None:
        rec = self.layout
        netcmd.ip("link", "set", "lo", "up", netns=node.netns)
        netcmd.ip(
            "link", "add", node.fabric_link, "type", "veth", "peer", "name", NODE_IFACE,
            "netns", node.netns, netns=rec.fabric_netns,
        )  # fmt: skip
        netcmd.ip(
            "link", "set", node.fabric_link, "master", rec.bridge, "up", netns=rec.fabric_netns
        )
        netcmd.ip(
            "addr", "add", f"{node.address}/{subnet.prefixlen}", "dev", NODE_IFACE,
            netns=node.netns,
        )  # fmt: skip
        netcmd.ip("link", "set", NODE_IFACE, "up", netns=node.netns)
        write_sysctl(node.netns, "net.ipv4.ip_forward", "1")

    def _add_netns(self, name: str) -> bool:
        """Record, then create, namespace `name`; False if this builder made it already."""
        if name in self._built_netns:
            return False
        if netns_exists(name):
            raise TopologyError(
                f"network namespace {name} already exists: another playground uses prefix"
                f" {self.prefix!r} (stop it with `meshctl down --prefix {self.prefix}`)"
            )
        if name not in self.layout.netns:
            self._update(netns=(*self.layout.netns, name))
        netcmd.ip("netns", "add", name)
        self._built_netns.add(name)
        return True

    def _add_root_link(self, name: str) -> None:
        if name in find_root_links():
            raise TopologyError(
                f"link {name} already exists in the root namespace: another playground uses"
                f" prefix {self.prefix!r}"
            )
        if name not in self.layout.links:
            self._update(links=(*self.layout.links, name))
        self._built_links.add(name)

    def _update(self, **changes: object) -> None:
        self._save(dataclasses.replace(self.layout, **changes))  # type: ignore[arg-type]

    def _save(self, topo: record.TopologyRecord) -> None:
        self._record = topo
        self._record_file.update(
            lambda r: dataclasses.replace(r, topology=topo),
            default=record.PlaygroundRecord(prefix=self.prefix, state_dir=self.state_dir),
        )

    # -- teardown -----------------------------------------------------------------------------

    def teardown(self, timeout: float = 30.0) -> TeardownReport:
        """Remove everything this topology (or its record) names; idempotent."""
        report = teardown_topology(self._record, self.prefix, timeout=timeout)
        self._built_netns.clear()
        self._built_links.clear()
        self._record = None
        stored = self._record_file.load()
        if stored is not None and stored.topology is not None:
            self._record_file.save(dataclasses.replace(stored, topology=None))
        return report


def teardown_topology(
    topo: record.TopologyRecord | None,
    prefix: str,
    *,
    timeout: float = 30.0,
    scan: bool = True,
) -> TeardownReport:
    """Delete the root links and every ``<prefix>-*`` namespace, then wait until they are gone.

    Works from the record alone (or from the prefix alone when the record is lost). Waiting is
    by polling with a deadline: namespace deletion is asynchronous, and a namespace stays alive
    for as long as a process is inside it, so those processes are reported as lingering.
    With `scan` False only what `topo` names is removed.
    """
    validate_prefix(prefix)
    links = list(topo.links) if topo else []
    if scan and f"{prefix}-host" not in links:
        links.append(f"{prefix}-host")
    found = find_netns_with_prefix(prefix) if scan else []
    names = sorted(set(topo.netns if topo else ()) | set(found))
    inodes: set[int] = set()
    for name in names:
        try:
            inodes.add(os.stat(netns.path_for(name)).st_ino)
        except OSError:
            pass

    present_links = find_root_links()
    removed_links = []
    for link in links:
        if link in present_links:
            _delete_quietly("link", "del", link)
            removed_links.append(link)

    # Pods first, fabric last: a node's veth peers vanish with whichever side goes first.
    def order(name: str) -> int:
        return 0 if name.startswith(f"{prefix}-p-") else 2 if name.endswith("-fabric") else 1

    removed_netns = []
    for name in sorted(names, key=order):
        if netns_exists(name):
            _delete_quietly("netns", "del", name)
            removed_netns.append(name)

    deadline = time.monotonic() + timeout
    while True:
        remaining_netns = tuple(n for n in names if netns_exists(n))
        remaining_links = tuple(sorted(set(links) & find_root_links()))
        lingering = tuple(sorted(procs.find_pids_in_netns(inodes)))
        if not (remaining_netns or remaining_links or lingering) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return TeardownReport(
        removed_netns=tuple(removed_netns),
        removed_links=tuple(removed_links),
        remaining_netns=remaining_netns,
        remaining_links=remaining_links,
        lingering_pids=lingering,
    )


def _delete_quietly(*args: str) -> None:
    """Run an ``ip ... del``; something already gone is success, anything else is an error."""
    try:
        netcmd.ip(*args)
    except netcmd.CommandError as exc:
        if not netcmd.is_missing(exc):
            raise TopologyError(str(exc)) from exc


def teardown_from_state(state_dir: str, prefix: str | None = None) -> TeardownReport:
    """Teardown using only ``<state_dir>/playground.json`` (prefix overrides a lost record)."""
    rec = record.RecordFile(state_dir).load()
    topo = rec.topology if rec else None
    use_prefix = prefix or (rec.prefix if rec else None)
    if use_prefix is None:
        raise TopologyError(f"no playground record in {state_dir} and no prefix given")
    return teardown_topology(topo, use_prefix)
