"""For tests that run a real gRPC server (xDS, CA) in-process on a Unix socket."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
from collections.abc import Coroutine, Iterator

import pytest

DEADLINE = 10.0


def run(main: Coroutine[None, None, None], deadline: float = DEADLINE) -> None:
    """asyncio.run, then check that no task is left running: grpc finishes its own server-side
    tasks just after Server.stop() returns, so they get a deadline to end on their own."""

    async def checked() -> None:
        await main
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        if leftover:
            _, pending = await asyncio.wait(leftover, timeout=deadline)
            assert not pending, f"tasks left running: {pending}"

    asyncio.run(checked())


@pytest.fixture
def state_dir() -> Iterator[pathlib.Path]:
    # Short path: Unix socket paths must stay under 108 bytes.
    path = pathlib.Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
