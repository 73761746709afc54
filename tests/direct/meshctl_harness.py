"""The local API server on a background loop where `meshctl` expects it, for tests that drive
`meshctl` in-process against it (meshctl runs its own loop)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from controller.sources.local import apiserver, kinds, store
from meshctl import cli
from meshctl.playground import paths

DEADLINE = 10.0


class Playground:
    """The API server on a background loop where meshctl expects it (meshctl runs its own)."""

    def __init__(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="pol-ctl-")
        where = paths.Paths(self.state_dir)
        os.makedirs(where.controller_dir)
        # As the controller builds it: the root namespace exists, as an Istio install makes it.
        self.store = store.ObjectStore(
            kinds.build_registry(), system_namespaces=(kinds.DEFAULT_ROOT_NAMESPACE,)
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = apiserver.LocalApiServer(self.store)
        start = self.server.start(where.api_socket)
        asyncio.run_coroutine_threadsafe(start, self._loop).result(DEADLINE)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(DEADLINE)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE)
        self._loop.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def meshctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["--state-dir", self.state_dir, *argv], {}, out, err, io.StringIO(stdin))
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def playground() -> Iterator[Playground]:
    p = Playground()
    try:
        yield p
    finally:
        p.close()
