"""Pooled HBONE connections (ztunnel src/proxy/pool.rs).

Invariants:
- A connection is keyed by (source identity, expected destination identities, destination
  address, source IP); streams of different keys never share a connection.
- A new connection is opened only when every pooled one for the key is unusable or already
  carries `max_streams` streams; the check happens when a connection is taken from the pool.
- A taker that finds room on a pooled connection takes it at once (`find_ready`, no await, so
  its stream is opened before anyone else looks). Takers that need a new connection are
  serialised by a per-key lock (`fetch`), so a burst of new streams waits for the first
  connection instead of each opening its own (no connection storm).
- A connection with no streams for longer than `idle_timeout` is closed and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from meshcore import log
from meshcore.aio import hbone
from meshcore.identity import spiffe

logger = logging.getLogger("ztunnel.pool")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolKey:
    source_identity: spiffe.SpiffeId
    destination_identities: tuple[spiffe.SpiffeId, ...]
    destination: tuple[str, int]
    source_ip: str


Connector = Callable[[PoolKey], Awaitable[hbone.HboneClientProtocol]]


class HbonePool:
    def __init__(self, connect: Connector, *, max_streams: int, idle_timeout: float) -> None:
        self._connect = connect
        self._max_streams = max_streams
        self._idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[hbone.HboneClientProtocol]] = collections.defaultdict(list)
        self._locks: dict[PoolKey, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._reaper: asyncio.TimerHandle | None = None
        self.connections_opened = 0

    def find_ready(self, key: PoolKey) -> hbone.HboneClientProtocol | None:
        """A pooled connection with room for one more stream right now, or None (then `fetch`)."""
        for conn in self._conns.get(key, ()):
            if not conn.is_lost and conn.is_usable and len(conn.streams) < self._max_streams:
                return conn
        return None

    async def fetch(self, key: PoolKey) -> hbone.HboneClientProtocol:
        """A connection on which the caller may open one stream right away (without awaiting)."""
        async with self._locks[key]:
            conns = self._conns[key]
            conns[:] = [c for c in conns if not c.is_lost]
            for conn in conns:
                if conn.is_usable and len(conn.streams) < self._max_streams:
                    return conn
            conn = await self._connect(key)
            self.connections_opened += 1
            conn.on_idle = self._on_idle
            conns.append(conn)
            logger.debug(
                "hbone connection opened",
                extra=log.fields(
                    dst=f"{key.destination[0]}:{key.destination[1]}", pooled=len(conns)
                ),
            )
            return conn

    def _on_idle(self, conn: hbone.HboneClientProtocol) -> None:
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self._idle_timeout, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = asyncio.get_running_loop().time()
        waiting = False
        for key, conns in list(self._conns.items()):
            keep = []
            for conn in conns:
                if conn.is_lost:
                    continue
                if not conn.streams and now - conn.idle_since >= self._idle_timeout:
                    conn.close()
                    continue
                if not conn.streams:
                    waiting = True
                keep.append(conn)
            if keep:
                self._conns[key] = keep
            else:
                del self._conns[key]
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]
        if waiting:
            self._reaper = asyncio.get_running_loop().call_later(self._idle_timeout, self._reap)

    def count(self) -> int:
        return sum(len(c) for c in self._conns.values())

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conns in self._conns.values():
            for conn in conns:
                conn.close()
        self._conns.clear()
        self._locks.clear()
