"""`istio.io/use-waypoint` from the object store to a ztunnel's xDS client, in process (the same
controller wiring as test_controller_policies): labelling a Namespace or a Service changes the
waypoint the ztunnel holds for that namespace's services, and only for them; pods bind to it once
its Gateway's `istio.io/waypoint-for` says it serves workloads."""

from __future__ import annotations

import pathlib

from controller.sources.local import kinds
from controller.sources.local import store as store_mod
from meshcore.kube import resources
from meshcore.model import workload
from tests.direct import grpc_harness
from tests.direct import test_controller_policies as harness

state_dir = grpc_harness.state_dir

USE = "istio.io/use-waypoint"
WEB = "shop/web.shop.svc.cluster.local"
WAYPOINT_SVC = "shop/waypoint.shop.svc.cluster.local"
WAYPOINT = workload.GatewayAddress(hostname=("shop", "waypoint.shop.svc.cluster.local"))


def _service(name: str, labels: dict[str, str]) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def _label(
    store: store_mod.ObjectStore, rtype: resources.ResourceType, name: str, value: str | None
) -> None:
    """Set (or, with None, remove) the use-waypoint label of a Namespace or a shop object."""
    namespace = None if rtype is resources.NAMESPACES else "shop"
    store.patch(rtype, name, namespace, {"metadata": {"labels": {USE: value}}})


def _gateway(waypoint_for: str) -> dict[str, object]:
    return {
        "metadata": {
            "name": "waypoint",
            "namespace": "shop",
            "labels": {"istio.io/waypoint-for": waypoint_for},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def test_namespace_and_service_labels_reach_ztunnel(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        served = [*kinds.build_core_kinds(), *kinds.build_gateway_kinds()]
        store = store_mod.ObjectStore(kinds.KindRegistry(served))
        harness._seed(store)  # namespace shop, pod web-1 (app=web) on n1
        store.create(resources.GATEWAYS, _gateway("service"))
        store.create(resources.SERVICES, _service("web", {}))
        # The waypoint's own Service: it must never be sent to itself.
        store.create(
            resources.SERVICES,
            _service("waypoint", {"gateway.networking.k8s.io/gateway-name": "waypoint"}),
        )
        async with (
            harness._controller(store, state_dir / "xds.sock"),
            harness._ztunnel(state_dir) as zt,
        ):

            def waypoint_of(name: str) -> workload.GatewayAddress | None:
                held = zt.held.get(name)
                assert isinstance(held, (workload.Service, workload.Workload)), name
                return held.waypoint

            await harness._eventually(
                lambda: {WEB, WAYPOINT_SVC, harness.UID} <= zt.held.keys(), "the first sync"
            )
            assert waypoint_of(WEB) is None

            seen = len(zt.batches)
            _label(store, resources.NAMESPACES, "shop", "waypoint")
            await harness._eventually(
                lambda: waypoint_of(WEB) == WAYPOINT, "the namespace's waypoint on its service"
            )
            # Only the namespace's service changed: not the waypoint's own, nor the pod (the
            # waypoint serves service addresses).
            pushed = {name for _, updated, _ in zt.batches[seen:] for name in updated}
            assert pushed == {WEB}
            assert waypoint_of(WAYPOINT_SVC) is None
            assert waypoint_of(harness.UID) is None

            # The Service's own label wins: `none` opts it out.
            _label(store, resources.SERVICES, "web", "none")
            await harness._eventually(lambda: waypoint_of(WEB) is None, "the opt-out")
            # The waypoint serves workloads too now: the pod (named by its own label as well)
            # binds to it, for calls to its IP.
            _label(store, resources.PODS, "web-1", "waypoint")
            store.patch(resources.GATEWAYS, "waypoint", "shop", _gateway("all"))
            await harness._eventually(
                lambda: waypoint_of(harness.UID) == WAYPOINT, "the pod's waypoint"
            )

            _label(store, resources.SERVICES, "web", None)
            await harness._eventually(lambda: waypoint_of(WEB) == WAYPOINT, "the opt-out removed")
            _label(store, resources.NAMESPACES, "shop", None)
            await harness._eventually(
                lambda: waypoint_of(WEB) is None, "the namespace label removed"
            )
            assert waypoint_of(harness.UID) == WAYPOINT

    harness._run(main())
