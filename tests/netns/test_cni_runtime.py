"""The playground's libcni against real plugins: Debian's bridge + host-local, and the real
mesh-cni talking to the real agent event server with a recording (or refusing) handler."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from cni.agent import plugin_server
from meshcore import netns
from meshctl.playground import cni_runtime, netcmd, topology

pytestmark = pytest.mark.netns

T = TypeVar("T")


class Node:
    """One playground node (its netns is where plugins run, as the kubelet runs there)."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.prefix = f"mt{token}"
        self.state_dir = f"/tmp/mt-{token}"
        self.topo = topology.Topology(prefix=self.prefix, state_dir=self.state_dir).node("node1")
        self.record = self.topo.build().nodes[0]
        self.dir = os.path.join(self.state_dir, "nodes", "node1")
        os.makedirs(self.dir)
        self.pods: list[str] = []

    def pod_netns(self, name: str) -> str:
        ns = f"{self.prefix}-p-{name}"
        netcmd.ip("netns", "add", ns)
        self.pods.append(ns)
        return ns

    def runtime_conf(self, ns: str, name: str) -> cni_runtime.RuntimeConf:
        return cni_runtime.RuntimeConf(
            container_id=f"uid-{name}",
            netns=netns.path_for(ns),
            pod_namespace="shop",
            pod_name=name,
            pod_uid=f"uid-{name}",
        )

    def run(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `main` on an event loop whose thread is inside the node's namespace."""
        fd = netns.open_netns(netns.path_for(self.record.netns))
        try:
            return netns.run_in(fd, lambda: asyncio.run(main()))
        finally:
            os.close(fd)

    def close(self) -> None:
        report = self.topo.teardown()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        assert report.is_clean, report.describe_leftovers()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    try:
        yield n
    finally:
        n.close()


class Recorder:
    def __init__(self, refuse: str | None = None) -> None:
        self.events: list[object] = []
        self.refuse = refuse

    async def on_add(self, event: plugin_server.PodAddEvent) -> None:
        if self.refuse:
            raise RuntimeError(self.refuse)
        self.events.append(event)

    async def on_del(self, event: plugin_server.PodDelEvent) -> None:
        self.events.append(event)

    async def on_check(self, event: plugin_server.PodCheckEvent) -> None:
        self.events.append(event)


def bridge_only(conflist: cni_runtime.NetworkConfigList) -> cni_runtime.NetworkConfigList:
    return cni_runtime.NetworkConfigList(conflist.name, conflist.cni_version, conflist.plugins[:1])


def allocated_ips(node: Node) -> set[str]:
    """host-local's dataDir: one file per allocated address."""
    directory = os.path.join(node.dir, "cni", "networks", "playground")
    if not os.path.isdir(directory):
        return set()
    return {f for f in os.listdir(directory) if f.count(".") == 3}


def test_bridge_and_host_local_give_an_address_and_del_releases_it(node: Node) -> None:
    ns = node.pod_netns("a")
    conflist = bridge_only(cni_runtime.build_playground_conflist(node.dir, node.record.pod_cidr))
    runtime = cni_runtime.CniRuntime(
        cni_runtime.default_bin_dirs(), os.path.join(node.dir, "cache")
    )
    rt = node.runtime_conf(ns, "a")

    async def add_check() -> dict[str, Any]:
        result = await runtime.add(conflist, rt)
        await runtime.check(conflist, rt)
        return result

    result = node.run(add_check)
    ip = cni_runtime.find_ip(result)
    assert ip is not None
    assert ip.startswith("10.244.0.")
    assert ip != "10.244.0.1"
    assert f"inet {ip}/24" in netcmd.ip("addr", "show", "dev", "eth0", netns=ns)
    assert "default via 10.244.0.1" in netcmd.ip("route", netns=ns)
    assert "inet 10.244.0.1/24" in netcmd.ip("addr", "show", "dev", "cni0", netns=node.record.netns)
    assert allocated_ips(node) == {ip}
    assert runtime.find_cached_result(conflist, rt) == result

    node.run(lambda: runtime.delete(conflist, rt))
    assert allocated_ips(node) == set()
    assert runtime.find_cached_result(conflist, rt) is None
    assert "eth0" not in netcmd.ip("link", "show", netns=ns)


def test_full_chain_tells_the_agent_and_passes_the_result_through(node: Node) -> None:
    ns = node.pod_netns("b")
    conflist = cni_runtime.build_playground_conflist(node.dir, node.record.pod_cidr)
    runtime = cni_runtime.CniRuntime(
        cni_runtime.default_bin_dirs(), os.path.join(node.dir, "cache")
    )
    rt = node.runtime_conf(ns, "b")
    recorder = Recorder()

    async def main() -> dict[str, Any]:
        server = plugin_server.PluginEventServer(os.path.join(node.dir, "cni.sock"), recorder)
        await server.start()
        try:
            result = await runtime.add(conflist, rt)
            await runtime.delete(conflist, rt)
            return result
        finally:
            await server.close()

    result = node.run(main)
    ip = cni_runtime.find_ip(result)
    assert ip is not None
    assert recorder.events == [
        plugin_server.PodAddEvent("uid-b", rt.netns, "eth0", "b", "shop", "uid-b", (ip,)),
        plugin_server.PodDelEvent("uid-b", rt.netns, "eth0", "b", "shop", "uid-b"),
    ]
    assert allocated_ips(node) == set()


def test_agent_refusal_fails_add_with_its_message(node: Node) -> None:
    ns = node.pod_netns("c")
    conflist = cni_runtime.build_playground_conflist(node.dir, node.record.pod_cidr)
    runtime = cni_runtime.CniRuntime(
        cni_runtime.default_bin_dirs(), os.path.join(node.dir, "cache")
    )
    rt = node.runtime_conf(ns, "c")
    recorder = Recorder(refuse="ztunnel is not connected")

    async def main() -> cni_runtime.CniError:
        server = plugin_server.PluginEventServer(os.path.join(node.dir, "cni.sock"), recorder)
        await server.start()
        try:
            with pytest.raises(cni_runtime.CniError) as info:
                await runtime.add(conflist, rt)
            # What the kubelet does next: DEL undoes the bridge's part, so nothing leaks.
            await runtime.delete(conflist, rt)
            return info.value
        finally:
            await server.close()

    err = node.run(main)
    assert err.plugin == "mesh-cni"
    assert err.code == 100
    assert "refused ADD of pod shop/c" in err.msg
    assert "ztunnel is not connected" in err.details
    assert allocated_ips(node) == set()


def test_agent_unreachable_is_try_again_later(node: Node) -> None:
    ns = node.pod_netns("d")
    conflist = cni_runtime.build_playground_conflist(node.dir, node.record.pod_cidr)
    runtime = cni_runtime.CniRuntime(
        cni_runtime.default_bin_dirs(), os.path.join(node.dir, "cache")
    )
    rt = node.runtime_conf(ns, "d")

    async def main() -> cni_runtime.CniError:
        with pytest.raises(cni_runtime.CniError) as info:
            await runtime.add(conflist, rt)
        await runtime.delete(conflist, rt)
        return info.value

    err = node.run(main)
    assert (err.plugin, err.code) == ("mesh-cni", 11)
    assert "node agent unreachable" in err.msg


def test_bad_config_and_missing_plugin_are_reported(node: Node) -> None:
    ns = node.pod_netns("e")
    rt = node.runtime_conf(ns, "e")
    runtime = cni_runtime.CniRuntime(
        cni_runtime.default_bin_dirs(), os.path.join(node.dir, "cache")
    )
    bad = cni_runtime.NetworkConfigList.from_dict(
        {
            "cniVersion": "1.0.0",
            "name": "bad",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "not-a-cidr"}]]},
                }
            ],
        }
    )
    missing = cni_runtime.NetworkConfigList.from_dict(
        {"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "no-such-plugin"}]}
    )

    async def main() -> tuple[cni_runtime.CniError, cni_runtime.CniError]:
        with pytest.raises(cni_runtime.CniError) as bad_info:
            await runtime.add(bad, rt)
        with pytest.raises(cni_runtime.CniError) as missing_info:
            await runtime.add(missing, rt)
        return bad_info.value, missing_info.value

    bad_err, missing_err = node.run(main)
    assert bad_err.plugin == "bridge"
    assert bad_err.code != cni_runtime.CODE_RUNTIME, "the plugin's own error object was parsed"
    assert "not-a-cidr" in str(bad_err)
    assert missing_err.code == cni_runtime.CODE_RUNTIME
    assert 'failed to find plugin "no-such-plugin"' in missing_err.msg


def test_a_hanging_plugin_times_out(node: Node, tmp_path: Any) -> None:
    plugin = tmp_path / "hang"
    plugin.write_text("#!/bin/sh\nexec sleep 60\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    ns = node.pod_netns("f")
    runtime = cni_runtime.CniRuntime([str(tmp_path)], os.path.join(node.dir, "cache"), timeout=0.5)
    conflist = cni_runtime.NetworkConfigList.from_dict(
        {"cniVersion": "1.0.0", "name": "h", "plugins": [{"type": "hang"}]}
    )

    async def main() -> cni_runtime.CniError:
        with pytest.raises(cni_runtime.CniError) as info:
            await runtime.add(conflist, node.runtime_conf(ns, "f"))
        return info.value

    err = node.run(main)
    assert (err.plugin, err.code) == ("hang", cni_runtime.CODE_RUNTIME)
    assert "timed out after 0.5s" in err.msg
