"""The loop every local-mode controller runs: watch the store, reconcile what an event concerns,
reconcile everything on start and after a watch overflow, and retry a failed reconcile of one
object with exponential backoff without holding up the others.

Reconciles are synchronous store calls on the event loop, so each sees the store's current
state, including its own earlier writes. The keys of a run of events are collected and each is
reconciled once when the run ends (a Deployment creating 500 pods hears 500 pod events: one
reconcile, not 500), and a reconcile with more to do than one pass should take calls `requeue`,
so that the API keeps answering in between.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Iterable

from controller.sources.local import store as store_mod
from meshcore import log
from meshcore.kube import errors, objects, resources

Key = tuple[str, str]  # (namespace, name)

_LOG = logging.getLogger("controller.reconciler")


class StoreReconciler(abc.ABC):
    """Subclasses say what they watch, which keys an event concerns, and how to reconcile one."""

    # What the log calls the reconciled objects, e.g. "deployment".
    noun = "object"

    def __init__(
        self,
        object_store: store_mod.ObjectStore,
        *,
        watched: resources.ResourceType | None,
        initial_retry: float = 0.5,
        max_retry: float = 30.0,
    ) -> None:
        self._store = object_store
        self._watched = watched  # None: every kind
        self._initial_retry = initial_retry
        self._max_retry = max_retry
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}
        self._dirty: dict[Key, None] = {}  # keys waiting for the next flush, in order
        self._flush: asyncio.Handle | None = None
        self.synced = asyncio.Event()

    @abc.abstractmethod
    def find_all_keys(self) -> Iterable[Key]:
        """Everything to reconcile on start (and after a missed event)."""

    @abc.abstractmethod
    def find_event_keys(self, event: objects.WatchEvent) -> Iterable[Key]:
        """What one store event concerns."""

    @abc.abstractmethod
    def reconcile_one(self, namespace: str, name: str) -> None:
        """Bring one object in line; raises `ApiError` to be retried later."""

    async def run(self) -> None:
        try:
            while True:
                # Subscribe before the resync, so no change falls between the two.
                subscription = self._store.subscribe(
                    self._watched, since=self._store.resource_version
                )
                try:
                    self.resync()
                    self.synced.set()
                    async for event in subscription:
                        if event.type == objects.ERROR:
                            _LOG.warning("store subscription overflowed; resyncing")
                            break
                        for key in self.find_event_keys(event):
                            self.requeue(*key)
                finally:
                    subscription.close()
        finally:
            for handle in self._retries.values():
                handle.cancel()
            self._retries.clear()
            if self._flush is not None:
                self._flush.cancel()
                self._flush = None
            self._dirty.clear()

    def requeue(self, namespace: str, name: str) -> None:
        """Reconcile this key once the events queued now have been read (coalesced)."""
        key = (namespace, name)
        self._dirty.pop(key, None)  # reconciled where it was last mentioned, after the others
        self._dirty[key] = None
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._run_dirty)

    def _run_dirty(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, {}
        for key in dirty:
            self.reconcile(*key)

    def resync(self) -> None:
        for key in sorted(set(self.find_all_keys())):
            self.reconcile(*key)

    def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        pending = self._retries.pop(key, None)
        if pending is not None:
            pending.cancel()
        try:
            self.reconcile_one(namespace, name)
        except errors.ApiError as exc:
            self._schedule_retry(key, exc)
            return
        self._failures.pop(key, None)

    def _schedule_retry(self, key: Key, exc: errors.ApiError) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self._initial_retry * 2 ** min(failures - 1, 16), self._max_retry)
        _LOG.warning(
            f"{self.noun} reconcile failed; retrying",
            extra=log.fields(
                namespace=key[0], name=key[1], kind=self.noun, error=str(exc), retry_in=delay
            ),
        )
        self._retries[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._retries.pop(key, None)
        self.reconcile(*key)
