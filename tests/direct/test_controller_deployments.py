"""The controller process runs the deployment controller: a Deployment posted to its API gets
its pods, and a restart of the process (state on disk) neither loses nor duplicates them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import objects, resources

DEPLOYMENTS = resources.DEPLOYMENTS
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "command": ["sleep", "1"]}]},
        },
    },
}
TIMEOUT = 20.0


class ControllerProcess:
    def __init__(self, state: str) -> None:
        self.state = state
        self.api_socket = os.path.join(state, "api.sock")
        self.log = os.path.join(state, "controller.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "CONTROLLER_STATE_DIR": os.path.join(self.state, "controller"),
            "LOCAL_API_SOCKET": self.api_socket,
            "XDS_LISTEN": f"unix://{os.path.join(self.state, 'xds.sock')}",
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

    def _fail(self, why: str) -> None:
        with open(self.log) as f:
            pytest.fail(f"{why}:\n{f.read()}")

    async def connect(self) -> kube_client.ApiClient:
        """A client once the API answers (the process creates its socket while starting)."""
        api = kube_client.ApiClient(f"unix://{self.api_socket}", timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                await api.close()
                self._fail("controller exited")
            try:
                await api.list(resources.NAMESPACES)
                return api
            except (OSError, kube_errors.KubeError):
                if loop.time() > deadline:
                    await api.close()
                    self._fail("the API never answered")
            await asyncio.sleep(0.05)


@pytest.fixture
def controller() -> Iterator[ControllerProcess]:
    state = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    ctl = ControllerProcess(state)
    try:
        yield ctl
    finally:
        ctl.stop()
        shutil.rmtree(state, ignore_errors=True)


async def wait_for_pods(api: kube_client.ApiClient, count: int) -> list[dict[str, Any]]:
    """The live pods once there are `count` of them; re-listed after every watched change."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            listed = await api.list(resources.PODS, "default")
            live = [p for p in listed.items if not objects.is_terminating(p)]
            if len(live) == count:
                return live
            events = api.watch(resources.PODS, "default", resource_version=listed.resource_version)
            async with contextlib.aclosing(events):
                async for _ in events:
                    break


def test_the_controller_process_makes_and_keeps_deployment_pods(
    controller: ControllerProcess,
) -> None:
    async def main() -> None:
        controller.start()
        api = await controller.connect()
        try:
            await api.create(DEPLOYMENT)
            first = sorted(objects.name(p) for p in await wait_for_pods(api, 2))
            assert all(n.startswith("web-") for n in first)
        finally:
            await api.close()

        controller.stop()
        controller.start()
        api = await controller.connect()
        try:
            # The store came back from disk; the controller's resync creates nothing more.
            deployment = await api.get(DEPLOYMENTS, "web", "default")
            assert deployment["status"]["replicas"] == 2
            assert sorted(objects.name(p) for p in await wait_for_pods(api, 2)) == first
            await api.patch(DEPLOYMENTS, "web", "default", {"spec": {"replicas": 3}})
            third = await wait_for_pods(api, 3)
            assert set(first) < {objects.name(p) for p in third}
        finally:
            await api.close()

    asyncio.run(main())
