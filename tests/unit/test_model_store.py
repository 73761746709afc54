from __future__ import annotations

import dataclasses
import ipaddress

from meshcore.model import authorization, ids, store, workload


def _pod(
    name: str, ip: str, *, node: str = "n1", services: tuple[str, ...] = ()
) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("shop", name),
        name=name,
        namespace="shop",
        addresses=(ipaddress.ip_address(ip),),
        node=node,
        services=tuple(
            workload.ServiceBinding(ids.ServiceKey(s), (workload.PortMapping(80, 8080),))
            for s in services
        ),
    )


def test_reinsert_moves_secondary_indexes() -> None:
    wls = store.WorkloadStore()
    wls.insert(_pod("a", "10.0.0.1", services=("shop/x",)))
    wls.insert(_pod("a", "10.0.0.2", node="n2"))
    assert wls.find_by_address(ipaddress.ip_address("10.0.0.1")) is None
    found = wls.find_by_address(ipaddress.ip_address("10.0.0.2"))
    assert found is not None
    assert found.node == "n2"
    assert wls.find_endpoints(ids.ServiceKey("shop/x")) == []
    assert wls.find_local("n1", "shop", "default") == []
    assert [w.name for w in wls.find_local("n2", "shop", "default")] == ["a"]


def test_remove_keeps_address_of_newer_owner() -> None:
    wls = store.WorkloadStore()
    wls.insert(_pod("old", "10.0.0.1"))
    wls.insert(_pod("new", "10.0.0.1"))  # IP reused by a new pod before the old one was removed
    wls.remove(ids.pod_uid("shop", "old"))
    owner = wls.find_by_address(ipaddress.ip_address("10.0.0.1"))
    assert owner is not None
    assert owner.name == "new"


def test_endpoints_sorted_by_uid() -> None:
    wls = store.WorkloadStore()
    for name, ip in (("c", "10.0.0.3"), ("a", "10.0.0.1"), ("b", "10.0.0.2")):
        wls.insert(_pod(name, ip, services=("shop/x",)))
    assert [w.name for w in wls.find_endpoints(ids.ServiceKey("shop/x"))] == ["a", "b", "c"]


def test_service_vip_index() -> None:
    svcs = store.ServiceStore()
    svc = workload.Service(
        name="x",
        namespace="shop",
        hostname=ids.service_hostname("x", "shop"),
        addresses=(ipaddress.ip_address("10.96.0.10"),),
        ports=(workload.PortMapping(80, 8080),),
    )
    svcs.insert(svc)
    assert svcs.find_by_vip(ipaddress.ip_address("10.96.0.10")) == svc
    svcs.remove(svc.key)
    assert svcs.find_by_vip(ipaddress.ip_address("10.96.0.10")) is None
    assert svcs.find_by_hostname(svc.hostname) == []


def test_applicable_policies_by_scope() -> None:
    policies = store.PolicyStore()

    def pol(ns: str, name: str, scope: authorization.Scope) -> authorization.Authorization:
        return authorization.Authorization(name, ns, scope, authorization.Action.ALLOW, ())

    policies.insert(pol("istio-system", "mesh", authorization.Scope.GLOBAL))
    policies.insert(pol("shop", "ns", authorization.Scope.NAMESPACE))
    policies.insert(pol("other", "ns", authorization.Scope.NAMESPACE))
    policies.insert(pol("shop", "sel", authorization.Scope.WORKLOAD_SELECTOR))
    policies.insert(pol("shop", "sel2", authorization.Scope.WORKLOAD_SELECTOR))
    wl = dataclasses.replace(
        _pod("a", "10.0.0.1"),
        authorization_policies=(ids.PolicyKey("shop/sel"), ids.PolicyKey("shop/missing")),
    )
    names = [p.key for p in policies.find_applicable(wl)]
    assert names == ["istio-system/mesh", "shop/ns", "shop/sel"]


def test_string_match_patterns() -> None:
    sm = authorization.StringMatch.from_pattern
    assert sm("*").matches("x")
    assert not sm("*").matches("")
    assert sm("cluster.local/*").matches("cluster.local/ns/a/sa/b")
    assert sm("*/sa/web").matches("cluster.local/ns/a/sa/web")
    assert not sm("exact").matches("exactly")
    assert not sm("*").matches(None)
