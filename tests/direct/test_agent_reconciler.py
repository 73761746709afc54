"""The node agent's reconciler against real parts: a LocalApiServer on a Unix socket, a real
ZdsServer with ztunnel's real ZdsClient, and a recording redirector (the real one is exercised
in tests/netns/test_agent.py).

"Network namespaces" here are plain files: the ZDS server only opens the path and passes the fd,
which lets a test make a pod's netns vanish by deleting its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from cni.agent import captures, enrollment, netns_cache, plugin_server, reconciler, zds_server
from cni.redirect import iptables
from controller.sources.local import apiserver, kinds, persistence, store
from meshcore import netns
from meshcore.kube import client, objects, resources
from meshcore.wire import zds
from ztunnel.inpod import zds_client

NODE = "node-a"
DEADLINE = 10.0
ANNOTATION = enrollment.REDIRECTION_ANNOTATION
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


# -- fakes and recorders -----------------------------------------------------------------------


class Journal:
    """Ordered record of what ztunnel and the redirector were asked to do (both write here)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[tuple[str, str]] = []

    def add(self, what: str, key: str) -> None:
        with self._lock:
            self.entries.append((what, key))

    def of(self, *keys: str) -> list[str]:
        with self._lock:
            return [what for what, key in self.entries if key in keys]

    def mark(self) -> int:
        with self._lock:
            return len(self.entries)

    def since(self, mark: int) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.entries[mark:])


class RecordingRedirector:
    """The Redirector's three methods over a dict; `failure` makes install raise."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.installed: dict[str, iptables.RedirectOptions] = {}
        self.failure = ""
        # remove() for these paths blocks (in its worker thread) until the event is set.
        self.gates: dict[str, threading.Event] = {}
        self.link_watches: dict[str, FakeLinkWatch] | None = None  # eBPF mode when a dict

    def install(self, netns_path: str, options: iptables.RedirectOptions) -> None:
        self.journal.add("install", netns_path)
        if self.failure:
            self.installed.pop(netns_path, None)  # a failed install leaves nothing behind
            raise iptables.RedirectError(self.failure)
        self.installed[netns_path] = options

    def remove(self, netns_path: str) -> None:
        self.journal.add("remove", netns_path)
        gate = self.gates.get(netns_path)
        if gate is not None:
            gate.wait(DEADLINE)
        self.installed.pop(netns_path, None)

    def is_installed(self, netns_path: str) -> bool:
        return netns_path in self.installed

    def watch_links(self, netns_path: str) -> FakeLinkWatch | None:
        """None (iptables mode) unless `link_watches` is set: then a watch per pod netns."""
        if self.link_watches is None:
            return None
        self.journal.add("watch", netns_path)
        watch = self.link_watches[netns_path] = FakeLinkWatch(netns_path, self.journal)
        return watch


class FakeLinkWatch:
    """A pod's link announcements over a socketpair: `announce()` makes it readable."""

    def __init__(self, netns_path: str, journal: Journal) -> None:
        self._netns_path, self._journal = netns_path, journal
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self.closed = False

    def announce(self) -> None:
        self._writer.send(b"!")

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> bool:
        try:
            return bool(self._reader.recv(4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        self._journal.add("unwatch", self._netns_path)
        self.closed = True
        self._reader.close()
        self._writer.close()


class RecordingZtunnel:
    """ztunnel's WorkloadHandler: keeps the workloads it was given, journals every request."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.workloads: dict[str, tuple[zds.WorkloadInfo, int]] = {}

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        try:
            self.journal.add("add", uid)
            self.workloads[uid] = (info, os.fstat(netns_fd).st_ino)
        finally:
            os.close(netns_fd)

    async def keep_workload(self, uid: str) -> None:
        self.journal.add("keep", uid)

    async def del_workload(self, uid: str) -> None:
        self.journal.add("del", uid)
        self.workloads.pop(uid, None)

    async def snapshot_done(self, keep_uids: frozenset[str]) -> None:
        self.journal.add("snapshot_done", ",".join(sorted(keep_uids)))
        for uid in [u for u in self.workloads if u not in keep_uids]:
            del self.workloads[uid]


# -- harness -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Agent:
    reconciler: reconciler.Reconciler
    table: captures.CaptureTable
    cache: netns_cache.NetnsCache
    zds: zds_server.ZdsServer
    api: client.ApiClient
    task: asyncio.Task[None]


class Env:
    def __init__(
        self,
        directory: str,
        st: store.ObjectStore,
        server: apiserver.LocalApiServer,
        api: client.ApiClient,
    ) -> None:
        self.directory = directory
        self.store = st
        self.server = server
        self.api = api
        self.state_dir = os.path.join(directory, "agent")
        self.zds_path = os.path.join(directory, "zds.sock")
        self.api_path = os.path.join(directory, "api.sock")
        self.journal = Journal()
        self.redirector = RecordingRedirector(self.journal)
        self.ztunnel = RecordingZtunnel(self.journal)
        self._agents: list[Agent] = []
        self._ztunnel_task: asyncio.Task[None] | None = None
        self.ztunnel_client: zds_client.ZdsClient | None = None

    # the API server

    async def stop_api(self) -> None:
        await self.server.close(grace=1.0)

    async def start_api(self) -> None:
        await self.server.start(self.api_path)

    # agents

    async def start_agent(self, *, wait_synced: bool = True, **options: Any) -> Agent:
        cache = netns_cache.NetnsCache(self.state_dir)
        cache.load()
        table = captures.CaptureTable()
        zds_srv = zds_server.ZdsServer(self.zds_path, table.snapshot, ack_timeout=2.0)
        api = client.ApiClient(f"unix://{self.api_path}", timeout=DEADLINE)
        # The pods' namespaces here are stand-in files: any that exists passes the check.
        options = {"drain_timeout": 2.0, "check_netns": _stand_in_netns, **options}
        rec = reconciler.Reconciler(
            node_name=NODE,
            api=api,
            zds=zds_srv,
            redirector=self.redirector,
            cache=cache,
            capture_table=table,
            **options,
        )
        await rec.restore()
        await zds_srv.start()
        task = asyncio.create_task(rec.run(), name="reconciler")
        agent = Agent(rec, table, cache, zds_srv, api, task)
        self._agents.append(agent)
        if not wait_synced:
            return agent
        async with asyncio.timeout(DEADLINE):
            await rec.wait_synced()
            if self.ztunnel_client is not None:
                # A ztunnel started earlier connects now; tests start from its steady state.
                await self.ztunnel_client.wait_ready()
        return agent

    async def stop_agent(self, agent: Agent) -> None:
        if agent not in self._agents:
            return
        self._agents.remove(agent)
        agent.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent.task
        await agent.zds.close()
        await agent.api.close()

    # ztunnel

    async def start_ztunnel(self) -> zds_client.ZdsClient:
        """Connects (and retries) on its own; ready once an agent has sent its snapshot."""
        self.ztunnel_client = zds_client.ZdsClient(
            self.zds_path, self.ztunnel, backoff_min=0.01, backoff_max=0.05
        )
        self._ztunnel_task = asyncio.create_task(self.ztunnel_client.run(), name="ztunnel")
        if self._agents:
            async with asyncio.timeout(DEADLINE):
                await self.ztunnel_client.wait_ready()
        return self.ztunnel_client

    async def stop_ztunnel(self) -> None:
        if self._ztunnel_task is not None:
            self._ztunnel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ztunnel_task
            self._ztunnel_task = None

    async def close(self) -> None:
        for agent in list(self._agents):
            await self.stop_agent(agent)
        await self.stop_ztunnel()

    # objects

    async def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        await self.api.create(
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": name, "labels": labels or {}}}
        )  # fmt: skip

    async def label_namespace(self, name: str, labels: dict[str, str | None]) -> None:
        await self.api.patch(resources.NAMESPACES, name, None, {"metadata": {"labels": labels}})

    async def pod(
        self, name: str, *, ns: str = "shop", node: str = NODE, labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return await self.api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": f"sa-{name}",
                    "containers": [{"name": "app", "command": ["sleep", "3600"]}],
                },
            }
        )

    async def label_pod(self, name: str, labels: dict[str, str | None], ns: str = "shop") -> None:
        await self.api.patch(resources.PODS, name, ns, {"metadata": {"labels": labels}})

    def annotation(self, name: str, ns: str = "shop") -> str | None:
        found = self.store.find(resources.PODS, name, ns)
        assert found is not None, f"pod {ns}/{name} is gone"
        return objects.annotations_of(found).get(ANNOTATION)

    def netns(self, name: str) -> str:
        """A stand-in netns file for pod `name`."""
        path = os.path.join(self.directory, "netns", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w"):
                pass
        return path

    # CNI events

    @staticmethod
    def add_event(pod: dict[str, Any], netns: str) -> plugin_server.PodAddEvent:
        return plugin_server.PodAddEvent(
            container_id=f"c-{objects.name(pod)}",
            netns=netns,
            ifname="eth0",
            pod_name=objects.name(pod),
            pod_namespace=objects.namespace(pod),
            pod_uid=objects.uid(pod),
            ips=("10.0.0.1",),
        )

    @staticmethod
    def del_event(
        pod: dict[str, Any], netns: str, container: str = ""
    ) -> plugin_server.PodDelEvent:
        return plugin_server.PodDelEvent(
            container_id=container or f"c-{objects.name(pod)}",
            netns=netns,
            ifname="eth0",
            pod_name=objects.name(pod),
            pod_namespace=objects.namespace(pod),
            pod_uid=objects.uid(pod),
        )

    # state as the outside sees it

    def is_captured(self, pod: dict[str, Any], netns: str) -> bool:
        """Fully captured: ztunnel serves it, rules installed, annotation set."""
        return (
            objects.uid(pod) in self.ztunnel.workloads
            and netns in self.redirector.installed
            and self.annotation(objects.name(pod), objects.namespace(pod)) == "enabled"
        )

    def is_released(self, pod: dict[str, Any], netns: str) -> bool:
        """Not captured at all."""
        return (
            objects.uid(pod) not in self.ztunnel.workloads
            and netns not in self.redirector.installed
            and self.annotation(objects.name(pod), objects.namespace(pod)) is None
        )


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too long.
    path = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def environment(directory: str) -> AsyncIterator[Env]:
    st = store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(os.path.join(directory, "store")),
    )
    server = apiserver.LocalApiServer(st)
    sock = os.path.join(directory, "api.sock")
    await server.start(sock)
    api = client.ApiClient(f"unix://{sock}", timeout=DEADLINE)
    env = Env(directory, st, server, api)
    try:
        await env.namespace("shop")
        yield env
    finally:
        await env.close()
        await api.close()
        await server.close()
        st.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` and check that it left no task behind."""

    async def checked() -> None:
        await main()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, leftover

    asyncio.run(checked())


def _stand_in_netns(path: str) -> None:
    if not os.path.isfile(path):
        raise netns.NetnsError(errno.ENOENT, f"cannot open network namespace {path}")


def _check_event(add: plugin_server.PodAddEvent) -> plugin_server.PodCheckEvent:
    return plugin_server.PodCheckEvent(**dataclasses.asdict(add))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


# -- tests -------------------------------------------------------------------------------------


def test_namespace_label_enrolls_running_pods_and_removing_it_releases_them(
    short_dir: str,
) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.start_ztunnel()
            agent = await env.start_agent()
            web1, web2 = await env.pod("web-1"), await env.pod("web-2")
            elsewhere = await env.pod("web-3", node="node-b")
            ns1, ns2 = env.netns("web-1"), env.netns("web-2")
            # CNI ADD in an unlabelled namespace: accepted, nothing captured, netns remembered.
            await agent.reconciler.on_add(env.add_event(web1, ns1))
            await agent.reconciler.on_add(env.add_event(web2, ns2))
            assert env.redirector.installed == {}
            assert env.ztunnel.workloads == {}
            cached = agent.cache.find(objects.uid(web1))
            assert cached is not None
            assert (cached.netns, cached.service_account) == (ns1, "sa-web-1")

            await env.label_namespace("shop", dict(AMBIENT))
            await wait_until(
                lambda: env.is_captured(web1, ns1) and env.is_captured(web2, ns2),
                "both pods are captured",
            )
            uid1, uid2 = objects.uid(web1), objects.uid(web2)
            assert env.ztunnel.workloads[uid1][0] == zds.WorkloadInfo("web-1", "shop", "sa-web-1")
            assert env.ztunnel.workloads[uid1][1] == os.stat(ns1).st_ino
            # ztunnel had the pod (and acked) before any rule redirected traffic to it.
            assert env.journal.of(uid1, ns1) == ["add", "install"]
            assert env.journal.of(uid2, ns2) == ["add", "install"]
            assert env.redirector.installed[ns1] == iptables.RedirectOptions()
            assert sorted((e.uid, e.netns_path) for e in agent.table.snapshot()) == sorted(
                [(uid1, ns1), (uid2, ns2)]
            )
            assert env.annotation("web-3") is None  # another node's pod is not ours

            await env.label_namespace("shop", {"istio.io/dataplane-mode": None})
            await wait_until(
                lambda: env.is_released(web1, ns1) and env.is_released(web2, ns2),
                "both pods are released",
            )
            # Rules go first, so nothing is redirected to a proxy that is already gone.
            assert env.journal.of(uid1, ns1) == ["add", "install", "remove", "del"]
            assert env.journal.of(uid2, ns2) == ["add", "install", "remove", "del"]
            assert agent.table.snapshot() == []
            assert objects.uid(elsewhere) not in env.ztunnel.workloads

    run(main)


def test_pod_label_none_opts_out_and_pod_labels_reconcile_running_pods(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.start_ztunnel()
            agent = await env.start_agent()
            web = await env.pod("web")
            legacy = await env.pod("legacy", labels={"istio.io/dataplane-mode": "none"})
            web_ns, legacy_ns = env.netns("web"), env.netns("legacy")

            with caplog.at_level(logging.INFO, logger="cni.reconciler"):
                await agent.reconciler.on_add(env.add_event(web, web_ns))
                # Synchronous: captured by the time ADD answers.
                assert env.is_captured(web, web_ns)
                await agent.reconciler.on_add(env.add_event(legacy, legacy_ns))
                assert env.is_released(legacy, legacy_ns)
                assert env.journal.of(objects.uid(legacy), legacy_ns) == []

            lines = [getattr(r, "fields", {}) for r in caplog.records]
            enrolled = [f for f in lines if f.get("outcome") == "enrolled"]
            refused = [f for f in lines if f.get("outcome") == "refused"]
            assert len(enrolled) == 1
            assert set(enrolled[0]) == {"pod", "uid", "action", "outcome", "duration_ms", "reason"}
            assert enrolled[0]["pod"] == "shop/web"
            assert enrolled[0]["uid"] == objects.uid(web)
            assert enrolled[0]["reason"] == "namespace shop has istio.io/dataplane-mode=ambient"
            assert refused == [
                {
                    "pod": "shop/legacy",
                    "uid": objects.uid(legacy),
                    "action": "enroll",
                    "outcome": "refused",
                    "duration_ms": refused[0]["duration_ms"],
                    "reason": "pod label istio.io/dataplane-mode=none opts out",
                }
            ]

            # Dropping the opt-out captures the running pod; restoring it releases the pod.
            await env.label_pod("legacy", {"istio.io/dataplane-mode": None})
            await wait_until(lambda: env.is_captured(legacy, legacy_ns), "legacy is captured")
            await env.label_pod("legacy", {"istio.io/dataplane-mode": "none"})
            await wait_until(lambda: env.is_released(legacy, legacy_ns), "legacy is released")
            assert env.is_captured(web, web_ns)
            assert agent.reconciler.find_retrying() == frozenset()

    run(main)


def test_queued_states_collapse_into_the_latest_and_other_pods_proceed(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.namespace("marker")
            await env.start_ztunnel()
            agent = await env.start_agent()
            web, probe = await env.pod("web"), await env.pod("probe", ns="marker")
            web_ns, probe_ns = env.netns("web"), env.netns("probe")
            await agent.reconciler.on_add(env.add_event(web, web_ns))
            await agent.reconciler.on_add(env.add_event(probe, probe_ns))
            assert env.is_captured(web, web_ns)
            gate = env.redirector.gates[web_ns] = threading.Event()
            try:
                # web's release starts and hangs in the redirector...
                await env.label_namespace("shop", {"istio.io/dataplane-mode": None})
                await wait_until(
                    lambda: env.journal.of(web_ns)[-1:] == ["remove"], "web's release is running"
                )
                # ...while its desired state flips three times.
                for value in (AMBIENT, {"istio.io/dataplane-mode": None}, AMBIENT):
                    await env.label_namespace("shop", dict(value))
                # Another pod is not held up, and since namespace events arrive in order, its
                # capture also proves the agent has seen every flip above.
                await env.label_namespace("marker", dict(AMBIENT))
                await wait_until(lambda: env.is_captured(probe, probe_ns), "probe is captured")
                assert env.journal.of(objects.uid(web), web_ns) == ["add", "install", "remove"]
            finally:
                gate.set()
            # One release, then one enroll for the newest state: the flips in between collapsed.
            expected = ["add", "install", "remove", "del", "add", "install"]
            await wait_until(
                lambda: (
                    env.journal.of(objects.uid(web), web_ns) == expected
                    and env.is_captured(web, web_ns)
                ),
                "web is captured again",
            )
            await wait_until(lambda: agent.reconciler.is_idle, "the reconciler is idle")
            assert env.journal.of(objects.uid(web), web_ns) == expected

    run(main)


def test_deleting_a_pod_releases_it_and_forgets_its_netns(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.start_ztunnel()
            agent = await env.start_agent()
            graceful, abrupt = await env.pod("graceful"), await env.pod("abrupt")
            graceful_ns, abrupt_ns = env.netns("graceful"), env.netns("abrupt")
            await agent.reconciler.on_add(env.add_event(graceful, graceful_ns))
            await agent.reconciler.on_add(env.add_event(abrupt, abrupt_ns))
            assert env.is_captured(graceful, graceful_ns)
            assert env.is_captured(abrupt, abrupt_ns)
            graceful_uid, abrupt_uid = objects.uid(graceful), objects.uid(abrupt)

            # A graceful delete only sets deletionTimestamp: the pod is released right away.
            await env.api.delete(resources.PODS, "graceful", "shop")
            await wait_until(
                lambda: (
                    env.is_released(graceful, graceful_ns)
                    and agent.cache.find(graceful_uid) is None
                ),
                "the terminating pod is released and its netns forgotten",
            )
            # An immediate delete (DELETED event).
            await env.api.delete(resources.PODS, "abrupt", "shop", grace_period_seconds=0)
            await wait_until(
                lambda: (
                    abrupt_uid not in env.ztunnel.workloads
                    and abrupt_ns not in env.redirector.installed
                    and agent.cache.find(abrupt_uid) is None
                ),
                "the deleted pod is released and its netns forgotten",
            )
            assert env.journal.of(abrupt_uid, abrupt_ns) == ["add", "install", "remove", "del"]
            # The runtime's DEL comes afterwards and finds nothing left to do.
            await agent.reconciler.on_del(env.del_event(abrupt, abrupt_ns))
            assert env.journal.of(abrupt_uid, abrupt_ns) == ["add", "install", "remove", "del"]
            assert agent.table.snapshot() == []

    run(main)


async def _enrolled(env: Env) -> tuple[Agent, dict[str, Any], str, str]:
    """An ambient namespace, ztunnel, the agent, and pod web captured through its CNI ADD."""
    await env.label_namespace("shop", dict(AMBIENT))
    await env.start_ztunnel()
    agent = await env.start_agent()
    web = await env.pod("web")
    web_ns = env.netns("web")
    await agent.reconciler.on_add(env.add_event(web, web_ns))
    return agent, web, web_ns, objects.uid(web)


def test_a_link_appearing_in_a_captured_pod_gets_the_redirection(short_dir: str) -> None:
    """eBPF mode attaches per link: the pod's links are watched from before its install to its
    release, and a new link means a reinstall (which covers every link)."""

    async def main() -> None:
        async with environment(short_dir) as env:
            env.redirector.link_watches = {}
            _, web, ns, uid = await _enrolled(env)
            assert env.journal.of(uid, ns) == ["add", "watch", "install"]

            env.redirector.link_watches[ns].announce()
            await wait_until(
                lambda: env.journal.of(uid, ns) == ["add", "watch", "install", "install"],
                "the pod is reinstalled after its new link",
            )
            assert env.is_captured(web, ns)

            await env.label_namespace("shop", {"istio.io/dataplane-mode": None})
            await wait_until(lambda: env.is_released(web, ns), "the pod is released")
            assert env.journal.of(uid, ns) == [
                *("add", "watch", "install", "install"),
                *("remove", "unwatch", "del"),
            ]
            assert env.redirector.link_watches[ns].closed

    run(main)


def test_an_add_naming_no_network_namespace_leaves_the_captured_pod_alone(
    short_dir: str,
) -> None:
    """Found by an audit: such an ADD used to release the running pod ("sandbox replaced")
    and forget its namespace, leaving it broken until it was recreated."""

    async def main() -> None:
        async with environment(short_dir) as env:
            agent, web, web_ns, uid = await _enrolled(env)
            before = agent.cache.find(uid)

            bogus = os.path.join(short_dir, "no-such-netns")
            with pytest.raises(
                reconciler.CaptureError, match=f"cannot open network namespace {bogus}"
            ):
                await agent.reconciler.on_add(env.add_event(web, bogus))
            assert env.is_captured(web, web_ns)
            assert agent.cache.find(uid) == before
            assert env.journal.of(uid, web_ns, bogus) == ["add", "install"]

    run(main)


def test_a_check_that_finds_the_redirection_gone_fails_and_reinstalls_it(
    short_dir: str,
) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            agent, web, web_ns, uid = await _enrolled(env)
            await agent.reconciler.on_check(_check_event(env.add_event(web, web_ns)))

            del env.redirector.installed[web_ns]  # someone flushed the pod's rules
            with pytest.raises(reconciler.CaptureError, match="redirection is missing"):
                await agent.reconciler.on_check(_check_event(env.add_event(web, web_ns)))
            await wait_until(lambda: env.is_captured(web, web_ns), "the pod is reinstalled")
            assert env.journal.of(uid, web_ns) == ["add", "install", "install"]
            await agent.reconciler.on_check(_check_event(env.add_event(web, web_ns)))

    run(main)


def test_cni_del_releases_the_pod_and_tolerates_missing_state(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.start_ztunnel()
            agent = await env.start_agent()
            web = await env.pod("web")
            web_ns = env.netns("web")
            await agent.reconciler.on_add(env.add_event(web, web_ns))
            assert env.is_captured(web, web_ns)
            await agent.reconciler.on_check(_check_event(env.add_event(web, web_ns)))

            # A DEL for an older sandbox of the same pod does not touch the current one.
            await agent.reconciler.on_del(env.del_event(web, web_ns, container="c-old"))
            assert env.is_captured(web, web_ns)

            await agent.reconciler.on_del(env.del_event(web, web_ns))
            assert env.is_released(web, web_ns)  # synchronous, like ADD
            assert agent.cache.find(objects.uid(web)) is None
            with pytest.raises(reconciler.CaptureError, match="should be captured"):
                await agent.reconciler.on_check(_check_event(env.add_event(web, web_ns)))
            # DEL is idempotent, and fine for pods the agent never heard of.
            await agent.reconciler.on_del(env.del_event(web, web_ns))
            stranger = plugin_server.PodDelEvent("c-x", "", "eth0", "", "", "")
            await agent.reconciler.on_del(stranger)
            assert env.journal.of(objects.uid(web), web_ns) == ["add", "install", "remove", "del"]

            # A new sandbox (ADD after DEL) is captured again; its netns is known once more.
            web_ns2 = env.netns("web-sandbox-2")
            await agent.reconciler.on_add(env.add_event(web, web_ns2))
            assert env.is_captured(web, web_ns2)

    run(main)


def test_add_with_no_ztunnel_fails_closed_with_a_clear_message(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            agent = await env.start_agent()
            web = await env.pod("web")
            web_ns = env.netns("web")
            with pytest.raises(reconciler.CaptureError) as caught:
                await agent.reconciler.on_add(env.add_event(web, web_ns))
            assert str(caught.value) == "cannot capture pod shop/web: no ztunnel connection"
            assert env.redirector.installed == {}
            assert env.journal.of(web_ns) == []  # no rule was even attempted
            assert agent.table.snapshot() == []
            assert env.annotation("web") is None
            # The netns stays known, so the pod can still be captured later.
            assert agent.cache.find(objects.uid(web)) is not None

    run(main)


def test_install_failure_undoes_the_zds_add_then_a_retry_captures(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.start_ztunnel()
            agent = await env.start_agent(initial_retry=0.05, max_retry=0.2)
            web = await env.pod("web")
            web_ns, uid = env.netns("web"), objects.uid(web)
            env.redirector.failure = "iptables-restore exited 1: no such table"
            with pytest.raises(reconciler.CaptureError) as caught:
                await agent.reconciler.on_add(env.add_event(web, web_ns))
            assert str(caught.value) == (
                "cannot capture pod shop/web: cannot install the redirection: "
                "iptables-restore exited 1: no such table"
            )
            assert env.journal.of(uid, web_ns) == ["add", "install", "del"]
            assert env.is_released(web, web_ns)
            assert agent.table.snapshot() == []
            assert uid in agent.reconciler.find_retrying()

            env.redirector.failure = ""
            await wait_until(lambda: env.is_captured(web, web_ns), "the retry captures the pod")
            assert env.journal.of(uid, web_ns)[-2:] == ["add", "install"]
            await wait_until(
                lambda: agent.reconciler.find_retrying() == frozenset(), "no retry is pending"
            )

    run(main)


def test_a_ztunnel_connecting_late_gets_the_pending_pods_enrolled(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            # A retry backoff far beyond the deadline: only the connect can trigger the enroll.
            agent = await env.start_agent(initial_retry=600.0, max_retry=600.0)
            web1, web2 = await env.pod("web-1"), await env.pod("web-2")
            ns1, ns2 = env.netns("web-1"), env.netns("web-2")
            await agent.reconciler.on_add(env.add_event(web1, ns1))
            await agent.reconciler.on_add(env.add_event(web2, ns2))
            await env.label_namespace("shop", dict(AMBIENT))
            uids = frozenset({objects.uid(web1), objects.uid(web2)})
            await wait_until(
                lambda: agent.reconciler.find_retrying() == uids,
                "both pods failed for lack of a ztunnel",
            )
            assert env.redirector.installed == {}
            assert env.annotation("web-1") is None

            await env.start_ztunnel()
            await wait_until(
                lambda: env.is_captured(web1, ns1) and env.is_captured(web2, ns2),
                "the late ztunnel gets both pods",
            )

    run(main)


def test_a_restarted_ztunnel_gets_the_pods_that_failed_while_it_was_away(
    short_dir: str,
) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            agent = await env.start_agent(initial_retry=600.0, max_retry=600.0)
            await env.start_ztunnel()
            await env.stop_ztunnel()
            await asyncio.wait_for(agent.zds.wait_disconnected(), DEADLINE)
            web1 = await env.pod("web-1")
            ns1 = env.netns("web-1")
            await agent.reconciler.on_add(env.add_event(web1, ns1))
            await env.label_namespace("shop", dict(AMBIENT))
            await wait_until(
                lambda: agent.reconciler.find_retrying() == frozenset({objects.uid(web1)}),
                "the pod failed while ztunnel was away",
            )

            # Only the reconnect can trigger the enroll: the backoff is far beyond the deadline.
            await env.start_ztunnel()
            await wait_until(lambda: env.is_captured(web1, ns1), "the restarted ztunnel has it")

    run(main)


def test_restart_rereads_the_netns_cache_and_resends_the_snapshot(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            ztunnel = await env.start_ztunnel()
            first = await env.start_agent()
            pods = {name: await env.pod(name) for name in ("keep", "opt-out", "vanish", "gone")}
            paths = {name: env.netns(name) for name in pods}
            uids = {name: objects.uid(pod) for name, pod in pods.items()}
            for name, pod in pods.items():
                await first.reconciler.on_add(env.add_event(pod, paths[name]))
                assert env.is_captured(pod, paths[name])

            mark = env.journal.mark()
            await env.stop_agent(first)
            # Stopping releases nothing: rules stay, ztunnel keeps every pod.
            assert env.journal.since(mark) == []
            assert set(env.redirector.installed) == set(paths.values())
            assert set(env.ztunnel.workloads) == set(uids.values())

            # While no agent runs: a pod opts out, a sandbox disappears, a pod is deleted.
            await env.label_pod("opt-out", {"istio.io/dataplane-mode": "none"})
            os.unlink(paths["vanish"])
            await env.api.delete(resources.PODS, "gone", "shop", grace_period_seconds=0)
            await wait_until(lambda: not ztunnel.is_ready, "ztunnel noticed the agent left")

            # The new agent starts while the API server is down: the snapshot comes from the
            # netns cache and the rules in place alone.
            await env.stop_api()
            second = await env.start_agent(wait_synced=False)
            await wait_until(lambda: ztunnel.is_ready, "ztunnel took the new snapshot")
            snapshot = env.journal.since(mark)
            expected = sorted(uids[name] for name in ("keep", "opt-out", "gone"))
            assert sorted(key for what, key in snapshot if what == "add") == expected
            assert snapshot[-1] == ("snapshot_done", ",".join(expected))
            # The pod whose netns vanished is forgotten, so ztunnel dropped it.
            assert sorted(env.ztunnel.workloads) == expected
            assert second.cache.find(uids["vanish"]) is None
            assert not second.reconciler.is_synced

            await env.start_api()
            async with asyncio.timeout(DEADLINE):
                await second.reconciler.wait_synced()

            # Then each pod is decided again: kept, released, released and forgotten.
            await wait_until(
                lambda: env.is_released(pods["opt-out"], paths["opt-out"]), "opt-out is released"
            )
            await wait_until(
                lambda: (
                    uids["gone"] not in env.ztunnel.workloads
                    and paths["gone"] not in env.redirector.installed
                    and second.cache.find(uids["gone"]) is None
                ),
                "the deleted pod is released and forgotten",
            )
            assert env.is_captured(pods["keep"], paths["keep"])
            assert env.ztunnel.workloads[uids["keep"]][1] == os.stat(paths["keep"]).st_ino
            assert [e.uid for e in second.table.snapshot()] == [uids["keep"]]
            # The kept pod's rules were re-applied with the current options.
            assert ("install", paths["keep"]) in env.journal.since(mark)
            assert ("del", uids["keep"]) not in env.journal.since(mark)
            on_disk = json.loads(await asyncio.to_thread(_read, second.cache.path))
            assert set(on_disk["pods"]) == {uids["keep"], uids["opt-out"]}

    run(main)


def test_annotation_patch_failure_keeps_the_capture_and_is_retried(short_dir: str) -> None:
    async def main() -> None:
        async with environment(short_dir) as env:
            await env.label_namespace("shop", dict(AMBIENT))
            await env.start_ztunnel()
            web = await env.pod("web")  # before the agent: its first list includes the pod
            web_ns = env.netns("web")
            agent = await env.start_agent(initial_retry=0.05, max_retry=0.2)

            # The API server goes away: ADD still captures from the informer caches...
            await env.stop_api()
            await agent.reconciler.on_add(env.add_event(web, web_ns))
            assert objects.uid(web) in env.ztunnel.workloads
            assert web_ns in env.redirector.installed
            # ...the PATCH that failed is retried, and the capture is not undone for it.
            assert objects.uid(web) in agent.reconciler.find_retrying()
            assert env.journal.of(objects.uid(web), web_ns) == ["add", "install"]

            await env.start_api()
            await wait_until(lambda: env.is_captured(web, web_ns), "the annotation is written")
            assert env.journal.of(objects.uid(web), web_ns) == ["add", "install"]

    run(main)


# -- the netns cache ---------------------------------------------------------------------------


def _entry(uid: str, netns: str) -> netns_cache.NetnsEntry:
    return netns_cache.NetnsEntry(uid, netns, "shop", f"pod-{uid}", "web", f"c-{uid}")


def test_netns_cache_survives_a_reload_and_prunes_vanished_namespaces(short_dir: str) -> None:
    state = os.path.join(short_dir, "agent")
    kept, vanished = os.path.join(short_dir, "kept"), os.path.join(short_dir, "vanished")
    for path in (kept, vanished):
        with open(path, "w"):
            pass
    cache = netns_cache.NetnsCache(state)
    cache.load()  # no file yet: empty
    assert cache.entries() == []
    cache.record(_entry("a", kept))
    cache.record(_entry("b", vanished))
    cache.record(_entry("c", kept))
    assert cache.forget("c")
    assert not cache.forget("c")
    assert os.stat(cache.path).st_mode & 0o777 == 0o600
    assert os.listdir(state) == [netns_cache.FILE_NAME]  # no temporary file left behind

    reloaded = netns_cache.NetnsCache(state)
    reloaded.load()
    assert sorted(e.uid for e in reloaded.entries()) == ["a", "b"]
    assert reloaded.find("a") == _entry("a", kept)
    assert reloaded.find_by_container("c-b") == _entry("b", vanished)

    os.unlink(vanished)
    assert reloaded.prune() == [_entry("b", vanished)]
    again = netns_cache.NetnsCache(state)
    again.load()
    assert [e.uid for e in again.entries()] == ["a"]


def test_netns_cache_refuses_a_corrupt_file_and_skips_bad_entries(short_dir: str) -> None:
    cache = netns_cache.NetnsCache(short_dir)
    with open(cache.path, "w") as f:
        f.write("{not json")
    with pytest.raises(netns_cache.CorruptCacheError, match="is not valid JSON"):
        cache.load()
    doc = {
        "version": 1,
        "pods": {
            "good": {"netns": "/run/netns/a", "namespace": "shop", "name": "a"},
            "relative": {"netns": "run/netns/b", "namespace": "shop", "name": "b"},
            "no-name": {"netns": "/run/netns/c", "namespace": "shop"},
        },
    }
    with open(cache.path, "w") as f:
        json.dump(doc, f)
    cache.load()
    assert [(e.uid, e.service_account) for e in cache.entries()] == [("good", "default")]


def test_netns_cache_write_failure_leaves_the_cache_unchanged(short_dir: str) -> None:
    blocker = os.path.join(short_dir, "file")
    with open(blocker, "w"):
        pass
    cache = netns_cache.NetnsCache(os.path.join(blocker, "state"))  # a file where a dir must be
    with pytest.raises(netns_cache.NetnsCacheError, match="cannot write"):
        cache.record(_entry("a", "/run/netns/a"))
    assert cache.entries() == []


# -- the process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({}, "environment variable NODE_NAME is required", id="missing-node"),
        pytest.param(
            {"NODE_NAME": "n", "KUBE_API": "ftp://x"},
            "KUBE_API='ftp://x' must be unix:///path/to/api.sock or http(s)://host:port",
            id="bad-api",
        ),
        pytest.param(
            {"NODE_NAME": "n", "KUBE_API": "unix:///a.sock", "DNS_CAPTURE": "maybe"},
            "DNS_CAPTURE='maybe' must be true or false",
            id="bad-boolean",
        ),
    ],
)
def test_agent_process_reports_config_errors(env: dict[str, str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cni.agent"],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"mesh-cni-agent: {message}\n"
