"""The controller process end to end: objects in through the local API, workloads out over
delta xDS, certificates from the CA only for identities running on the caller's node, and a
restart that loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from google.protobuf import any_pb2

from meshcore.identity import ca_client, csr, spiffe
from meshcore.kube import client as kube_client
from meshcore.kube import resources
from meshcore.model import workload
from meshcore.xds import client as xds_client
from meshcore.xds import resources as xds_resources
from meshcore.xds import types
from tests.direct import controller_process

NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "n1"},
    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
}
NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "nodeName": "n1",
        "serviceAccountName": "web",
        "containers": [
            {
                "name": "app",
                "command": ["sleep", "1"],
                "ports": [{"name": "http", "containerPort": 8080}],
            }
        ],
    },
}
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
}


Controller = controller_process.Controller


@pytest.fixture
def controller() -> Iterator[Controller]:
    with controller_process.temporary_controller() as ctl:
        yield ctl


class Recorder:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}
        self.changed = asyncio.Event()

    def apply(
        self, type_url: str, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        for name, value in updated:
            self.items[name] = (
                xds_resources.decode_address(value)
                if type_url == types.ADDRESS
                else xds_resources.decode_authorization(value)
            )
        for name in removed:
            self.items.pop(name, None)
        self.changed.set()
        return ()

    async def wait_for(self, predicate: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.items):
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def xds_watch(ctl: Controller, node: str) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    client = xds_client.DeltaXdsClient(
        f"unix://{ctl.xds_socket}",
        node_id=f"ztunnel~10.0.0.1~zt-{node}.istio-system~istio-system.svc.cluster.local",
        node_metadata={"NODE_NAME": node},
        token_file=ctl.token(node),
        cluster_id="Kubernetes",
        type_urls=[types.ADDRESS, types.AUTHORIZATION],
        handler=recorder,
    )
    task = asyncio.ensure_future(client.run())
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_objects_become_workloads_and_certificates(controller: Controller) -> None:
    async def main() -> None:
        controller.start()
        api = await controller.wait_ready()
        try:
            for obj in (NODE, NAMESPACE, POD, SERVICE):
                await api.create(obj)
            await api.patch(
                resources.PODS,
                "web",
                "shop",
                {
                    "status": {
                        "podIP": "10.244.1.5",
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                subresource="status",
            )
            uid = "Kubernetes//Pod/shop/web"
            async with xds_watch(controller, "n1") as seen:
                await seen.wait_for(
                    lambda items: uid in items and "shop/web.shop.svc.cluster.local" in items
                )
                wl = seen.items[uid]
                assert isinstance(wl, workload.Workload)
                assert str(wl.addresses[0]) == "10.244.1.5"
                assert wl.service_account == "web"
                binding = wl.binding("shop/web.shop.svc.cluster.local")  # type: ignore[arg-type]
                assert binding is not None
                assert binding.target_port(80) == 8080
                assert not wl.has_hbone

                # The node agent's annotation switches the workload to HBONE.
                await api.patch(
                    resources.PODS,
                    "web",
                    "shop",
                    {"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}},
                )
                await seen.wait_for(lambda items: items[uid].has_hbone)

            identity = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
            key = csr.generate_key()
            ok = ca_client.GrpcCaClient(
                f"unix://{controller.xds_socket}", controller.token("n1"), "Kubernetes"
            )
            chain = await ok.fetch_certificate(identity, csr.build_csr(key, identity), 3600)
            await ok.close()
            assert len(chain) == 2
            other = ca_client.GrpcCaClient(
                f"unix://{controller.xds_socket}", controller.token("n2"), "Kubernetes"
            )
            with pytest.raises(ca_client.CaRequestError) as refused:
                await other.fetch_certificate(identity, csr.build_csr(key, identity), 3600)
            await other.close()
            assert "n2" in str(refused.value)
        finally:
            await api.close()

    asyncio.run(main())


def test_restart_loses_nothing(controller: Controller) -> None:
    async def main() -> None:
        controller.start()
        api = await controller.wait_ready()
        for obj in (NODE, NAMESPACE, POD, SERVICE):
            await api.create(obj)
        before = await api.get(resources.SERVICES, "web", "shop")
        pod_before = await api.get(resources.PODS, "web", "shop")
        await api.close()
        with open(os.path.join(controller.state, "controller", "ca", "root-cert.pem"), "rb") as f:
            root_before = f.read()

        controller.stop()
        controller.start()
        api = await controller.wait_ready()
        try:
            after = await api.get(resources.SERVICES, "web", "shop")
            pod_after = await api.get(resources.PODS, "web", "shop")
            assert after["spec"]["clusterIP"] == before["spec"]["clusterIP"]
            assert pod_after["metadata"]["uid"] == pod_before["metadata"]["uid"]
            with open(
                os.path.join(controller.state, "controller", "ca", "root-cert.pem"), "rb"
            ) as f:
                assert f.read() == root_before
            async with xds_watch(controller, "n1") as seen:
                await seen.wait_for(lambda items: "shop/web.shop.svc.cluster.local" in items)
        finally:
            await api.close()

    asyncio.run(main())


def test_bad_configuration_is_reported() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "CONTROLLER_STATE_DIR is required" in result.stderr
    assert "Traceback" not in result.stderr


SERVICE_ENTRY = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "external", "namespace": "shop"},
    "spec": {"hosts": ["api.example.com"], "resolution": "DNS"},
}


def test_a_service_entry_gets_its_address_and_keeps_it_over_a_restart(
    controller: Controller,
) -> None:
    async def allocated(api: kube_client.ApiClient) -> list[dict[str, Any]]:
        """The status addresses, once the allocator wrote them (watched, not polled)."""
        created = await api.get(resources.SERVICE_ENTRIES, "external", "shop")
        found = (created.get("status") or {}).get("addresses")
        if found:
            return list(found)
        version = created["metadata"]["resourceVersion"]
        async with asyncio.timeout(10):
            events = api.watch(resources.SERVICE_ENTRIES, "shop", resource_version=version)
            async with contextlib.aclosing(events):
                async for event in events:
                    found = (event.object.get("status") or {}).get("addresses")
                    if found:
                        return list(found)
        raise AssertionError("the watch ended before the addresses were written")

    async def main() -> None:
        controller.start()
        api = await controller.wait_ready()
        try:
            await api.create(NAMESPACE)
            await api.create(SERVICE_ENTRY)
            before = await allocated(api)
            assert before == [{"host": "api.example.com", "value": "240.240.0.1"}]
        finally:
            await api.close()

        controller.stop()
        controller.start()
        api = await controller.wait_ready()
        try:
            assert await allocated(api) == before
        finally:
            await api.close()

    asyncio.run(main())
