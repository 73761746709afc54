"""Running the local control plane's reconcilers against a real ObjectStore in a test, and
waiting on the store without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from controller.sources.local import reconciler
from controller.sources.local import store as store_mod

R = TypeVar("R", bound=reconciler.StoreReconciler)

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def running(controller: R, timeout: float = TIMEOUT) -> AsyncIterator[R]:
    """`controller.run()` in a task, once it has synced; cancelled on the way out."""
    task = asyncio.create_task(controller.run())
    try:
        async with asyncio.timeout(timeout):
            await controller.synced.wait()
        yield controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(
    st: store_mod.ObjectStore,
    what: str,
    predicate: Callable[[], bool],
    *,
    describe: Callable[[], str] | None = None,
    timeout: float = TIMEOUT,
) -> None:
    """Wait for `predicate` to hold, re-checking after every store change, with a deadline;
    the failure says `what`, and `describe()` when given."""
    subscription = st.subscribe(None)
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await anext(subscription)
    except TimeoutError:
        detail = f"; {describe()}" if describe is not None else ""
        raise AssertionError(f"timed out waiting for {what}{detail}") from None
    finally:
        subscription.close()
