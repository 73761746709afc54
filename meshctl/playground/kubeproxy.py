"""The kube-proxy role of the playground kubelet: Service VIPs for pods the mesh does not capture.

Runs in the node's network namespace and owns the nat chains named ``MESHPG-*`` there. Each change
of services or endpoints rewrites all of them in one ``iptables-restore --noflush`` (atomic, and
other owners' rules in the same tables, such as the node agent's, stay untouched):

- ``MESHPG-SERVICES`` (from PREROUTING and OUTPUT): captured pods RETURN first (the mesh resolves
  VIPs inside those pods; a VIP from them reaching the node is a mesh bug that must not be
  hidden), then one jump per VIP:port to its ``MESHPG-SVC-*`` chain;
- ``MESHPG-SVC-*``: picks an endpoint uniformly (``-m statistic --mode random``, probabilities
  1/n, 1/(n-1), ..., last unconditional) and jumps to its ``MESHPG-SEP-*``;
- ``MESHPG-SEP-*``: marks hairpin traffic (a pod reaching itself through the VIP) for
  masquerade, then DNATs to podIP:targetPort;
- ``MESHPG-POSTROUTING`` (from POSTROUTING): masquerades marked connections.

Replies from an endpoint on the same bridge come back through the node's conntrack because
bridge-netfilter is on in node namespaces (the kernel's default for a new namespace).

`build_plan` and `build_restore_input` are pure; `KubeProxy` runs them when told something changed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshcore import digits, log
from meshcore.kube import objects
from meshctl import podfields
from meshctl.playground import netcmd

_LOG = logging.getLogger("kubelet.proxy")

CHAIN_PREFIX = "MESHPG-"
SERVICES_CHAIN = "MESHPG-SERVICES"
POSTROUTING_CHAIN = "MESHPG-POSTROUTING"
MASQ_CHAIN = "MESHPG-MARK-MASQ"
BASE_CHAINS = (SERVICES_CHAIN, POSTROUTING_CHAIN, MASQ_CHAIN)
HOOKS = (
    ("PREROUTING", SERVICES_CHAIN),
    ("OUTPUT", SERVICES_CHAIN),
    ("POSTROUTING", POSTROUTING_CHAIN),
)
MASQ_MARK = "0x4000/0x4000"
DEBOUNCE_SECONDS = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str
    protocol: str  # "tcp" | "udp"
    cluster_ip: str
    port: int
    endpoints: tuple[Endpoint, ...]

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name or self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyPlan:
    ports: tuple[ServicePort, ...]
    captured: tuple[tuple[str, str], ...]  # (pod IP, "ns/name") of pods the mesh captures


def _target_port(pod: Mapping[str, Any], port: Mapping[str, Any], protocol: str) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, bool):
        return None
    if isinstance(target, int):
        return target
    if isinstance(target, str) and digits.is_digits(target):
        return int(target)
    if isinstance(target, str):
        return podfields.find_named_port(pod, target, protocol)
    return None


def build_plan(
    services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> ProxyPlan:
    """Which VIP:port goes to which endpoints, and which sources skip it all (pure)."""
    pod_list = list(pods)
    ports = []
    for svc in services:
        vip = podfields.cluster_ip(svc)
        if not vip or not podfields.selector(svc):
            continue
        ns = objects.namespace(svc)
        members = podfields.find_service_members(svc, pod_list)
        for port in podfields.service_ports(svc):
            number = port.get("port")
            protocol = str(port.get("protocol") or "TCP")
            if not isinstance(number, int) or protocol not in ("TCP", "UDP"):
                continue
            endpoints = []
            for pod in members:
                target = _target_port(pod, port, protocol)
                if target is not None:
                    endpoints.append(Endpoint(podfields.pod_ip(pod), target))
            ports.append(
                ServicePort(
                    namespace=ns,
                    name=objects.name(svc),
                    port_name=str(port.get("name") or ""),
                    protocol=protocol.lower(),
                    cluster_ip=vip,
                    port=number,
                    endpoints=tuple(sorted(set(endpoints), key=_endpoint_key)),
                )
            )
    captured = sorted(
        (podfields.pod_ip(p), f"{objects.namespace(p)}/{objects.name(p)}")
        for p in pod_list
        if podfields.is_captured(p) and podfields.pod_ip(p)
    )
    return ProxyPlan(
        ports=tuple(sorted(ports, key=lambda p: (p.namespace, p.name, p.port, p.protocol))),
        captured=tuple(captured),
    )


def _endpoint_key(ep: Endpoint) -> tuple[int, int]:
    return int(ipaddress.IPv4Address(ep.ip)), ep.port


def chain_name(kind: str, *parts: str) -> str:
    """``MESHPG-SVC-<16 chars>``: a stable hash (chain names are limited to 28 characters)."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return f"{CHAIN_PREFIX}{kind}-{base64.b32encode(digest).decode()[:16]}"


def build_restore_input(plan: ProxyPlan, existing: Iterable[str]) -> tuple[str, frozenset[str]]:
    """The ``iptables-restore --noflush`` input and the set of chains it leaves behind.

    Every chain we own is declared (which flushes it) and rewritten; chains from `existing`
    that the plan no longer uses are deleted in the same transaction.
    """
    chains: list[str] = list(BASE_CHAINS)
    rules: list[str] = [
        f"-A {POSTROUTING_CHAIN} -m mark ! --mark {MASQ_MARK} -j RETURN",
        f"-A {POSTROUTING_CHAIN} -j MARK --xor-mark 0x4000",
        f"-A {POSTROUTING_CHAIN} -j MASQUERADE",
        f"-A {MASQ_CHAIN} -j MARK --or-mark 0x4000",
    ]
    for ip, who in plan.captured:
        rules.append(
            f'-A {SERVICES_CHAIN} -s {ip}/32 -m comment --comment "captured {who}" -j RETURN'
        )
    for sp in plan.ports:
        if not sp.endpoints:
            continue  # no rule: the VIP is unroutable from the node, so connects fail fast
        svc_chain = chain_name("SVC", sp.namespace, sp.name, sp.port_name, sp.protocol)
        chains.append(svc_chain)
        rules.append(
            f"-A {SERVICES_CHAIN} -d {sp.cluster_ip}/32 -p {sp.protocol} -m {sp.protocol}"
            f' --dport {sp.port} -m comment --comment "{sp.label}" -j {svc_chain}'
        )
        n = len(sp.endpoints)
        for i, ep in enumerate(sp.endpoints):
            sep_chain = chain_name(
                "SEP", sp.namespace, sp.name, sp.port_name, sp.protocol, ep.ip, str(ep.port)
            )
            chains.append(sep_chain)
            if i < n - 1:
                rules.append(
                    f"-A {svc_chain} -m statistic --mode random --probability"
                    f" {1.0 / (n - i):.10f} -j {sep_chain}"
                )
            else:
                rules.append(f"-A {svc_chain} -j {sep_chain}")
            rules.append(f"-A {sep_chain} -s {ep.ip}/32 -j {MASQ_CHAIN}")
            rules.append(
                f"-A {sep_chain} -p {sp.protocol} -m {sp.protocol}"
                f" -j DNAT --to-destination {ep.ip}:{ep.port}"
            )
    wanted = list(dict.fromkeys(chains))
    stale = sorted(set(existing) - set(wanted) - set(BASE_CHAINS))
    lines = ["*nat"]
    lines += [f":{c} - [0:0]" for c in [*wanted, *stale]]
    lines += rules
    lines += [f"-X {c}" for c in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n", frozenset(wanted)


def parse_owned_chains(save_output: str) -> set[str]:
    """Our chains in an ``iptables-save -t nat`` dump."""
    return {
        line[1:].split()[0]
        for line in save_output.splitlines()
        if line.startswith(":" + CHAIN_PREFIX)
    }


class KubeProxy:
    """Keeps the node's nat rules in line with services and endpoints; call `mark_dirty()`."""

    def __init__(
        self,
        find_services: Callable[[], list[dict[str, Any]]],
        find_pods: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._find_services = find_services
        self._find_pods = find_pods
        self._dirty = asyncio.Event()
        self._chains: frozenset[str] = frozenset()
        self._last_input = ""

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def setup(self) -> None:
        """Create our base chains and hook them in (once; a restarted kubelet finds them)."""
        existing = await netcmd.arun(["iptables-save", "-t", "nat"])
        self._chains = frozenset(parse_owned_chains(existing))
        await self._apply(ProxyPlan(ports=(), captured=()))
        for builtin, chain in HOOKS:
            try:
                await netcmd.arun(["iptables", "-w", "-t", "nat", "-C", builtin, "-j", chain])
            except netcmd.CommandError:
                await netcmd.arun(["iptables", "-w", "-t", "nat", "-I", builtin, "1", "-j", chain])

    async def run(self) -> None:
        """Forever: wait for a change, let a burst of changes settle, rewrite the rules."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self._dirty.clear()
            plan = build_plan(self._find_services(), self._find_pods())
            try:
                await self._apply(plan)
            except netcmd.CommandError as exc:
                _LOG.error("applying service rules failed", extra=log.fields(error=str(exc)))
                self._dirty.set()
                await asyncio.sleep(1.0)

    async def _apply(self, plan: ProxyPlan) -> None:
        text, chains = build_restore_input(plan, self._chains)
        if text == self._last_input:
            return
        await netcmd.arun(["iptables-restore", "--noflush", "-w"], stdin=text)
        self._chains = chains
        self._last_input = text
        _LOG.info(
            "service rules updated",
            extra=log.fields(
                ports=len(plan.ports),
                endpoints=sum(len(p.endpoints) for p in plan.ports),
                captured=len(plan.captured),
            ),
        )
