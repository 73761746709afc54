from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
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
        ([], ("10.96.0.10", 80), "no healthy upstream for service catalog.shop.svc.cluster.local"),
        ([_wl("a", "10.244.1.5", healthy=False)], ("10.96.0.10", 80), "no healthy upstream"),
        ([_wl("a", "10.244.1.5")], ("10.96.0.10", 81), "has no port 81"),
        ([], ("127.0.0.1", 15001), "ztunnel's own port 15001"),
    ],
    ids=["no-endpoints", "only-unhealthy", "unknown-service-port", "self-call"],
)
def test_outbound_refusals(
    endpoints: list[workload.Workload], dst: tuple[str, int], reason: str
) -> None:
    plan = routing.build_outbound(_state(CLIENT, *endpoints), CLIENT, dst, choose=_first)
    assert isinstance(plan, routing.Refusal)
    assert reason in plan.reason


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
