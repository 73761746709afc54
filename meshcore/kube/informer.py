"""An informer: a local cache of one resource type kept current by list + watch.

`run()` lists, hands the handler one event per change against its cache, then watches from the
list's resourceVersion. When the watch ends cleanly (server timeout) it watches again from the
last version it saw; on a 410, any other ERROR event, a server error or a dropped connection it
relists after a backoff (0.1 s doubling to 5 s, reset once a watch delivers an event). A relist
diffs against the cache, so objects that changed or vanished while nobody was watching still
reach the handler (ADDED for new or changed ones, DELETED for vanished ones).

Invariant: the cache is updated before the handler sees the event, so the handler may call
`find()` and gets the state the event describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from meshcore import log
from meshcore.kube import client as kube_client
from meshcore.kube import errors, objects, resources

_LOG = logging.getLogger("kube.informer")

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
# Ask the server to end each watch after 5-10 minutes (client-go does the same), so a half-dead
# connection is noticed and the server's per-watch state is recycled.
_WATCH_TIMEOUT_RANGE = (300, 600)
_MIN_WATCH_SECONDS = 1.0

Key = tuple[str, str]


def build_relist_events(
    cache: Mapping[Key, dict[str, Any]], items: list[dict[str, Any]]
) -> list[objects.WatchEvent]:
    """What a relist means relative to `cache`: ADDED for new or changed objects, DELETED for
    objects no longer listed (carrying their last known state). Unchanged objects give nothing."""
    events = []
    listed: set[Key] = set()
    for item in items:
        key = objects.key(item)
        listed.add(key)
        old = cache.get(key)
        if old is None or objects.resource_version(old) != objects.resource_version(item):
            events.append(objects.WatchEvent(objects.ADDED, item))
    for key, old in cache.items():
        if key not in listed:
            events.append(objects.WatchEvent(objects.DELETED, old))
    return events


class _RelistError(Exception):
    """The watch ended in a way that needs a fresh list."""


class Informer:
    def __init__(
        self,
        client: kube_client.ApiClient,
        rtype: resources.ResourceType,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        handler: Callable[[objects.WatchEvent], Awaitable[None]],
    ) -> None:
        self._client = client
        self._rtype = rtype
        self._namespace = namespace
        self._label_selector = label_selector
        self._field_selector = field_selector
        self._handler = handler
        self._cache: dict[Key, dict[str, Any]] = {}
        self._synced = asyncio.Event()
        self._backoff = INITIAL_BACKOFF

    @property
    def is_synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Return once the first list has been delivered to the handler."""
        await self._synced.wait()

    def find(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self._cache.get((namespace or "", name))

    def items(self) -> list[dict[str, Any]]:
        return list(self._cache.values())

    async def run(self) -> None:
        """Forever; returns only by cancellation."""
        scope = {"resource": self._rtype.plural, "namespace": self._namespace or ""}
        while True:
            try:
                version = await self._relist()
                while True:
                    started = asyncio.get_running_loop().time()
                    version = await self._watch(version)
                    if asyncio.get_running_loop().time() - started < _MIN_WATCH_SECONDS:
                        # A server that ends every watch at once must not make us spin.
                        await asyncio.sleep(self._backoff)
                        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            except (errors.KubeError, _RelistError) as exc:
                _LOG.warning(
                    "watch interrupted; relisting",
                    extra=log.fields(**scope, error=str(exc), backoff=self._backoff),
                )
            except Exception:
                # A bug in a handler must not stop the cache from following the server.
                _LOG.exception("informer failure; relisting", extra=log.fields(**scope))
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _relist(self) -> str:
        listed = await self._client.list(
            self._rtype,
            self._namespace,
            label_selector=self._label_selector,
            field_selector=self._field_selector,
        )
        for event in build_relist_events(self._cache, listed.items):
            await self._deliver(event)
        self._synced.set()
        return listed.resource_version

    async def _watch(self, version: str) -> str:
        timeout = random.randint(*_WATCH_TIMEOUT_RANGE)
        stream = self._client.watch(
            self._rtype,
            self._namespace,
            resource_version=version,
            label_selector=self._label_selector,
            field_selector=self._field_selector,
            timeout_seconds=timeout,
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event.type == objects.ERROR:
                    status = errors.ApiError.from_status(event.object)
                    raise _RelistError(f"watch error {status.code} {status.reason}: {status}")
                new_version = objects.resource_version(event.object)
                if new_version:
                    version = new_version
                if event.type == objects.BOOKMARK:
                    continue
                self._backoff = INITIAL_BACKOFF
                await self._deliver(event)
        return version

    async def _deliver(self, event: objects.WatchEvent) -> None:
        key = objects.key(event.object)
        if event.type == objects.DELETED:
            self._cache.pop(key, None)
        else:
            self._cache[key] = event.object
        try:
            await self._handler(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The cache already holds the new state; the handler's failure is its own.
            _LOG.exception(
                "informer handler failed",
                extra=log.fields(
                    resource=self._rtype.plural, event=event.type, object=objects.name(event.object)
                ),
            )
