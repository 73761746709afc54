"""A real CNI chain: Debian's bridge + host-local, then mesh-cni, found through CNI_PATH.

The test plays the container runtime (libcni): it runs each plugin of the chain with the same
CNI_* environment, passing the previous plugin's result as `prevResult`, then runs DEL in
reverse order. It proves mesh-cni parses the result shape the real plugins produce.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from cni.agent import plugin_server
from tests.netns import netns_util

pytestmark = pytest.mark.netns

DEBIAN_PLUGINS = "/usr/lib/cni"
SUBNET = "10.78.0.0/24"


class RecordingEvents:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def on_add(self, event: plugin_server.PodAddEvent) -> None:
        self.events.append(event)

    async def on_del(self, event: plugin_server.PodDelEvent) -> None:
        self.events.append(event)

    async def on_check(self, event: plugin_server.PodCheckEvent) -> None:
        self.events.append(event)


@pytest.fixture
def work_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="mt-chain-", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def find_plugin(kind: str, cni_path: str) -> str:
    """What libcni does with a plugin `type`: the first executable of that name in CNI_PATH."""
    for directory in cni_path.split(os.pathsep):
        candidate = os.path.join(directory, kind)
        if os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(f"plugin {kind!r} not found in CNI_PATH {cni_path}")


async def invoke(conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any] | None:
    binary = find_plugin(conf["type"], env["CNI_PATH"])
    proc = await asyncio.create_subprocess_exec(
        binary,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(json.dumps(conf).encode())
    assert proc.returncode == 0, f"{conf['type']} {env['CNI_COMMAND']}: {out!r} {err!r}"
    return json.loads(out) if out.strip() else None


def test_bridge_host_local_then_mesh_cni(namespaces: netns_util.Namespaces, work_dir: str) -> None:
    pod = namespaces.add("pod")
    bridge = namespaces.root_link("br")
    socket_path = os.path.join(work_dir, "cni.sock")
    handler = RecordingEvents()
    network = {"cniVersion": "1.0.0", "name": "mesh-test"}
    chain: list[dict[str, Any]] = [
        {
            **network,
            "type": "bridge",
            "bridge": bridge,
            "isGateway": False,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET}]],
                "dataDir": os.path.join(work_dir, "ipam"),
            },
        },
        {**network, "type": "mesh-cni", "agentSocket": socket_path, "timeoutSeconds": 5},
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_CONTAINERID": "sandbox-1",
        "CNI_NETNS": pod.path,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
        "K8S_POD_UID=uid-1;K8S_POD_INFRA_CONTAINER_ID=sandbox-1",
        "CNI_PATH": os.pathsep.join([DEBIAN_PLUGINS, os.path.dirname(sys.executable)]),
    }

    async def main() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        server = plugin_server.PluginEventServer(socket_path, handler)
        await server.start()
        try:
            add_env = {**env, "CNI_COMMAND": "ADD"}
            bridge_result = await invoke(chain[0], add_env)
            mesh_result = await invoke({**chain[1], "prevResult": bridge_result}, add_env)
            del_env = {**env, "CNI_COMMAND": "DEL"}
            for conf in reversed(chain):
                await invoke(conf, del_env)
        finally:
            await server.close()
        return bridge_result, mesh_result

    bridge_result, mesh_result = asyncio.run(main())

    assert bridge_result is not None
    assert mesh_result == bridge_result  # passed through unchanged
    address = bridge_result["ips"][0]["address"]
    assert address.startswith("10.78.0.")
    pod_ip = address.split("/")[0]
    assert handler.events == [
        plugin_server.PodAddEvent(
            container_id="sandbox-1",
            netns=pod.path,
            ifname="eth0",
            pod_name="web-1",
            pod_namespace="shop",
            pod_uid="uid-1",
            ips=(pod_ip,),
        ),
        plugin_server.PodDelEvent("sandbox-1", pod.path, "eth0", "web-1", "shop", "uid-1"),
    ]
    # The bridge plugin's DEL really removed the pod's interface.
    assert "eth0" not in netns_util.ip("-n", pod.name, "link", "show")
