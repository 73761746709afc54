"""Scheduling within node capacity, through the local API server over a real Unix socket with a
file-backed store: a pod that fits nowhere waits with kube-scheduler's reason in its
PodScheduled condition (seen by watchers and by GET, which is what ``meshctl get -o yaml``
shows), and is bound the moment room appears."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from controller.sources.local import apiserver, kinds, persistence, store
from meshcore.kube import client, objects, resources

DEADLINE = 10.0
NS = "shop"


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too long.
    path = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` and check that it left no task behind."""

    async def checked() -> None:
        await main()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, leftover

    asyncio.run(checked())


def _file_store(directory: str) -> store.ObjectStore:
    return store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(os.path.join(directory, "store")),
    )


@contextlib.asynccontextmanager
async def running(directory: str) -> AsyncIterator[client.ApiClient]:
    st = _file_store(directory)
    sock = os.path.join(directory, "api.sock")
    server = apiserver.LocalApiServer(st)
    await server.start(sock)
    api = client.ApiClient(f"unix://{sock}", timeout=DEADLINE)
    try:
        yield api
    finally:
        await api.close()
        await server.close()
        st.close()


def node(name: str, pods: str, *, cordoned: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"unschedulable": cordoned},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "capacity": {"pods": pods},
            "allocatable": {"pods": pods},
        },
    }


def pod(name: str, node_name: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "command": ["sleep", "3600"]}]}
    if node_name:
        spec["nodeName"] = node_name
    meta = {"name": name, "namespace": NS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def scheduled(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The PodScheduled condition, without its timestamp (None when there is none)."""
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == "PodScheduled":
            return {k: v for k, v in c.items() if k != "lastTransitionTime"}
    return None


def waiting(message: str) -> dict[str, Any]:
    return {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }


BOUND = {"type": "PodScheduled", "status": "True"}


class Events:
    """The pod events of one namespace, in order; `next()` waits for the next one."""

    def __init__(self, stream: AsyncIterator[objects.WatchEvent]) -> None:
        self._stream = stream

    async def next(self) -> tuple[str, str, dict[str, Any]]:
        async with asyncio.timeout(DEADLINE):
            event = await anext(self._stream)
        return event.type, objects.name(event.object), event.object


async def _create_ns(api: client.ApiClient) -> str:
    ns = await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    return objects.resource_version(ns)


async def _finish(api: client.ApiClient, name: str, phase: str) -> dict[str, Any]:
    """What a kubelet writes when a pod's containers are done."""
    return await api.patch(
        resources.PODS, name, NS, {"status": {"phase": phase}}, subresource="status"
    )


def test_a_pod_waits_with_the_reason_until_a_slot_frees(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as api:
            since = await _create_ns(api)
            await api.create(node("n1", "1"))
            await api.create(node("n2", "1"))
            await api.create(node("n3", "5", cordoned=True))
            stream = api.watch(resources.PODS, NS, resource_version=since)
            async with contextlib.aclosing(stream):
                events = Events(stream)
                a = await api.create(pod("a"))
                b = await api.create(pod("b"))
                assert {a["spec"]["nodeName"], b["spec"]["nodeName"]} == {"n1", "n2"}
                assert scheduled(a) == scheduled(b) == BOUND
                c = await api.create(pod("c"))
                # Like kube-scheduler, the reason comes in an update after the create.
                assert "nodeName" not in c["spec"]
                assert c["status"] == {"phase": "Pending"}
                full = waiting(
                    "0/3 nodes are available: 1 node(s) were unschedulable, 2 Too many pods."
                )
                assert [(t, n) for t, n, _ in [await events.next() for _ in range(3)]] == [
                    ("ADDED", "a"),
                    ("ADDED", "b"),
                    ("ADDED", "c"),
                ]
                kind, name, obj = await events.next()
                assert (kind, name, scheduled(obj)) == ("MODIFIED", "c", full)
                stored = await api.get(resources.PODS, "c", NS)
                assert scheduled(stored) == full
                assert stored["status"]["phase"] == "Pending"
                since_waiting = stored["status"]["conditions"][0]["lastTransitionTime"]

                # A node heartbeat re-runs the scheduler: nothing changed, so no pod event
                # (the next event is the one that follows).
                await api.patch(
                    resources.NODES,
                    "n1",
                    None,
                    {
                        "status": {
                            "conditions": [{"type": "Ready", "status": "True", "reason": "x"}]
                        }
                    },
                    subresource="status",
                )
                # a finishes: its slot goes to c at once.
                a_node = a["spec"]["nodeName"]
                await _finish(api, "a", "Succeeded")
                kind, name, obj = await events.next()
                assert (kind, name, obj["status"]["phase"]) == ("MODIFIED", "a", "Succeeded")
                kind, name, obj = await events.next()
                assert (kind, name, obj["spec"].get("nodeName")) == ("MODIFIED", "c", a_node)
                assert scheduled(obj) == BOUND
                assert obj["status"]["conditions"][0]["lastTransitionTime"] >= since_waiting

                # A terminating pod still runs: its slot frees when its kubelet removes it.
                d = await api.create(pod("d"))
                kind, name, obj = await events.next()
                assert (kind, name) == ("ADDED", "d")
                kind, name, obj = await events.next()
                assert (kind, name, scheduled(obj)) == ("MODIFIED", "d", full)
                marked = await api.delete(resources.PODS, "b", NS)
                assert marked is not None
                assert objects.is_terminating(marked)
                kind, name, obj = await events.next()
                assert (kind, name, objects.is_terminating(obj)) == ("MODIFIED", "b", True)
                await api.delete(
                    resources.PODS, "b", NS, grace_period_seconds=0, precondition_uid=objects.uid(b)
                )
                kind, name, _ = await events.next()
                assert (kind, name) == ("DELETED", "b")
                kind, name, obj = await events.next()
                assert (kind, name, obj["spec"].get("nodeName")) == (
                    "MODIFIED",
                    "d",
                    b["spec"]["nodeName"],
                )
                assert scheduled(obj) == BOUND
                assert objects.uid(obj) == objects.uid(d)

    run(main)


def test_a_new_node_or_more_capacity_takes_the_waiting_pod(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as api:
            await _create_ns(api)
            await api.create(pod("web"))
            web = await api.get(resources.PODS, "web", NS)
            assert scheduled(web) == waiting("no nodes available to schedule pods")
            first = web["status"]["conditions"][0]["lastTransitionTime"]

            # A node with no room: still waiting, with the new reason and the same since.
            await api.create(node("n1", "0"))
            web = await api.get(resources.PODS, "web", NS)
            assert scheduled(web) == waiting("0/1 nodes are available: 1 Too many pods.")
            assert web["status"]["conditions"][0]["lastTransitionTime"] == first
            assert "nodeName" not in web["spec"]

            # Its kubelet restarts with a larger --max-pods: the pod is bound.
            await api.patch(
                resources.NODES,
                "n1",
                None,
                {"status": {"allocatable": {"pods": "1"}}},
                subresource="status",
            )
            web = await api.get(resources.PODS, "web", NS)
            assert web["spec"]["nodeName"] == "n1"
            assert scheduled(web) == BOUND

            # A second node is created while the first is full: it takes the next pod.
            await api.create(pod("api"))
            assert "nodeName" not in (await api.get(resources.PODS, "api", NS))["spec"]
            await api.create(node("n2", "3"))
            bound = await api.get(resources.PODS, "api", NS)
            assert bound["spec"]["nodeName"] == "n2"
            assert scheduled(bound) == BOUND

    run(main)


def test_a_pod_named_onto_a_full_node_counts_until_it_fails(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as api:
            await _create_ns(api)
            await api.create(node("n1", "1"))
            first = await api.create(pod("first"))
            assert first["spec"]["nodeName"] == "n1"
            # spec.nodeName bypasses the scheduler: the API stores it (its kubelet decides).
            direct = await api.create(pod("direct", node_name="n1"))
            assert direct["spec"]["nodeName"] == "n1"
            assert scheduled(direct) is None
            await api.create(pod("later"))
            full = waiting("0/1 nodes are available: 1 Too many pods.")
            assert scheduled(await api.get(resources.PODS, "later", NS)) == full

            # The kubelet rejects "direct": it frees nothing that "first" does not hold.
            await api.patch(
                resources.PODS,
                "direct",
                NS,
                {"status": {"phase": "Failed", "reason": "OutOfpods"}},
                subresource="status",
            )
            later = await api.get(resources.PODS, "later", NS)
            assert "nodeName" not in later["spec"]
            assert scheduled(later) == full
            # A failed pod goes at once on delete; "first" going makes room.
            await api.delete(resources.PODS, "direct", NS)
            assert "nodeName" not in (await api.get(resources.PODS, "later", NS))["spec"]
            await api.delete(resources.PODS, "first", NS, grace_period_seconds=0)
            later = await api.get(resources.PODS, "later", NS)
            assert later["spec"]["nodeName"] == "n1"
            assert scheduled(later) == BOUND

    run(main)


def test_pending_pods_are_bound_oldest_first(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as api:
            await _create_ns(api)
            for name in ("zeta", "alpha", "mid"):
                await api.create(pod(name))
            await api.create(node("n1", "2"))
            bound = {
                objects.name(p): p["spec"].get("nodeName")
                for p in (await api.list(resources.PODS, NS)).items
            }
            assert bound == {"zeta": "n1", "alpha": "n1", "mid": None}
            mid = await api.get(resources.PODS, "mid", NS)
            assert scheduled(mid) == waiting("0/1 nodes are available: 1 Too many pods.")

    run(main)


def test_the_reason_is_persisted_and_not_rewritten_after_a_restart(short_dir: str) -> None:
    st = _file_store(short_dir)
    st.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    st.create(resources.NODES, node("n1", "1"))
    st.create(resources.PODS, pod("first"), NS)
    st.create(resources.PODS, pod("second"), NS)
    before = st.get(resources.PODS, "second", NS)
    version = st.resource_version
    st.close()

    again = _file_store(short_dir)
    try:
        # The restart re-runs the scheduler: same answer, so no new version.
        assert again.resource_version == version
        after = again.get(resources.PODS, "second", NS)
        assert after == before
        assert scheduled(after) == waiting("0/1 nodes are available: 1 Too many pods.")
        again.delete(resources.PODS, "first", NS, grace_period_seconds=0)
        assert again.get(resources.PODS, "second", NS)["spec"]["nodeName"] == "n1"
    finally:
        again.close()
