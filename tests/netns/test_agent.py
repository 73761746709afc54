"""The node agent process (`python -m cni.agent`) with real parts: a local API server, a real pod
network namespace, the real Redirector (iptables-restore inside the pod netns), the real mesh-cni
plugin for CNI ADD/DEL, and ztunnel's ZdsClient in the test acking every AddWorkload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from cni.redirect import netlink
from controller.sources.local import apiserver, kinds, store
from meshcore import netns
from meshcore.kube import client, objects, resources
from meshcore.wire import zds
from tests.netns import netns_util
from ztunnel.inpod import zds_client

pytestmark = pytest.mark.netns

DEADLINE = 15.0
POD_IP = "10.79.0.2"
ANNOTATION = "ambient.istio.io/redirection"


class AckingZtunnel:
    """ztunnel's side of ZDS: acks everything, remembers which pods it serves."""

    def __init__(self) -> None:
        self.workloads: dict[str, zds.WorkloadInfo] = {}
        self.inodes: dict[str, int] = {}

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        try:
            self.workloads[uid] = info
            self.inodes[uid] = os.fstat(netns_fd).st_ino
        finally:
            os.close(netns_fd)

    async def keep_workload(self, uid: str) -> None:
        pass

    async def del_workload(self, uid: str) -> None:
        self.workloads.pop(uid, None)

    async def snapshot_done(self, keep_uids: frozenset[str]) -> None:
        for uid in [u for u in self.workloads if u not in keep_uids]:
            del self.workloads[uid]


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def iptables_save(ns: netns_util.Netns) -> str:
    return ns.exec("iptables-save").stdout


def has_routing(ns: netns_util.Netns) -> bool:
    fd = netns.open_netns(ns.path)
    try:
        return any(netlink.has_routing(fd))
    finally:
        os.close(fd)


def is_redirected(ns: netns_util.Netns) -> bool:
    saved = iptables_save(ns)
    return all(
        line in saved
        for line in (
            ":ISTIO_PRERT",
            ":ISTIO_OUTPUT",
            "-A PREROUTING -j ISTIO_PRERT",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-j REDIRECT --to-ports 15001",
        )
    ) and has_routing(ns)


def is_clean(ns: netns_util.Netns) -> bool:
    return "ISTIO" not in iptables_save(ns) and not has_routing(ns)


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            while not await predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def run_plugin(
    command: str, conf: dict[str, Any], pod: dict[str, Any], netns_path: str
) -> tuple[int, str]:
    """Run the real mesh-cni executable as a container runtime would."""
    plugin = os.path.join(os.path.dirname(sys.executable), "mesh-cni")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "sandbox-1",
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={objects.namespace(pod)};"
        f"K8S_POD_NAME={objects.name(pod)};K8S_POD_UID={objects.uid(pod)}",
        "CNI_PATH": os.path.dirname(plugin),
    }
    proc = await asyncio.create_subprocess_exec(
        plugin,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate(json.dumps(conf).encode())
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


def test_agent_process_captures_and_releases_a_running_pod(
    namespaces: netns_util.Namespaces, netns_prefix: str, short_dir: str
) -> None:
    pod_ns = namespaces.add("pod")
    peer = namespaces.add("peer")
    namespaces.veth(pod_ns, "eth0", f"{POD_IP}/24", peer, "eth0", "10.79.0.1/24")
    node = f"node-{netns_prefix}".lower()
    api_sock = os.path.join(short_dir, "api.sock")
    zds_sock = os.path.join(short_dir, "zds.sock")
    cni_sock = os.path.join(short_dir, "cni.sock")
    agent_log = os.path.join(short_dir, "agent.log")
    network = {
        "cniVersion": "1.0.0",
        "name": "mesh-test",
        "type": "mesh-cni",
        "agentSocket": cni_sock,
        "timeoutSeconds": 10,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod_ns.path}],
            "ips": [{"address": f"{POD_IP}/24", "interface": 0}],
        },
    }
    ztunnel = AckingZtunnel()

    async def main() -> None:
        st = store.ObjectStore(kinds.build_registry())
        server = apiserver.LocalApiServer(st)
        await server.start(api_sock)
        api = client.ApiClient(f"unix://{api_sock}", timeout=DEADLINE)
        link = zds_client.ZdsClient(zds_sock, ztunnel, backoff_min=0.01, backoff_max=0.1)
        ztunnel_task = asyncio.create_task(link.run())
        agent: asyncio.subprocess.Process | None = None
        try:
            await api.create(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
            )
            pod = await api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "web", "namespace": "shop"},
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": "web-sa",
                        "containers": [{"name": "app", "command": ["sleep", "3600"]}],
                    },
                }
            )
            uid = objects.uid(pod)
            with open(agent_log, "wb") as log_file:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "cni.agent",
                    env={
                        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                        "NODE_NAME": node,
                        "KUBE_API": f"unix://{api_sock}",
                        "ZTUNNEL_UDS": zds_sock,
                        "CNI_EVENT_UDS": cni_sock,
                        "AGENT_STATE_DIR": os.path.join(short_dir, "agent"),
                        "LOG_LEVEL": "info",
                    },
                    stdout=log_file,
                    stderr=log_file,
                )
            async with asyncio.timeout(DEADLINE):
                await link.wait_ready()  # the agent is up and sent its (empty) snapshot

            # The runtime's CNI ADD in an unlabelled namespace: accepted, nothing captured.
            code, output = await run_plugin("ADD", network, pod, pod_ns.path)
            assert code == 0, output
            assert await asyncio.to_thread(is_clean, pod_ns)

            async def annotation() -> str | None:
                found = st.find(resources.PODS, "web", "shop")
                assert found is not None
                return objects.annotations_of(found).get(ANNOTATION)

            async def captured() -> bool:
                return (
                    uid in ztunnel.workloads
                    and await annotation() == "enabled"
                    and await asyncio.to_thread(is_redirected, pod_ns)
                )

            async def released() -> bool:
                return (
                    uid not in ztunnel.workloads
                    and await annotation() is None
                    and await asyncio.to_thread(is_clean, pod_ns)
                )

            await api.patch(
                resources.NAMESPACES,
                "shop",
                None,
                {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}},
            )
            await wait_until(captured, "the running pod is captured")
            assert ztunnel.workloads[uid] == zds.WorkloadInfo("web", "shop", "web-sa")
            assert ztunnel.inodes[uid] == os.stat(pod_ns.path).st_ino

            await api.patch(
                resources.NAMESPACES,
                "shop",
                None,
                {"metadata": {"labels": {"istio.io/dataplane-mode": None}}},
            )
            await wait_until(released, "the pod is released")

            code, output = await run_plugin("DEL", network, pod, pod_ns.path)
            assert code == 0, output

            agent.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                assert await agent.wait() == 0
            assert not os.path.exists(cni_sock)
            assert not os.path.exists(zds_sock)
        finally:
            if agent is not None and agent.returncode is None:
                agent.kill()
                await agent.wait()
            ztunnel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ztunnel_task
            await api.close()
            await server.close()
            st.close()

    asyncio.run(main())

    with open(agent_log) as f:
        records = [json.loads(line) for line in f if line.startswith("{")]
    operations = [
        (r["action"], r["outcome"], r["pod"], r["reason"]) for r in records if "outcome" in r
    ]
    assert operations == [
        (
            "enroll",
            "refused",
            "shop/web",
            "neither the pod nor namespace shop has istio.io/dataplane-mode=ambient",
        ),
        ("enroll", "enrolled", "shop/web", "namespace shop has istio.io/dataplane-mode=ambient"),
        (
            "release",
            "released",
            "shop/web",
            "neither the pod nor namespace shop has istio.io/dataplane-mode=ambient",
        ),
    ]
    assert all(isinstance(r["duration_ms"], float) for r in records if "outcome" in r)
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    assert is_clean(pod_ns)
