"""The controller process end to end: objects in through the local API, workloads out over
delta xDS, certificates from the CA only for identities running on the caller's node, and a
restart that loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from google.protobuf import any_pb2

from meshcore.identity import csr, spiffe, tokens
from meshcore.kube import client as kube_client
from meshcore.kube import resources
from meshcore.model import workload
from meshcore.xds import client as xds_client
from meshcore.xds import resources as xds_resources
from meshcore.xds import types
from ztunnel.identity import client as ca_client

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


class Controller:
    def __init__(self, state: str) -> None:
        self.state = state
        self.api_socket = os.path.join(state, "api.sock")
        self.xds_socket = os.path.join(state, "xds.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(state, "controller.log")

    def start(self) -> None:
        env = {
            **os.environ,
            "CONTROLLER_STATE_DIR": os.path.join(self.state, "controller"),
            "LOCAL_API_SOCKET": self.api_socket,
            "XDS_LISTEN": f"unix://{self.xds_socket}",
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller"], env=env, stdout=out, stderr=out
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def token(self, node: str) -> str:
        path = os.path.join(self.state, f"{node}.token")
        secret = tokens.load_or_create_secret(
            os.path.join(self.state, "controller", "token-secret")
        )
        with open(path, "w") as f:
            f.write(tokens.NodeTokens(secret).mint(node))
        return path

    async def wait_ready(self) -> kube_client.ApiClient:
        api = kube_client.ApiClient(f"unix://{self.api_socket}", timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                with open(self.log) as f:
                    pytest.fail(f"controller exited:\n{f.read()}")
            try:
                await api.list(resources.NAMESPACES)
                if os.path.exists(self.xds_socket):
                    return api
            except Exception:
                if loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)


@pytest.fixture
def controller() -> Iterator[Controller]:
    state = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    ctl = Controller(state)
    try:
        yield ctl
    finally:
        ctl.stop()
        shutil.rmtree(state, ignore_errors=True)


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
