"""The Informer against the local API server over a real Unix socket."""

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
from meshcore.kube import client, errors, informer, objects, resources

DEADLINE = 10.0


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        await main()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, leftover

    asyncio.run(checked())


@contextlib.asynccontextmanager
async def serving(directory: str, **store_options: Any) -> AsyncIterator[store.ObjectStore]:
    st = store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(os.path.join(directory, "store")),
        **store_options,
    )
    server = apiserver.LocalApiServer(st)
    await server.start(os.path.join(directory, "api.sock"))
    try:
        yield st
    finally:
        await server.close()
        st.close()


@contextlib.asynccontextmanager
async def informing(
    api: client.ApiClient, rtype: resources.ResourceType, recorder: Recorder, **options: Any
) -> AsyncIterator[informer.Informer]:
    inf = informer.Informer(api, rtype, handler=recorder.handler, **options)
    task = asyncio.create_task(inf.run())
    try:
        yield inf
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Recorder:
    """Collects handler events; `until` waits for a condition on them, with a deadline."""

    def __init__(self) -> None:
        self.events: list[objects.WatchEvent] = []
        self._changed = asyncio.Condition()
        self.hold: Callable[[objects.WatchEvent], Awaitable[None]] | None = None

    async def handler(self, event: objects.WatchEvent) -> None:
        self.events.append(event)
        async with self._changed:
            self._changed.notify_all()
        if self.hold is not None:
            await self.hold(event)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE), self._changed:
            await self._changed.wait_for(predicate)

    def seen(self, kind: str, name: str) -> bool:
        return any(e.type == kind and objects.name(e.object) == name for e in self.events)


def names(inf: informer.Informer) -> set[str]:
    return {objects.name(o) for o in inf.items()}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod(name: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "command": ["true"]}]},
    }


def test_informer_lists_then_follows_changes(short_dir: str) -> None:
    async def main() -> None:
        async with serving(short_dir):
            api = client.ApiClient(f"unix://{short_dir}/api.sock", timeout=DEADLINE)
            try:
                await api.create(namespace("shop"))
                recorder = Recorder()
                async with informing(api, resources.NAMESPACES, recorder) as inf:
                    async with asyncio.timeout(DEADLINE):
                        await inf.wait_synced()
                    assert inf.is_synced
                    assert names(inf) == {"default", "shop"}
                    assert [e.type for e in recorder.events] == ["ADDED", "ADDED"]

                    await api.patch(
                        resources.NAMESPACES, "shop", None, {"metadata": {"labels": {"a": "b"}}}
                    )
                    await recorder.until(lambda: recorder.seen("MODIFIED", "shop"))
                    found = inf.find("shop")
                    assert found is not None
                    assert objects.labels(found) == {"a": "b"}

                    await api.delete(resources.NAMESPACES, "shop")
                    await recorder.until(lambda: recorder.seen("DELETED", "shop"))
                    assert inf.find("shop") is None
                    assert names(inf) == {"default"}
            finally:
                await api.close()

    run(main)


def test_informer_with_field_selector_sees_only_its_node(short_dir: str) -> None:
    async def main() -> None:
        async with serving(short_dir):
            api = client.ApiClient(f"unix://{short_dir}/api.sock", timeout=DEADLINE)
            try:
                recorder = Recorder()
                async with informing(
                    api, resources.PODS, recorder, field_selector="spec.nodeName=n1"
                ) as inf:
                    async with asyncio.timeout(DEADLINE):
                        await inf.wait_synced()
                    await api.create(pod("other", "n2"))
                    await api.create(pod("mine", "n1"))
                    await recorder.until(lambda: recorder.seen("ADDED", "mine"))
                    assert names(inf) == {"mine"}
                    assert inf.find("mine", "default") is not None
                    assert not recorder.seen("ADDED", "other")
            finally:
                await api.close()

    run(main)


def test_informer_relists_after_410_and_converges(short_dir: str) -> None:
    async def main() -> None:
        async with serving(short_dir, history_size=2):
            api = client.ApiClient(f"unix://{short_dir}/api.sock", timeout=DEADLINE)
            try:
                await api.create(namespace("a"))
                recorder = Recorder()
                entered, release = asyncio.Event(), asyncio.Event()

                async def hold(event: objects.WatchEvent) -> None:
                    # Stall the informer inside its first list, before it starts watching.
                    if objects.name(event.object) == "a" and not entered.is_set():
                        entered.set()
                        await release.wait()

                recorder.hold = hold
                async with informing(api, resources.NAMESPACES, recorder) as inf:
                    async with asyncio.timeout(DEADLINE):
                        await entered.wait()
                    # More changes than the history keeps: the watch from the list's version
                    # can only get 410, and only a relist can see these namespaces.
                    for name in ("b", "c", "d"):
                        await api.create(namespace(name))
                    release.set()
                    await recorder.until(lambda: names(inf) == {"a", "b", "c", "d", "default"})
                    assert all(recorder.seen("ADDED", n) for n in ("b", "c", "d"))
                    # And it watches again after the relist.
                    await api.delete(resources.NAMESPACES, "b")
                    await recorder.until(lambda: recorder.seen("DELETED", "b"))
                    assert names(inf) == {"a", "c", "d", "default"}
            finally:
                await api.close()

    run(main)


def test_informer_synthesises_deleted_for_objects_gone_while_disconnected(short_dir: str) -> None:
    async def main() -> None:
        recorder = Recorder()
        async with contextlib.AsyncExitStack() as stack:
            api = client.ApiClient(f"unix://{short_dir}/api.sock", timeout=DEADLINE)
            stack.push_async_callback(api.close)
            async with serving(short_dir) as first:
                await api.create(namespace("a"))
                await api.create(namespace("b"))
                inf = await stack.enter_async_context(
                    informing(api, resources.NAMESPACES, recorder)
                )
                async with asyncio.timeout(DEADLINE):
                    await inf.wait_synced()
                assert names(inf) == {"a", "b", "default"}
                last_seen = first.resource_version
            # The server is down; the store changes on disk behind the informer's back, and with
            # a history of one change a watch could not replay it: only a relist can tell.
            offline = store.ObjectStore(
                kinds.build_registry(),
                store_persistence=persistence.FilePersistence(os.path.join(short_dir, "store")),
                history_size=1,
            )
            stack.callback(offline.close)
            offline.delete(resources.NAMESPACES, "a")
            offline.create(resources.NAMESPACES, {"metadata": {"name": "c"}})
            offline.create(resources.NAMESPACES, {"metadata": {"name": "d"}})
            assert offline.resource_version > last_seen
            server = apiserver.LocalApiServer(offline)
            await server.start(os.path.join(short_dir, "api.sock"))
            stack.push_async_callback(server.close)

            await recorder.until(lambda: names(inf) == {"b", "c", "d", "default"})
            deleted = [e for e in recorder.events if e.type == "DELETED"]
            assert [objects.name(e.object) for e in deleted] == ["a"]
            assert recorder.seen("ADDED", "c")
            assert recorder.seen("ADDED", "d")

    run(main)


class FailureSignallingClient(client.ApiClient):
    """The real client, telling the test when a list could not reach the server."""

    def __init__(self, server: str) -> None:
        super().__init__(server, timeout=DEADLINE)
        self.list_failed = asyncio.Event()

    async def list(self, *args: Any, **kwargs: Any) -> objects.ObjectList:
        try:
            return await super().list(*args, **kwargs)
        except errors.ApiConnectionError:
            self.list_failed.set()
            raise


def test_informer_waits_for_a_server_that_is_not_up_yet(short_dir: str) -> None:
    async def main() -> None:
        api = FailureSignallingClient(f"unix://{short_dir}/api.sock")
        recorder = Recorder()
        try:
            async with informing(api, resources.NAMESPACES, recorder) as inf:
                async with asyncio.timeout(DEADLINE):
                    await api.list_failed.wait()
                assert not inf.is_synced
                async with serving(short_dir):
                    async with asyncio.timeout(DEADLINE):
                        await inf.wait_synced()
                    assert names(inf) == {"default"}
        finally:
            await api.close()

    run(main)
