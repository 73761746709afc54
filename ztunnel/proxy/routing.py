"""Deciding where a connection goes, before any I/O (ztunnel src/proxy/outbound.rs build_request).

`build_outbound` and `build_inbound` are pure: they read the proxy state and return a frozen plan
or a refusal. The proxies then only carry the plan out. Table-driven tests cover them without
sockets.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import ids, workload
from meshcore.wire import hbone
from ztunnel.state import proxy_state

HBONE_PORT = 15008
# Connections to these on loopback (or resolved inbound to them) would loop through ztunnel.
ILLEGAL_PORTS = frozenset({15001, 15006, 15008})

T = TypeVar("T")
Chooser = Callable[[Sequence[T]], T]


class Route(enum.Enum):
    HBONE = "hbone"  # mutual TLS + HTTP/2 CONNECT to the destination's ztunnel on 15008
    PASSTHROUGH = "passthrough"  # plain TCP: the destination is not in the mesh


class Flag(enum.Enum):
    """Istio's response_flags values, as they appear in metrics."""

    NONE = "-"
    DENY = "DENY"
    CONNECT = "CONNECT"
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    IDENTITY_ERROR = "IDENTITY_ERROR"


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundPlan:
    route: Route
    original: tuple[str, int]  # what the app dialled
    target: tuple[str, int]  # where our TCP connection goes (ip:15008 for HBONE)
    authority: str | None  # HBONE :authority, the workload's ip:targetPort
    expected_identities: tuple[spiffe.SpiffeId, ...]
    source: workload.Workload
    destination: workload.Workload | None
    service: workload.Service | None


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    flag: Flag
    status: int = 503  # for inbound HBONE: the CONNECT response status


def build_outbound(
    state: proxy_state.ProxyState,
    source: workload.Workload,
    original: tuple[str, int],
    *,
    choose: Chooser[workload.Workload] = random.choice,
) -> OutboundPlan | Refusal:
    ip_text, port = original
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return Refusal(f"invalid destination address {ip_text!r}", Flag.CONNECT)
    if ip.is_loopback and port in ILLEGAL_PORTS:
        return Refusal(f"connection to ztunnel's own port {port}", Flag.CONNECT)

    service = state.services.find_by_vip(ip)
    if service is not None:
        mapping = service.port(port)
        if mapping is None:
            return Refusal(f"service {service.hostname} has no port {port}", Flag.CONNECT)
        candidates = [
            (wl, target)
            for wl in state.workloads.find_endpoints(service.key)
            if wl.is_healthy and (target := _target_port(wl, service, mapping)) is not None
        ]
        if not candidates:
            return Refusal(f"no healthy upstream for service {service.hostname}", Flag.CONNECT)
        local = [c for c in candidates if c[0].node == source.node]
        pool = local or candidates
        chosen = choose([wl for wl, _ in pool])
        target_port = next(t for wl, t in pool if wl is chosen)
        return _to_workload(source, original, chosen, target_port, service)

    destination = state.workloads.find_by_address(ip, source.network)
    if destination is not None:
        return _to_workload(source, original, destination, port, None)
    return OutboundPlan(
        route=Route.PASSTHROUGH,
        original=original,
        target=original,
        authority=None,
        expected_identities=(),
        source=source,
        destination=None,
        service=None,
    )


def _target_port(
    wl: workload.Workload, service: workload.Service, mapping: workload.PortMapping
) -> int | None:
    binding = wl.binding(service.key)
    if binding is None:
        return None
    target = binding.target_port(mapping.service_port)
    if target is None:
        # The workload resolved no mapping for this port (e.g. an unknown named port).
        return None
    return target or mapping.target_port or mapping.service_port


def _to_workload(
    source: workload.Workload,
    original: tuple[str, int],
    destination: workload.Workload,
    port: int,
    service: workload.Service | None,
) -> OutboundPlan:
    address = str(destination.addresses[0]) if destination.addresses else original[0]
    if destination.has_hbone:
        sans = _parse_sans(service.subject_alt_names if service else ())
        return OutboundPlan(
            route=Route.HBONE,
            original=original,
            target=(address, HBONE_PORT),
            authority=hbone.format_authority(ipaddress.ip_address(address), port),
            expected_identities=(destination.identity, *sans),
            source=source,
            destination=destination,
            service=service,
        )
    return OutboundPlan(
        route=Route.PASSTHROUGH,
        original=original,
        target=(address, port),
        authority=None,
        expected_identities=(),
        source=source,
        destination=destination,
        service=service,
    )


def _parse_sans(values: Sequence[str]) -> tuple[spiffe.SpiffeId, ...]:
    parsed = []
    for value in values:
        try:
            parsed.append(spiffe.SpiffeId.parse(value))
        except spiffe.InvalidSpiffeIdError:
            continue  # not a SPIFFE SAN: it can never match a peer, so it adds nothing
    return tuple(parsed)


@dataclasses.dataclass(frozen=True, slots=True)
class InboundPlan:
    target: tuple[str, int]  # the app, dialled from inside the pod
    local: workload.Workload
    peer_identity: spiffe.SpiffeId | None
    source_ip: ids.IpAddress
    decision: rbac.Decision


def build_inbound(
    state: proxy_state.ProxyState,
    local: workload.Workload,
    *,
    peer_identity: spiffe.SpiffeId | None,
    source_ip: ids.IpAddress,
    authority: str,
    method: str = "CONNECT",
) -> InboundPlan | Refusal:
    """Validate an inbound tunnel request (spec section 2, 'What the receiving ztunnel validates').

    For plaintext inbound (port 15006) the authority is the original destination ip:port and
    there is no peer identity.
    """
    if method != "CONNECT":
        return Refusal(f"method {method} is not CONNECT", Flag.CONNECT, status=400)
    try:
        ip, port = hbone.parse_authority(authority)
    except hbone.InvalidAuthorityError as exc:
        return Refusal(str(exc), Flag.CONNECT, status=400)
    if ip not in local.addresses:
        return Refusal(
            f"authority {authority} is not this workload's address", Flag.CONNECT, status=400
        )
    if port in ILLEGAL_PORTS:
        return Refusal(f"connection to ztunnel's own port {port}", Flag.CONNECT, status=400)
    conn = rbac.ConnectionInfo(
        source_identity=peer_identity,
        source_ip=source_ip,
        destination_ip=ip,
        destination_port=port,
    )
    decision = rbac.evaluate(state.policies.find_applicable(local), conn)
    if not decision.is_allowed:
        by = f" by {decision.policy}" if decision.policy else ""
        return Refusal(f"connection {decision.verdict.value}{by}", Flag.DENY, status=401)
    return InboundPlan(
        target=(str(ip), port),
        local=local,
        peer_identity=peer_identity,
        source_ip=source_ip,
        decision=decision,
    )
