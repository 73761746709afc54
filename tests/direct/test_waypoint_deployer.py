"""The waypoint deployer against a real ObjectStore: a Gateway of class istio-waypoint gets its
Deployment and Service, keeps them as it wants them, and takes them along when it goes."""

from __future__ import annotations

import asyncio
import copy
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from controller.sources.local import kinds, persistence, store, waypoints
from meshcore.kube import objects, resources
from tests.direct import store_harness

NS = "shop"
SETTINGS = waypoints.WaypointSettings(
    command=("/usr/bin/python3", "-m", "waypoint"),
    xds_address="unix:///run/mesh/xds.sock",
    trust_domain="cluster.local",
    cluster_id="Kubernetes",
    domain="cluster.local",
)


def gateway(name: str = "waypoint", class_name: str = "istio-waypoint") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "gatewayClassName": class_name,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


@pytest.fixture
def st() -> Iterator[store.ObjectStore]:
    directory = tempfile.mkdtemp(prefix="wpdeploy-")
    object_store = store.ObjectStore(
        kinds.build_registry(), store_persistence=persistence.FilePersistence(directory)
    )
    object_store.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    try:
        yield object_store
    finally:
        object_store.close()
        shutil.rmtree(directory, ignore_errors=True)


def _find(st: store.ObjectStore, rtype: resources.ResourceType, name: str = "waypoint") -> Any:
    return st.find(rtype, name, NS)


def _condition(st: store.ObjectStore, kind: str, name: str = "waypoint") -> dict[str, Any]:
    gw = _find(st, resources.GATEWAYS, name) or {}
    for condition in (gw.get("status") or {}).get("conditions") or ():
        if condition["type"] == kind:
            return dict(condition)
    return {}


def test_pure_deployment_is_a_waypoint_pod_with_a_token_volume() -> None:
    gw = {**gateway(), "metadata": {**gateway()["metadata"], "uid": "gw-uid"}}
    dep = waypoints.build_deployment(gw, SETTINGS)
    template = dep["spec"]["template"]
    assert template["metadata"]["labels"] == {
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "istio.io/dataplane-mode": "none",  # never captured by ztunnel
    }
    pod_spec = template["spec"]
    assert pod_spec["serviceAccountName"] == "waypoint"
    [container] = pod_spec["containers"]
    assert container["command"] == ["/usr/bin/python3", "-m", "waypoint"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["XDS_TOKEN_FILE"] == "/var/run/secrets/tokens/istio-token"
    assert env["XDS_ADDRESS"] == "unix:///run/mesh/xds.sock"
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert pod_spec["volumes"][0]["projected"]["sources"] == [
        {"serviceAccountToken": {"audience": "istio-ca", "path": "istio-token"}}
    ]
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "gw-uid"
    assert waypoints.find_gateway_owner(dep) == "waypoint"


def test_gateway_gets_deployment_service_and_status(st: store.ObjectStore) -> None:
    async def main() -> None:
        async with store_harness.running(waypoints.WaypointDeployer(st, SETTINGS)):
            created = st.create(resources.GATEWAYS, gateway(), NS)
            await store_harness.until(
                st, "the waypoint's service", lambda: _find(st, resources.SERVICES) is not None
            )
            dep = _find(st, resources.DEPLOYMENTS)
            assert dep["metadata"]["ownerReferences"][0]["uid"] == objects.uid(created)
            svc = _find(st, resources.SERVICES)
            assert [p["port"] for p in svc["spec"]["ports"]] == [15008, 15020, 15021]
            await store_harness.until(
                st,
                "Programmed=False",
                lambda: _condition(st, "Programmed").get("reason") == "Pending",
            )
            gw = _find(st, resources.GATEWAYS)
            assert gw["status"]["addresses"] == [
                {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"},
                {"type": "IPAddress", "value": svc["spec"]["clusterIP"]},
            ]
            assert _condition(st, "Accepted")["status"] == "True"

            # The pod became ready: the Deployment says so, the Gateway is programmed.
            dep = _find(st, resources.DEPLOYMENTS)
            dep["status"] = {"replicas": 1, "readyReplicas": 1}
            st.replace(resources.DEPLOYMENTS, dep, NS, "waypoint", subresource="status")
            await store_harness.until(
                st, "Programmed=True", lambda: _condition(st, "Programmed").get("status") == "True"
            )

    asyncio.run(main())


def test_changed_objects_are_put_back_and_deleted_with_the_gateway(st: store.ObjectStore) -> None:
    async def main() -> None:
        async with store_harness.running(waypoints.WaypointDeployer(st, SETTINGS)):
            st.create(resources.GATEWAYS, gateway(), NS)
            await store_harness.until(
                st, "the deployment", lambda: _find(st, resources.DEPLOYMENTS) is not None
            )
            dep = _find(st, resources.DEPLOYMENTS)
            want = copy.deepcopy(dep["spec"]["template"])
            dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["sleep", "1"]
            st.replace(resources.DEPLOYMENTS, dep, NS, "waypoint")
            await store_harness.until(
                st,
                "the deployment put back",
                lambda: _find(st, resources.DEPLOYMENTS)["spec"]["template"] == want,
            )
            st.delete(resources.SERVICES, "waypoint", NS)
            await store_harness.until(
                st, "the service re-created", lambda: _find(st, resources.SERVICES) is not None
            )

            st.delete(resources.GATEWAYS, "waypoint", NS)
            await store_harness.until(
                st,
                "both deleted",
                lambda: (
                    _find(st, resources.DEPLOYMENTS) is None
                    and _find(st, resources.SERVICES) is None
                ),
            )

    asyncio.run(main())


def test_a_stranger_holding_the_name_is_left_alone_and_reported(st: store.ObjectStore) -> None:
    stranger = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": NS},
        "spec": {"selector": {"app": "mine"}, "ports": [{"port": 80}]},
    }
    st.create(resources.SERVICES, stranger, NS)

    async def main() -> None:
        async with store_harness.running(waypoints.WaypointDeployer(st, SETTINGS)):
            st.create(resources.GATEWAYS, gateway(), NS)
            await store_harness.until(
                st,
                "Programmed=Invalid",
                lambda: _condition(st, "Programmed").get("reason") == "Invalid",
            )
            assert (
                "a Service named 'waypoint' already exists"
                in _condition(st, "Programmed")["message"]
            )
            assert _find(st, resources.SERVICES)["spec"]["selector"] == {"app": "mine"}
            st.delete(resources.GATEWAYS, "waypoint", NS)
            await store_harness.until(
                st, "the deployment deleted", lambda: _find(st, resources.DEPLOYMENTS) is None
            )
            assert _find(st, resources.SERVICES) is not None  # not ours: kept

    asyncio.run(main())


def test_other_gateway_classes_get_nothing(st: store.ObjectStore) -> None:
    async def main() -> None:
        async with store_harness.running(waypoints.WaypointDeployer(st, SETTINGS)):
            st.create(resources.GATEWAYS, gateway("ingress", "istio"), NS)
            st.create(resources.GATEWAYS, gateway(), NS)
            # Events are handled in order: once the waypoint's objects exist, the ingress
            # Gateway's event was handled too.
            await store_harness.until(
                st, "the waypoint's service", lambda: _find(st, resources.SERVICES) is not None
            )
            assert _find(st, resources.DEPLOYMENTS, "ingress") is None
            assert _find(st, resources.SERVICES, "ingress") is None
            assert _condition(st, "Programmed", "ingress") == {}

    asyncio.run(main())
