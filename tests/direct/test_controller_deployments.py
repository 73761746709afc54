"""The controller process runs the deployment controller: a Deployment posted to its API gets
its pods, and a restart of the process (state on disk) neither loses nor duplicates them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from meshcore.kube import client as kube_client
from meshcore.kube import objects, resources
from tests.direct import controller_process

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


@pytest.fixture
def controller() -> Iterator[controller_process.Controller]:
    with controller_process.temporary_controller() as ctl:
        yield ctl


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
    controller: controller_process.Controller,
) -> None:
    async def main() -> None:
        controller.start()
        api = await controller.wait_ready()
        try:
            await api.create(DEPLOYMENT)
            first = sorted(objects.name(p) for p in await wait_for_pods(api, 2))
            assert all(n.startswith("web-") for n in first)
        finally:
            await api.close()

        controller.stop()
        controller.start()
        api = await controller.wait_ready()
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
