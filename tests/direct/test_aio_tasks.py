"""meshcore.aio.tasks.wait_any: the first of a few futures, under a deadline."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.aio import tasks


def test_returns_when_any_future_is_done_and_leaves_them_alone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a: asyncio.Future[int] = loop.create_future()
        b: asyncio.Future[int] = loop.create_future()
        waiting = asyncio.ensure_future(tasks.wait_any(a, b, deadline=loop.time() + 5))
        await asyncio.sleep(0)
        assert not waiting.done()
        b.set_result(2)
        await waiting
        assert not a.done()
        assert b.result() == 2

    asyncio.run(main())


def test_a_future_already_done_returns_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a: asyncio.Future[int] = loop.create_future()
        b: asyncio.Future[int] = loop.create_future()
        a.set_exception(ConnectionResetError("gone"))
        await tasks.wait_any(a, b, deadline=loop.time() + 5)
        assert isinstance(a.exception(), ConnectionResetError)

    asyncio.run(main())


def test_deadline_raises_timeout_error() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a: asyncio.Future[int] = loop.create_future()
        with pytest.raises(TimeoutError):
            await tasks.wait_any(a, deadline=loop.time())
        assert not a.done()

    asyncio.run(main())


def test_cancelling_the_waiter_leaves_the_futures_pending() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a: asyncio.Future[int] = loop.create_future()
        waiting = asyncio.ensure_future(tasks.wait_any(a, deadline=loop.time() + 5))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not a.done()

    asyncio.run(main())
