"""Watching the store: committed changes, what a filtered watcher sees of them, and the
per-watcher queue that hands them out.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from meshcore.kube import errors, objects, resources, selectors
from meshcore.kube.objects import WatchEvent


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One committed change. `old` is the previous state (None for ADDED)."""

    type: str  # ADDED | MODIFIED | DELETED
    rtype: resources.ResourceType
    object: dict[str, Any]
    old: dict[str, Any] | None
    resource_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class WatchFilter:
    rtype: resources.ResourceType | None = None  # None: every kind (in-process consumers)
    namespace: str | None = None
    label_selector: selectors.LabelSelector = dataclasses.field(
        default_factory=selectors.LabelSelector
    )
    field_selector: selectors.FieldSelector = dataclasses.field(
        default_factory=selectors.FieldSelector
    )

    def matches(self, obj: dict[str, Any]) -> bool:
        if self.namespace and objects.namespace(obj) != self.namespace:
            return False
        return self.label_selector.matches(objects.labels(obj)) and self.field_selector.matches(obj)

    def build_event(self, change: Change) -> WatchEvent | None:
        """What a watcher with this filter sees of `change`.

        An object that starts matching (a pod bound to the watched node) is ADDED; one that
        stops matching is DELETED, as the Kubernetes watch cache does.
        """
        if self.rtype is not None and change.rtype != self.rtype:
            return None
        now = self.matches(change.object)
        if change.type == objects.MODIFIED and change.old is not None:
            before = self.matches(change.old)
            if before and not now:
                return WatchEvent(objects.DELETED, change.object)
            if now and not before:
                return WatchEvent(objects.ADDED, change.object)
        return WatchEvent(change.type, change.object) if now else None


class Subscription:
    """A watch on the store: an async iterator of `WatchEvent`s (deep copies).

    Up to `max_pending` changes wait for the subscriber; one that falls further behind gets a
    single ERROR event with a 410 Status (it must relist) and the iteration ends. `close()` (or
    the store closing) ends it once the changes already queued are delivered.
    """

    def __init__(
        self,
        watch_filter: WatchFilter,
        max_pending: int,
        on_close: Callable[[Subscription], None],
    ) -> None:
        self._on_close = on_close
        self._filter = watch_filter
        self._max_pending = max_pending
        self._pending: collections.deque[Change] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._overflowed = False
        self._finished = False

    def offer(self, change: Change) -> None:
        if self._closed or self._overflowed:
            return
        if len(self._pending) >= self._max_pending:
            self._overflowed = True
            self._pending.clear()
        else:
            self._pending.append(change)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._on_close(self)
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._overflowed:
                self._finished = True
                self.close()
                status = errors.GoneError("the watcher fell too far behind; relist").status
                return WatchEvent(objects.ERROR, status)
            while self._pending:
                event = self._filter.build_event(self._pending.popleft())
                if event is not None:
                    return WatchEvent(event.type, copy.deepcopy(event.object))
            if self._closed:
                self._finished = True
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
