from __future__ import annotations

from typing import Any

import pytest

from meshctl.playground import kubeproxy


def svc(
    name: str, ip: str, target: object = "http", selector: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "clusterIP": ip,
            "selector": {"app": name} if selector is None else selector,
            "ports": [{"name": "http", "port": 80, "targetPort": target}],
        },
    }


def pod(
    name: str, ip: str, app: str, *, ready: bool = True, captured: bool = False, port: int = 8080
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": app},
            "annotations": {"ambient.istio.io/redirection": "enabled"} if captured else {},
        },
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_plan_resolves_named_target_ports_and_ready_endpoints() -> None:
    plan = kubeproxy.build_plan(
        [svc("web", "10.96.0.10")],
        [
            pod("web-1", "10.244.0.5", "web"),
            pod("web-2", "10.244.1.5", "web", port=9090),
            pod("web-3", "10.244.0.9", "web", ready=False),
            pod("other", "10.244.0.7", "other"),
        ],
    )
    assert plan.ports == (
        kubeproxy.ServicePort(
            namespace="shop",
            name="web",
            port_name="http",
            protocol="tcp",
            cluster_ip="10.96.0.10",
            port=80,
            endpoints=(
                kubeproxy.Endpoint("10.244.0.5", 8080),
                kubeproxy.Endpoint("10.244.1.5", 9090),
            ),
        ),
    )
    assert plan.captured == ()


@pytest.mark.parametrize(
    ("service", "endpoints"),
    [
        pytest.param(svc("web", "None"), None, id="headless"),
        pytest.param(svc("web", "10.96.0.10", selector={}), None, id="no-selector"),
        pytest.param(
            svc("web", "10.96.0.10", target=8081),
            (kubeproxy.Endpoint("10.244.0.5", 8081),),
            id="numeric-target",
        ),
        pytest.param(svc("web", "10.96.0.10", target="grpc"), (), id="unknown-named-port"),
    ],
)
def test_plan_edge_cases(
    service: dict[str, Any], endpoints: tuple[kubeproxy.Endpoint, ...] | None
) -> None:
    plan = kubeproxy.build_plan([service], [pod("web-1", "10.244.0.5", "web")])
    if endpoints is None:
        assert plan.ports == ()
    else:
        assert plan.ports[0].endpoints == endpoints


def test_rules_skip_captured_sources_and_split_randomly() -> None:
    plan = kubeproxy.build_plan(
        [svc("web", "10.96.0.10")],
        [
            pod("web-1", "10.244.0.5", "web"),
            pod("web-2", "10.244.0.6", "web"),
            pod("web-3", "10.244.0.7", "web"),
            pod("client", "10.244.0.9", "client", captured=True),
        ],
    )
    text, chains = kubeproxy.build_restore_input(plan, existing=())
    lines = text.splitlines()
    assert lines[0] == "*nat"
    assert lines[-1] == "COMMIT"
    svc_chain = kubeproxy.chain_name("SVC", "shop", "web", "http", "tcp")
    captured = next(i for i, line in enumerate(lines) if "-s 10.244.0.9/32" in line)
    jump = next(i for i, line in enumerate(lines) if f"-j {svc_chain}" in line)
    assert captured < jump, "captured pods must RETURN before any service rule"
    assert "-j RETURN" in lines[captured]
    assert "-d 10.96.0.10/32 -p tcp -m tcp --dport 80" in lines[jump]
    split = [line for line in lines if line.startswith(f"-A {svc_chain}")]
    assert "--probability 0.3333333333" in split[0]
    assert "--probability 0.5000000000" in split[1]
    assert "statistic" not in split[2]
    dnats = sorted(line.split("--to-destination ")[1] for line in lines if "DNAT" in line)
    assert dnats == ["10.244.0.5:8080", "10.244.0.6:8080", "10.244.0.7:8080"]
    hairpins = [line for line in lines if f"-j {kubeproxy.MASQ_CHAIN}" in line]
    assert len(hairpins) == 3
    assert all("-s 10.244.0." in h for h in hairpins)
    assert svc_chain in chains
    assert kubeproxy.SERVICES_CHAIN in chains


def test_stale_chains_are_deleted_in_the_same_transaction() -> None:
    old_plan = kubeproxy.build_plan([svc("web", "10.96.0.10")], [pod("w", "10.244.0.5", "web")])
    _, old_chains = kubeproxy.build_restore_input(old_plan, ())
    text, chains = kubeproxy.build_restore_input(kubeproxy.ProxyPlan((), ()), old_chains)
    stale = sorted(old_chains - set(kubeproxy.BASE_CHAINS))
    assert stale
    for chain in stale:
        assert f":{chain} - [0:0]" in text
        assert f"-X {chain}" in text
    assert chains == frozenset(kubeproxy.BASE_CHAINS)


def test_parse_owned_chains() -> None:
    dump = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:MESHPG-SERVICES - [0:0]\n:ISTIO_POSTRT - [0:0]\nCOMMIT\n"
    )
    assert kubeproxy.parse_owned_chains(dump) == {"MESHPG-SERVICES"}


def test_chain_names_fit_iptables_limit() -> None:
    name = kubeproxy.chain_name("SEP", "a" * 63, "b" * 63, "http", "tcp", "10.244.0.5", "8080")
    assert len(name) <= 28
