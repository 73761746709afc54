"""HbonePool: which pooled connection a new stream goes on, with fake connections."""

from __future__ import annotations

import asyncio
import typing

from meshcore.aio import hbone
from meshcore.identity import spiffe
from ztunnel.proxy import pool

CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
KEY = pool.PoolKey(CLIENT, (SERVER,), ("10.244.1.5", 15008), "10.244.1.2")


class FakeConnection:
    def __init__(self) -> None:
        self.is_lost = False
        self.is_usable = True
        self.streams: dict[int, object] = {}
        self.on_idle: object = None
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _pool(opened: list[FakeConnection], max_streams: int = 2) -> pool.HbonePool:
    async def connect(key: pool.PoolKey) -> hbone.HboneClientProtocol:
        conn = FakeConnection()
        opened.append(conn)
        return typing.cast(hbone.HboneClientProtocol, conn)

    return pool.HbonePool(connect, max_streams=max_streams, idle_timeout=60)


def test_find_ready_takes_a_pooled_connection_with_room_only() -> None:
    async def main() -> None:
        opened: list[FakeConnection] = []
        hbone_pool = _pool(opened)
        assert hbone_pool.find_ready(KEY) is None  # nothing pooled: fetch opens one
        first = await hbone_pool.fetch(KEY)
        assert hbone_pool.find_ready(KEY) is first
        opened[0].streams = {1: None, 3: None}  # full
        assert hbone_pool.find_ready(KEY) is None
        second = await hbone_pool.fetch(KEY)
        assert second is not first
        assert hbone_pool.find_ready(KEY) is second
        opened[1].is_lost = True
        assert hbone_pool.find_ready(KEY) is None
        opened[0].streams = {}
        assert hbone_pool.find_ready(KEY) is first
        opened[0].is_usable = False  # e.g. GOAWAY received
        assert hbone_pool.find_ready(KEY) is None
        other = pool.PoolKey(CLIENT, (SERVER,), ("10.244.1.6", 15008), "10.244.1.2")
        assert hbone_pool.find_ready(other) is None
        assert len(opened) == 2
        hbone_pool.close()

    asyncio.run(main())
