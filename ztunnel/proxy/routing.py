"""Deciding where a connection goes, before any I/O (ztunnel src/proxy/outbound.rs build_request).

`build_outbound` and `build_inbound` are pure: they read the proxy state and return a frozen plan
or a refusal. The proxies then only carry the plan out. Table-driven tests cover them without
sockets.

Outbound decision order (spec 5.2): a service VIP whose Service has a waypoint goes to the
waypoint; otherwise to one of its endpoints. A pod IP whose Workload has a waypoint goes to the
waypoint (traffic addressed to a Service never detours to a *workload* waypoint); otherwise to
the pod. A waypoint is reached over HBONE at `waypoint_ip:hbone_mtls_port` with the original
destination as the authority. When it cannot be reached the connection is refused: going
direct instead would skip the L7 policy the waypoint enforces.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import ids, workload
from meshcore.wire import hbone, proxyproto
from ztunnel.state import proxy_state

HBONE_PORT = 15008
# Connections to these on loopback (or resolved inbound to them) would loop through ztunnel.
ILLEGAL_PORTS = frozenset({15001, 15006, 15008})

T = TypeVar("T")
Chooser = Callable[[Sequence[T]], T]

# Memos of pure conversions that every connection repeats with the same few inputs (a node
# talks to a bounded set of addresses and identities): parsing an address and making a SPIFFE
# ID each cost microseconds, a hit a fraction of one (hbone.format_authority memoises its own
# address part). Errors are not memoised; they raise every time, as before.
_MEMO_SIZE = 4096
parse_ip: Callable[[str], ids.IpAddress] = functools.lru_cache(maxsize=_MEMO_SIZE)(
    ipaddress.ip_address
)
# An inbound request's authority is one of the pod's own address:port pairs.
_parse_authority = functools.lru_cache(maxsize=_MEMO_SIZE)(hbone.parse_authority)
_spiffe_id = functools.lru_cache(maxsize=_MEMO_SIZE)(spiffe.SpiffeId.for_workload)


def identity_of(wl: workload.Workload) -> spiffe.SpiffeId:
    """`wl.identity`, memoised."""
    return _spiffe_id(wl.namespace, wl.service_account, wl.trust_domain)


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
    destination: workload.Workload | None  # the waypoint's workload when going through one
    service: workload.Service | None  # the service the app called, also through a waypoint
    waypoint: workload.GatewayAddress | None = None  # set when going through a waypoint


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    flag: Flag
    status: int = 503  # for inbound HBONE: the CONNECT response status
    service: workload.Service | None = None  # the service that was called, for telemetry


def build_outbound(
    state: proxy_state.ProxyState,
    source: workload.Workload,
    original: tuple[str, int],
    *,
    choose: Chooser[workload.Workload] = random.choice,
) -> OutboundPlan | Refusal:
    ip_text, port = original
    try:
        ip = parse_ip(ip_text)
    except ValueError:
        return Refusal(f"invalid destination address {ip_text!r}", Flag.CONNECT)
    if ip.is_loopback and port in ILLEGAL_PORTS:
        return Refusal(f"connection to ztunnel's own port {port}", Flag.CONNECT)

    service = state.services.find_by_vip(ip)
    if service is not None:
        mapping = service.port(port)
        if mapping is None:
            return Refusal(
                f"service {service.hostname} has no port {port}", Flag.CONNECT, service=service
            )
        if service.waypoint is not None:
            called = f"service {service.hostname}"
            via = _via_waypoint(
                state, source, original, service.waypoint, called, service=service, choose=choose
            )
            if via is not None:
                return via
        endpoints = state.workloads.find_endpoints(service.key)
        healthy = [wl for wl in endpoints if wl.is_healthy]
        candidates = [
            (wl, target)
            for wl in healthy
            if (target := _target_port(wl, service, mapping)) is not None
        ]
        if not candidates:
            reason = _no_upstream_reason(service, port, endpoints, healthy)
            return Refusal(reason, Flag.CONNECT, service=service)
        local = [c for c in candidates if c[0].node == source.node]
        pool = local or candidates
        chosen = choose([wl for wl, _ in pool])
        target_port = next(t for wl, t in pool if wl is chosen)
        if not chosen.addresses:
            # A ServiceEntry endpoint given as a DNS name: ztunnel has no cluster resolver.
            return Refusal(
                f"endpoint {chosen.hostname or chosen.name} of service {service.hostname} is a"
                " DNS name, which only a waypoint resolves (label the ServiceEntry or its"
                " namespace istio.io/use-waypoint)",
                Flag.CONNECT,
                service=service,
            )
        return _to_workload(source, original, chosen, target_port, service)

    destination = state.workloads.find_by_address(ip, source.network)
    if destination is not None:
        if destination.waypoint is not None:
            called = f"workload {destination.namespace}/{destination.name}"
            via = _via_waypoint(
                state, source, original, destination.waypoint, called, service=None, choose=choose
            )
            if via is not None:
                return via
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


def _via_waypoint(
    state: proxy_state.ProxyState,
    source: workload.Workload,
    original: tuple[str, int],
    gateway: workload.GatewayAddress,
    called: str,
    *,
    service: workload.Service | None,
    choose: Chooser[workload.Workload],
) -> OutboundPlan | Refusal | None:
    """HBONE to one healthy workload of the waypoint, the authority being what the app dialled;
    a refusal when there is none; None when the source is the waypoint itself (its own
    traffic to the destination must not loop back to it)."""
    resolved = _find_waypoint(state, gateway)
    if resolved is None:
        what = "service" if gateway.hostname is not None else "service or workload"
        return Refusal(
            f"waypoint {gateway} is unknown (no such {what}): {called} must go through it",
            Flag.CONNECT,
            service=service,
        )
    endpoints, sans = resolved
    if any(wl.uid == source.uid for wl in endpoints):
        return None
    healthy = [wl for wl in endpoints if wl.is_healthy and wl.addresses]
    if not healthy:
        why = f"none of its {len(endpoints)} is ready" if endpoints else "no pod backs it"
        return Refusal(
            f"waypoint {gateway} has no healthy endpoint ({why}): {called} must go through it",
            Flag.CONNECT,
            service=service,
        )
    local = [wl for wl in healthy if wl.node == source.node]
    chosen = choose(local or healthy)
    return OutboundPlan(
        route=Route.HBONE,  # whatever the waypoint's tunnel_protocol: it terminates HBONE
        original=original,
        target=(str(chosen.addresses[0]), gateway.hbone_mtls_port),
        authority=hbone.format_authority(original[0], original[1]),
        expected_identities=(identity_of(chosen), *sans),
        source=source,
        destination=chosen,
        service=service,
        waypoint=gateway,
    )


def _find_waypoint(
    state: proxy_state.ProxyState, gateway: workload.GatewayAddress
) -> tuple[list[workload.Workload], tuple[spiffe.SpiffeId, ...]] | None:
    """The waypoint's workloads and extra SANs: the endpoints of the Service it names (by
    namespaced hostname, or by VIP), or the one workload at its address. None if unknown."""
    if gateway.hostname is not None:
        service = state.services.find(ids.service_key(*gateway.hostname))
    else:
        assert gateway.address is not None
        network, address = gateway.address
        service = state.services.find_by_vip(address)
        if service is None:
            found = state.workloads.find_by_address(address, network)
            return ([found], ()) if found is not None else None
    if service is None:
        return None
    return state.workloads.find_endpoints(service.key), _parse_sans(service.subject_alt_names)


def _no_upstream_reason(
    service: workload.Service,
    port: int,
    endpoints: Sequence[workload.Workload],
    healthy: Sequence[workload.Workload],
) -> str:
    """Why a service call has nowhere to go, in the words a user would look for."""
    name = service.hostname
    if not endpoints:
        return f"no healthy upstream: service {name} has no endpoints (its selector matches no pod)"
    if not healthy:
        return (
            f"no healthy upstream: none of the {len(endpoints)} endpoint(s) of service {name}"
            " is ready"
        )
    return (
        f"no healthy upstream: service {name} port {port}: none of its {len(healthy)} ready"
        " endpoint(s) declares the target port (a named targetPort no container port has?)"
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
            authority=hbone.format_authority(address, port),
            expected_identities=(identity_of(destination), *sans),
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


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _parse_sans(values: tuple[str, ...]) -> tuple[spiffe.SpiffeId, ...]:
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
    # What RBAC allowed; the connection is re-checked on it whenever policies change.
    authorized: rbac.ConnectionInfo
    # Written to the app before any of the client's bytes (an application tunnel with PROXY).
    proxy_header: bytes | None = None


def build_inbound(
    state: proxy_state.ProxyState,
    local: workload.Workload,
    *,
    peer_identity: spiffe.SpiffeId | None,
    source_ip: ids.IpAddress,
    authority: str,
    method: str = "CONNECT",
    source_port: int = 0,
    local_ip: ids.IpAddress | None = None,
    is_hbone: bool = False,
) -> InboundPlan | Refusal:
    """Validate an inbound tunnel request (spec section 2, 'What the receiving ztunnel validates').

    For plaintext inbound (port 15006) the authority is the original destination ip:port and
    there is no peer identity. `is_hbone` says the request came through an HBONE tunnel: only
    then does the local workload's application tunnel apply (item 6), and with it the exception
    to the authority check (item 3): the authority need not be ours, because the connection
    still goes to our own address (`local_ip`, where the tunnel arrived) and the app reads the
    authority from the PROXY header. `source_ip:source_port` is the client as the header names it.
    """
    if method != "CONNECT":
        return Refusal(f"method {method} is not CONNECT", Flag.CONNECT, status=400)
    try:
        ip, port = _parse_authority(authority)
    except hbone.InvalidAuthorityError as exc:
        return Refusal(str(exc), Flag.CONNECT, status=400)
    tunnel = local.application_tunnel if is_hbone else None
    arrived_on = local_ip if local_ip is not None else next(iter(local.addresses), None)
    if ip in local.addresses:
        target_ip = ip
    elif tunnel is not None and arrived_on is not None:
        target_ip = arrived_on
    else:
        return Refusal(
            f"authority {authority} is not this workload's address", Flag.CONNECT, status=400
        )
    if port in ILLEGAL_PORTS:
        return Refusal(f"connection to ztunnel's own port {port}", Flag.CONNECT, status=400)
    target_port = port
    proxy_header = None
    if tunnel is not None:
        target_port = tunnel.port or port
        if target_port in ILLEGAL_PORTS:
            return Refusal(
                f"application tunnel port {target_port} is ztunnel's own", Flag.CONNECT, status=503
            )
        if tunnel.protocol is workload.AppTunnelProtocol.PROXY:
            tlvs = () if peer_identity is None else (proxyproto.Tlv.for_identity(peer_identity),)
            try:
                proxy_header = proxyproto.build_header((source_ip, source_port), (ip, port), tlvs)
            except proxyproto.ProxyProtocolLocalError as exc:
                # e.g. an IPv4 client and an IPv6 authority: one header cannot name both.
                return Refusal(f"cannot build the PROXY header: {exc}", Flag.CONNECT, status=400)
    conn = rbac.ConnectionInfo(
        source_identity=peer_identity,
        source_ip=source_ip,
        destination_ip=target_ip,
        destination_port=port,
    )
    decision = rbac.evaluate(state.policies.find_applicable(local), conn)
    if not decision.is_allowed:
        by = f" by {decision.policy}" if decision.policy else ""
        return Refusal(f"connection {decision.verdict.value}{by}", Flag.DENY, status=401)
    return InboundPlan(
        target=(str(target_ip), target_port),
        local=local,
        peer_identity=peer_identity,
        source_ip=source_ip,
        decision=decision,
        authorized=conn,
        proxy_header=proxy_header,
    )


def client_address(peer: tuple[str, int], forwarded_for: str | None) -> tuple[ids.IpAddress, int]:
    """The client of an HBONE tunnel: the connection's source address, with the port from the
    `forwarded: for=` header when that names the same IP.

    The IP comes from the TCP connection because a peer can write any header; the port only
    tells the client's connections apart (a pooled HBONE connection carries many), so taking it
    from the header when the IPs agree lets the peer misstate nothing but its own port.
    """
    ip = parse_ip(peer[0])
    if forwarded_for:
        try:
            fwd_ip, fwd_port = hbone.parse_authority(forwarded_for)
        except hbone.InvalidAuthorityError:
            return ip, peer[1]
        if fwd_ip == ip:
            return ip, fwd_port
    return ip, peer[1]
