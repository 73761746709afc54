from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

import pytest

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
from meshcore.wire import proxyproto
from ztunnel.proxy import routing
from ztunnel.state import proxy_state

SVC = ids.service_key("shop", "catalog.shop.svc.cluster.local")


def _wl(
    name: str,
    ip: str,
    *,
    node: str = "n1",
    hbone: bool = True,
    healthy: bool = True,
    bound: bool = True,
    target: int = 8080,
    sa: str = "default",
) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("shop", name),
        name=name,
        namespace="shop",
        addresses=(ipaddress.ip_address(ip),),
        node=node,
        service_account=sa,
        tunnel_protocol=workload.TunnelProtocol.HBONE if hbone else workload.TunnelProtocol.NONE,
        status=workload.WorkloadStatus.HEALTHY if healthy else workload.WorkloadStatus.UNHEALTHY,
        services=(workload.ServiceBinding(SVC, (workload.PortMapping(80, target),)),)
        if bound
        else (),
    )


def _state(*wls: workload.Workload, vip: str = "10.96.0.10") -> proxy_state.ProxyState:
    state = proxy_state.ProxyState()
    for wl in wls:
        state.workloads.insert(wl)
    state.services.insert(
        workload.Service(
            name="catalog",
            namespace="shop",
            hostname="catalog.shop.svc.cluster.local",
            addresses=(ipaddress.ip_address(vip),),
            ports=(workload.PortMapping(80, 8080),),
        )
    )
    return state


def _first(items: Sequence[workload.Workload]) -> workload.Workload:
    return items[0]


CLIENT = _wl("client", "10.244.1.2", bound=False)


@pytest.mark.parametrize(
    ("endpoints", "dst", "route", "target", "authority"),
    [
        (
            [_wl("a", "10.244.1.5")],
            ("10.96.0.10", 80),
            "hbone",
            ("10.244.1.5", 15008),
            "10.244.1.5:8080",
        ),
        (
            [_wl("a", "10.244.1.5", hbone=False)],
            ("10.96.0.10", 80),
            "passthrough",
            ("10.244.1.5", 8080),
            None,
        ),
        (
            [_wl("a", "10.244.1.5")],
            ("10.244.1.5", 9090),
            "hbone",
            ("10.244.1.5", 15008),
            "10.244.1.5:9090",
        ),
        (
            [_wl("a", "10.244.1.5", hbone=False)],
            ("10.244.1.5", 9090),
            "passthrough",
            ("10.244.1.5", 9090),
            None,
        ),
        ([], ("192.0.2.7", 443), "passthrough", ("192.0.2.7", 443), None),
        (
            [_wl("a", "10.244.1.5", target=0)],
            ("10.96.0.10", 80),
            "hbone",
            ("10.244.1.5", 15008),
            "10.244.1.5:8080",
        ),
    ],
    ids=[
        "vip-to-hbone-endpoint",
        "vip-to-plain-endpoint",
        "pod-ip-hbone",
        "pod-ip-plain",
        "outside-mesh",
        "named-port-falls-back-to-service-target",
    ],
)
def test_outbound_plan(
    endpoints: list[workload.Workload],
    dst: tuple[str, int],
    route: str,
    target: tuple[str, int],
    authority: str | None,
) -> None:
    plan = routing.build_outbound(_state(CLIENT, *endpoints), CLIENT, dst, choose=_first)
    assert isinstance(plan, routing.OutboundPlan)
    assert plan.route.value == route
    assert plan.target == target
    assert plan.authority == authority
    if route == "hbone":
        assert plan.expected_identities == (endpoints[0].identity,)


@pytest.mark.parametrize(
    ("endpoints", "dst", "reason"),
    [
        (
            [],
            ("10.96.0.10", 80),
            "service catalog.shop.svc.cluster.local has no endpoints (its selector matches no pod)",
        ),
        (
            [_wl("a", "10.244.1.5", healthy=False)],
            ("10.96.0.10", 80),
            "none of the 1 endpoint(s) of service catalog.shop.svc.cluster.local is ready",
        ),
        (
            [
                dataclasses.replace(
                    _wl("a", "10.244.1.5"), services=(workload.ServiceBinding(SVC, ()),)
                )
            ],
            ("10.96.0.10", 80),
            "port 80: none of its 1 ready endpoint(s) declares the target port",
        ),
        ([_wl("a", "10.244.1.5")], ("10.96.0.10", 81), "has no port 81"),
        ([], ("127.0.0.1", 15001), "ztunnel's own port 15001"),
        (
            [
                dataclasses.replace(
                    _wl("a", "10.244.1.5", hbone=False), addresses=(), hostname="api.internal"
                )
            ],
            ("10.96.0.10", 80),
            "endpoint api.internal of service catalog.shop.svc.cluster.local is a DNS name",
        ),
    ],
    ids=[
        "no-endpoints",
        "only-unhealthy",
        "unresolved-named-port",
        "unknown-service-port",
        "self-call",
        "dns-endpoint-needs-a-waypoint",
    ],
)
def test_outbound_refusals(
    endpoints: list[workload.Workload], dst: tuple[str, int], reason: str
) -> None:
    plan = routing.build_outbound(_state(CLIENT, *endpoints), CLIENT, dst, choose=_first)
    assert isinstance(plan, routing.Refusal)
    assert reason in plan.reason
    if dst[0] == "10.96.0.10":  # a service call: telemetry can name the service
        assert plan.service is not None
        assert plan.service.hostname == "catalog.shop.svc.cluster.local"


def test_outbound_prefers_same_node() -> None:
    far = _wl("far", "10.244.2.5", node="n2")
    near = _wl("near", "10.244.1.5", node="n1")
    seen: list[list[str]] = []

    def choose(items: Sequence[workload.Workload]) -> workload.Workload:
        seen.append([w.name for w in items])
        return items[0]

    plan = routing.build_outbound(
        _state(CLIENT, far, near), CLIENT, ("10.96.0.10", 80), choose=choose
    )
    assert isinstance(plan, routing.OutboundPlan)
    assert seen == [["near"]]


SERVER = _wl("server", "10.244.1.5", sa="catalog")
WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


@pytest.mark.parametrize(
    ("authority", "method", "status"),
    [
        ("10.244.1.6:8080", "CONNECT", 400),
        ("not-an-address", "CONNECT", 400),
        ("10.244.1.5:15008", "CONNECT", 400),
        ("10.244.1.5:8080", "GET", 400),
    ],
    ids=["ip-mismatch", "bad-authority", "illegal-port", "not-connect"],
)
def test_inbound_rejections(authority: str, method: str, status: int) -> None:
    plan = routing.build_inbound(
        _state(SERVER),
        SERVER,
        peer_identity=WEB,
        source_ip=ipaddress.ip_address("10.244.1.2"),
        authority=authority,
        method=method,
    )
    assert isinstance(plan, routing.Refusal)
    assert plan.status == status


def test_inbound_allowed_without_policies() -> None:
    plan = routing.build_inbound(
        _state(SERVER),
        SERVER,
        peer_identity=WEB,
        source_ip=ipaddress.ip_address("10.244.1.2"),
        authority="10.244.1.5:8080",
    )
    assert isinstance(plan, routing.InboundPlan)
    assert plan.target == ("10.244.1.5", 8080)


def test_inbound_denied_by_policy_is_401() -> None:
    state = _state(SERVER)
    state.policies.insert(
        authorization.Authorization(
            name="deny-web",
            namespace="shop",
            scope=authorization.Scope.NAMESPACE,
            action=authorization.Action.DENY,
            rules=(
                authorization.Rule(
                    (
                        authorization.Clause(
                            (
                                authorization.Match(
                                    principals=(
                                        authorization.StringMatch.from_pattern(WEB.principal),
                                    )
                                ),
                            )
                        ),
                    )
                ),
            ),
        )
    )
    plan = routing.build_inbound(
        state,
        SERVER,
        peer_identity=WEB,
        source_ip=ipaddress.ip_address("10.244.1.2"),
        authority="10.244.1.5:8080",
    )
    assert isinstance(plan, routing.Refusal)
    assert plan.status == 401
    assert plan.flag is routing.Flag.DENY
    assert "shop/deny-web" in plan.reason


def test_rbac_order_deny_then_allow() -> None:
    conn = rbac.ConnectionInfo(
        WEB, ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"), 80
    )
    everything = (authorization.Rule(()),)
    allow = authorization.Authorization(
        "a", "shop", authorization.Scope.NAMESPACE, authorization.Action.ALLOW, everything
    )
    deny = authorization.Authorization(
        "d", "shop", authorization.Scope.NAMESPACE, authorization.Action.DENY, everything
    )
    never = authorization.Authorization(
        "n", "shop", authorization.Scope.NAMESPACE, authorization.Action.ALLOW, ()
    )
    assert rbac.evaluate([allow, deny], conn).verdict is rbac.Verdict.EXPLICITLY_DENIED
    assert rbac.evaluate([allow], conn).is_allowed
    assert rbac.evaluate([never], conn).verdict is rbac.Verdict.NOT_ALLOWED
    assert rbac.evaluate([], conn).is_allowed


# --- application tunnel (spec section 2, items 3 and 6) ---

CLIENT_IP = ipaddress.ip_address("10.244.1.2")
PROXY_TUNNEL = workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088)


def _tunnelled(tunnel: workload.ApplicationTunnel | None = PROXY_TUNNEL) -> workload.Workload:
    return dataclasses.replace(SERVER, application_tunnel=tunnel)


def _inbound(
    local: workload.Workload,
    authority: str = "10.244.1.5:8080",
    *,
    is_hbone: bool = True,
    state: proxy_state.ProxyState | None = None,
    peer_identity: spiffe.SpiffeId | None = WEB,
    source_ip: ids.IpAddress = CLIENT_IP,
    local_ip: str | None = "10.244.1.5",
) -> routing.InboundPlan | routing.Refusal:
    return routing.build_inbound(
        state or _state(local),
        local,
        peer_identity=peer_identity,
        source_ip=source_ip,
        source_port=41000,
        authority=authority,
        local_ip=ipaddress.ip_address(local_ip) if local_ip else None,
        is_hbone=is_hbone,
    )


def test_proxy_tunnel_goes_to_the_tunnel_port_with_a_header() -> None:
    plan = _inbound(_tunnelled())
    assert isinstance(plan, routing.InboundPlan)
    assert plan.target == ("10.244.1.5", 15088)
    assert plan.proxy_header is not None
    # Exactly what ztunnel writes: client -> HBONE target, and the client's SPIFFE ID in 0xD0.
    assert plan.proxy_header == proxyproto.build_header(
        (CLIENT_IP, 41000),
        (ipaddress.ip_address("10.244.1.5"), 8080),
        [proxyproto.Tlv(0xD0, b"spiffe://cluster.local/ns/shop/sa/web")],
    )
    header, rest = proxyproto.parse_header(plan.proxy_header)
    assert header.source == (CLIENT_IP, 41000)
    assert header.destination == (ipaddress.ip_address("10.244.1.5"), 8080)
    assert header.source_identity == WEB
    assert rest == b""


@pytest.mark.parametrize(
    ("tunnel", "is_hbone", "target", "has_header"),
    [
        pytest.param(None, True, ("10.244.1.5", 8080), False, id="no-tunnel"),
        pytest.param(PROXY_TUNNEL, False, ("10.244.1.5", 8080), False, id="plaintext-ignores-it"),
        pytest.param(
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY),
            True,
            ("10.244.1.5", 8080),
            True,
            id="proxy-on-the-same-port",
        ),
        pytest.param(
            workload.ApplicationTunnel(workload.AppTunnelProtocol.NONE, 9000),
            True,
            ("10.244.1.5", 9000),
            False,
            id="none-only-moves-the-port",
        ),
    ],
)
def test_tunnel_target_and_header(
    tunnel: workload.ApplicationTunnel | None,
    is_hbone: bool,
    target: tuple[str, int],
    has_header: bool,
) -> None:
    plan = _inbound(_tunnelled(tunnel), is_hbone=is_hbone)
    assert isinstance(plan, routing.InboundPlan)
    assert plan.target == target
    assert (plan.proxy_header is not None) is has_header


def test_authority_of_another_address_is_allowed_only_with_a_tunnel() -> None:
    # A waypoint-style authority (a service VIP): the connection still goes to our own
    # address, and the app learns the VIP from the header.
    plan = _inbound(_tunnelled(), "10.96.0.10:80")
    assert isinstance(plan, routing.InboundPlan)
    assert plan.target == ("10.244.1.5", 15088)
    assert plan.proxy_header is not None
    header, _ = proxyproto.parse_header(plan.proxy_header)
    assert header.destination == (ipaddress.ip_address("10.96.0.10"), 80)

    for local, is_hbone in ((_tunnelled(None), True), (_tunnelled(), False)):
        refused = _inbound(local, "10.96.0.10:80", is_hbone=is_hbone)
        assert isinstance(refused, routing.Refusal)
        assert refused.status == 400
        assert "not this workload's address" in refused.reason


def test_authority_exception_targets_the_address_the_tunnel_arrived_on() -> None:
    dual = dataclasses.replace(
        _tunnelled(), addresses=(ipaddress.ip_address("10.244.1.5"), ipaddress.ip_address("fd::5"))
    )
    plan = _inbound(dual, "[fd::99]:80", local_ip="fd::5", source_ip=ipaddress.ip_address("fd::2"))
    assert isinstance(plan, routing.InboundPlan)
    assert plan.target == ("fd::5", 15088)
    without_local_ip = _inbound(
        dual, "[fd::99]:80", local_ip=None, source_ip=ipaddress.ip_address("fd::2")
    )
    assert isinstance(without_local_ip, routing.InboundPlan)
    assert without_local_ip.target == ("10.244.1.5", 15088)  # the workload's first address


@pytest.mark.parametrize(
    ("tunnel", "authority", "status", "reason"),
    [
        pytest.param(PROXY_TUNNEL, "10.244.1.5:15008", 400, "own port", id="authority-15008"),
        pytest.param(
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15006),
            "10.244.1.5:8080",
            503,
            "application tunnel port 15006",
            id="tunnel-port-15006",
        ),
        pytest.param(PROXY_TUNNEL, "[fd::1]:80", 400, "PROXY header", id="mixed-families"),
    ],
)
def test_tunnel_refusals(
    tunnel: workload.ApplicationTunnel, authority: str, status: int, reason: str
) -> None:
    refused = _inbound(_tunnelled(tunnel), authority)
    assert isinstance(refused, routing.Refusal)
    assert refused.status == status
    assert reason in refused.reason


def test_plaintext_carries_no_identity_header() -> None:
    plan = _inbound(_tunnelled(), is_hbone=False, peer_identity=None)
    assert isinstance(plan, routing.InboundPlan)
    assert plan.proxy_header is None
    assert plan.target == ("10.244.1.5", 8080)


def test_policies_see_the_requested_port_not_the_tunnel_port() -> None:
    local = _tunnelled()
    state = _state(local)
    state.policies.insert(
        authorization.Authorization(
            name="deny-8080",
            namespace="shop",
            scope=authorization.Scope.NAMESPACE,
            action=authorization.Action.DENY,
            rules=(
                authorization.Rule(
                    (authorization.Clause((authorization.Match(destination_ports=(8080,)),)),)
                ),
            ),
        )
    )
    refused = _inbound(local, state=state)
    assert isinstance(refused, routing.Refusal)
    assert refused.status == 401
    allowed = _inbound(local, "10.244.1.5:9090", state=state)
    assert isinstance(allowed, routing.InboundPlan)
    assert allowed.target == ("10.244.1.5", 15088)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        pytest.param(("10.0.0.1", 5000), None, ("10.0.0.1", 5000), id="no-header"),
        pytest.param(("10.0.0.1", 5000), "10.0.0.1:41000", ("10.0.0.1", 41000), id="same-ip"),
        pytest.param(("10.0.0.1", 5000), "10.9.9.9:41000", ("10.0.0.1", 5000), id="other-ip"),
        pytest.param(("10.0.0.1", 5000), "_hidden", ("10.0.0.1", 5000), id="obfuscated"),
        pytest.param(("10.0.0.1", 5000), "10.0.0.1", ("10.0.0.1", 5000), id="no-port"),
        pytest.param(("fd::1", 5000), "[fd::1]:41000", ("fd::1", 41000), id="ipv6"),
    ],
)
def test_client_address_trusts_only_the_connection_ip(
    peer: tuple[str, int], forwarded: str | None, expected: tuple[str, int]
) -> None:
    ip, port = routing.client_address(peer, forwarded)
    assert (str(ip), port) == expected


# --- waypoints (spec 5.2 decision order; the authority is what the app dialled) ---

WP_HOST = "waypoint.shop.svc.cluster.local"
WP_SVC = ids.service_key("shop", WP_HOST)
WP = workload.GatewayAddress(hostname=("shop", WP_HOST))
WP_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
WP_SAN = "spiffe://cluster.local/ns/shop/sa/waypoint-canary"


def _waypoint_pod(
    name: str, ip: str, *, node: str = "n1", healthy: bool = True
) -> workload.Workload:
    # Not captured (dataplane-mode none): its tunnel protocol is NONE, yet it is reached by HBONE.
    return dataclasses.replace(
        _wl(name, ip, node=node, hbone=False, healthy=healthy, sa="waypoint"),
        services=(workload.ServiceBinding(WP_SVC, (workload.PortMapping(15008, 15008),)),),
    )


def _waypoint_state(
    *wls: workload.Workload,
    waypoint: workload.GatewayAddress | None = WP,
    vip: str = "10.96.0.10",
    sans: tuple[str, ...] = (),
) -> proxy_state.ProxyState:
    state = _state(*wls, vip=vip)
    catalog = state.services.find_by_vip(ipaddress.ip_address(vip))
    assert catalog is not None
    state.services.insert(dataclasses.replace(catalog, waypoint=waypoint))
    state.services.insert(
        workload.Service(
            name="waypoint",
            namespace="shop",
            hostname=WP_HOST,
            addresses=(ipaddress.ip_address("10.96.0.20"),),
            ports=(workload.PortMapping(15008, 15008),),
            subject_alt_names=sans,
        )
    )
    return state


WP_POD = _waypoint_pod("waypoint-0", "10.244.1.20")
SERVER_WITH_WP = dataclasses.replace(_wl("a", "10.244.1.5"), waypoint=WP)


@pytest.mark.parametrize(
    ("state", "dst", "target", "authority", "service", "destination"),
    [
        pytest.param(
            _waypoint_state(CLIENT, _wl("a", "10.244.1.5"), WP_POD),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="vip-goes-to-the-waypoint",
        ),
        pytest.param(
            _waypoint_state(CLIENT, WP_POD),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="service-endpoints-are-the-waypoints-business",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                WP_POD,
                waypoint=workload.GatewayAddress(hostname=WP.hostname, hbone_mtls_port=15009),
            ),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15009),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="hbone-mtls-port",
        ),
        pytest.param(
            _waypoint_state(CLIENT, WP_POD, vip="fd00:96::a"),
            ("fd00:96::a", 80),
            ("10.244.1.20", 15008),
            "[fd00:96::a]:80",
            "catalog",
            "waypoint-0",
            id="ipv6-vip-authority",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                WP_POD,
                waypoint=workload.GatewayAddress(address=("", ipaddress.ip_address("10.96.0.20"))),
            ),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="address-naming-the-waypoint-vip",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                WP_POD,
                waypoint=workload.GatewayAddress(address=("", ipaddress.ip_address("10.244.1.20"))),
            ),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="address-naming-the-waypoint-pod",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                WP_POD,
                _waypoint_pod("waypoint-1", "10.244.1.21", healthy=False),
                _waypoint_pod("waypoint-2", "10.244.2.22", node="n2"),
            ),
            ("10.96.0.10", 80),
            ("10.244.1.20", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-0",
            id="healthy-same-node-waypoint-first",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                _waypoint_pod("waypoint-1", "10.244.1.21", healthy=False),
                _waypoint_pod("waypoint-2", "10.244.2.22", node="n2"),
            ),
            ("10.96.0.10", 80),
            ("10.244.2.22", 15008),
            "10.96.0.10:80",
            "catalog",
            "waypoint-2",
            id="else-another-node",
        ),
        pytest.param(
            _waypoint_state(CLIENT, SERVER_WITH_WP, WP_POD, waypoint=None),
            ("10.244.1.5", 9090),
            ("10.244.1.20", 15008),
            "10.244.1.5:9090",
            None,
            "waypoint-0",
            id="pod-ip-goes-to-the-workload-waypoint",
        ),
        pytest.param(
            _waypoint_state(CLIENT, SERVER_WITH_WP, WP_POD, waypoint=None),
            ("10.96.0.10", 80),
            ("10.244.1.5", 15008),
            "10.244.1.5:8080",
            "catalog",
            "a",
            id="service-traffic-never-detours-to-a-workload-waypoint",
        ),
    ],
)
def test_outbound_through_waypoint(
    state: proxy_state.ProxyState,
    dst: tuple[str, int],
    target: tuple[str, int],
    authority: str,
    service: str | None,
    destination: str,
) -> None:
    plan = routing.build_outbound(state, CLIENT, dst, choose=_first)
    assert isinstance(plan, routing.OutboundPlan)
    assert plan.route is routing.Route.HBONE
    assert plan.original == dst
    assert plan.target == target
    assert plan.authority == authority
    assert (plan.service.name if plan.service else None) == service
    assert plan.destination is not None
    assert plan.destination.name == destination
    assert plan.expected_identities == (plan.destination.identity,)
    is_waypoint = destination.startswith("waypoint")
    assert (plan.waypoint is not None) is is_waypoint
    if is_waypoint:
        assert plan.destination.identity == WP_ID


def test_waypoint_service_sans_are_expected_too() -> None:
    state = _waypoint_state(CLIENT, WP_POD, sans=(WP_SAN, "not-a-spiffe-id"))
    plan = routing.build_outbound(state, CLIENT, ("10.96.0.10", 80), choose=_first)
    assert isinstance(plan, routing.OutboundPlan)
    assert plan.expected_identities == (WP_ID, spiffe.SpiffeId.parse(WP_SAN))


def test_the_waypoint_itself_goes_direct() -> None:
    """Its own connections to the service must not come back to it (waypoints are not
    captured, so this guards a misconfiguration rather than a normal path)."""
    state = _waypoint_state(WP_POD, _wl("a", "10.244.1.5"))
    plan = routing.build_outbound(state, WP_POD, ("10.96.0.10", 80), choose=_first)
    assert isinstance(plan, routing.OutboundPlan)
    assert plan.target == ("10.244.1.5", 15008)
    assert plan.waypoint is None


@pytest.mark.parametrize(
    ("state", "dst", "reason", "service"),
    [
        pytest.param(
            _waypoint_state(
                CLIENT,
                _wl("a", "10.244.1.5"),
                waypoint=workload.GatewayAddress(
                    hostname=("shop", "missing.shop.svc.cluster.local")
                ),
            ),
            ("10.96.0.10", 80),
            "waypoint shop/missing (missing.shop.svc.cluster.local) is unknown (no such service):"
            " service catalog.shop.svc.cluster.local must go through it",
            "catalog",
            id="unknown-waypoint",
        ),
        pytest.param(
            _waypoint_state(CLIENT, _wl("a", "10.244.1.5")),
            ("10.96.0.10", 80),
            "waypoint shop/waypoint (waypoint.shop.svc.cluster.local) has no healthy endpoint"
            " (no pod backs it)",
            "catalog",
            id="waypoint-without-pods",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT, _wl("a", "10.244.1.5"), _waypoint_pod("w", "10.244.1.20", healthy=False)
            ),
            ("10.96.0.10", 80),
            "waypoint shop/waypoint (waypoint.shop.svc.cluster.local) has no healthy endpoint"
            " (none of its 1 is ready)",
            "catalog",
            id="waypoint-not-ready",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                _wl("a", "10.244.1.5"),
                waypoint=workload.GatewayAddress(address=("", ipaddress.ip_address("10.9.9.9"))),
            ),
            ("10.96.0.10", 80),
            "waypoint 10.9.9.9 is unknown (no such service or workload)",
            "catalog",
            id="unknown-waypoint-address",
        ),
        pytest.param(
            _waypoint_state(
                CLIENT,
                dataclasses.replace(
                    _wl("a", "10.244.1.5"),
                    waypoint=workload.GatewayAddress(hostname=("shop", "gone.shop.svc.x")),
                ),
                waypoint=None,
            ),
            ("10.244.1.5", 8080),
            "waypoint shop/gone (gone.shop.svc.x) is unknown (no such service):"
            " workload shop/a must go through it",
            None,
            id="pod-ip-with-unknown-workload-waypoint",
        ),
    ],
)
def test_outbound_waypoint_refusals_never_fall_back_to_direct(
    state: proxy_state.ProxyState, dst: tuple[str, int], reason: str, service: str | None
) -> None:
    plan = routing.build_outbound(state, CLIENT, dst, choose=_first)
    assert isinstance(plan, routing.Refusal)
    assert reason in plan.reason
    assert plan.flag is routing.Flag.CONNECT
    assert (plan.service.name if plan.service else None) == service


def test_inbound_from_the_waypoint_is_checked_against_the_waypoints_identity() -> None:
    """The waypoint re-originates HBONE with the pod's own ip:port as the authority; L4 policy
    at the destination then sees the waypoint as the source (spec 6: waypoints)."""
    state = _state(SERVER)
    state.policies.insert(
        authorization.Authorization(
            name="only-the-waypoint",
            namespace="shop",
            scope=authorization.Scope.NAMESPACE,
            action=authorization.Action.ALLOW,
            rules=(
                authorization.Rule(
                    (
                        authorization.Clause(
                            (
                                authorization.Match(
                                    principals=(
                                        authorization.StringMatch.from_pattern(WP_ID.principal),
                                    )
                                ),
                            )
                        ),
                    )
                ),
            ),
        )
    )
    from_waypoint = _inbound(
        SERVER, is_hbone=True, state=state, peer_identity=WP_ID, source_ip=WP_POD.addresses[0]
    )
    assert isinstance(from_waypoint, routing.InboundPlan)
    assert from_waypoint.target == ("10.244.1.5", 8080)
    assert from_waypoint.peer_identity == WP_ID
    direct = _inbound(SERVER, is_hbone=True, state=state, peer_identity=WEB)
    assert isinstance(direct, routing.Refusal)
    assert direct.status == 401
