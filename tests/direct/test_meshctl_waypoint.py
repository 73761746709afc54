"""`meshctl waypoint apply/delete` against the local API server with the waypoint deployer
running: the Gateway, the namespace label, the wait and its progress, and clear errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from controller.sources.local import waypoints
from meshcore.kube import objects, resources
from tests.direct import meshctl_harness

SETTINGS = waypoints.WaypointSettings(
    command=("/bin/false",),
    xds_address="unix:///nowhere/xds.sock",
    trust_domain="cluster.local",
    cluster_id="Kubernetes",
    domain="cluster.local",
)


@pytest.fixture
def playground() -> Iterator[meshctl_harness.Playground]:
    p = meshctl_harness.Playground()
    deployer = waypoints.WaypointDeployer(p.store, SETTINGS)
    task = asyncio.run_coroutine_threadsafe(deployer.run(), p._loop)
    try:
        p.store.create(resources.NAMESPACES, {"metadata": {"name": "shop"}})
        yield p
    finally:
        task.cancel()
        p.close()


def test_apply_without_wait_creates_the_gateway_and_labels_the_namespace(
    playground: meshctl_harness.Playground,
) -> None:
    code, out, err = playground.meshctl("waypoint", "apply", "-n", "shop", "--no-wait")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["waypoint shop/waypoint created", "namespace/shop labeled"]
    gateway = playground.store.get(resources.GATEWAYS, "waypoint", "shop")
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gateway["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    assert objects.labels(gateway)["istio.io/waypoint-for"] == "service"  # the default
    namespace = playground.store.get(resources.NAMESPACES, "shop")
    assert objects.labels(namespace)["istio.io/use-waypoint"] == "waypoint"

    # Applying again changes nothing; delete takes the label and the Gateway away.
    code, out, _ = playground.meshctl("waypoint", "apply", "-n", "shop", "--no-wait")
    assert code == 0
    assert out.splitlines()[0] == "waypoint shop/waypoint unchanged"
    code, out, _ = playground.meshctl("waypoint", "delete", "-n", "shop")
    assert code == 0
    assert out.splitlines() == ["namespace/shop unlabeled", "waypoint shop/waypoint deleted"]
    assert playground.store.find(resources.GATEWAYS, "waypoint", "shop") is None
    namespace = playground.store.get(resources.NAMESPACES, "shop")
    assert "istio.io/use-waypoint" not in objects.labels(namespace)


def test_wait_says_what_it_waits_for_and_leaves_the_namespace_alone_on_timeout(
    playground: meshctl_harness.Playground,
) -> None:
    # No kubelet runs here: the waypoint's pod never becomes ready.
    code, out, err = playground.meshctl(
        "waypoint", "apply", "-n", "shop", "--name", "wp", "--timeout", "0.5"
    )
    assert code == 1
    assert out.splitlines() == ["waypoint shop/wp created"]
    assert "waiting for waypoint shop/wp: waiting for the waypoint's pod to be ready" in err
    assert "timed out after 0.5s waiting for waypoint shop/wp to be ready" in err
    # Not labelled: the namespace's traffic does not depend on a waypoint that is not serving.
    namespace = playground.store.get(resources.NAMESPACES, "shop")
    assert "istio.io/use-waypoint" not in objects.labels(namespace)
    # The deployer made its Deployment and Service.
    assert playground.store.find(resources.DEPLOYMENTS, "wp", "shop") is not None
    assert playground.store.find(resources.SERVICES, "wp", "shop") is not None


def test_a_name_held_by_a_stranger_fails_at_once(playground: meshctl_harness.Playground) -> None:
    playground.store.create(
        resources.SERVICES,
        {"metadata": {"name": "waypoint", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}},
        "shop",
    )
    code, _, err = playground.meshctl("waypoint", "apply", "-n", "shop", "--timeout", "30")
    assert code == 1
    assert "waypoint shop/waypoint cannot run: a Service named 'waypoint' already exists" in err


def test_unknown_namespace(playground: meshctl_harness.Playground) -> None:
    code, out, err = playground.meshctl("waypoint", "apply", "-n", "nope")
    assert (code, out) == (1, "")
    assert err == 'error: namespace "nope" not found\n'


def test_for_says_what_traffic_the_waypoint_serves(
    playground: meshctl_harness.Playground, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = playground.meshctl(
        "waypoint", "apply", "-n", "shop", "--no-wait", "--for", "all"
    )
    assert (code, err) == (0, "")
    gateway = playground.store.get(resources.GATEWAYS, "waypoint", "shop")
    assert objects.labels(gateway)["istio.io/waypoint-for"] == "all"
    code, _, _ = playground.meshctl("waypoint", "apply", "-n", "shop", "--for", "pods")
    assert code == 2
    assert "argument --for: invalid choice: 'pods'" in capsys.readouterr().err  # argparse's
