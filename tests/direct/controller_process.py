"""The real controller (`python -m controller`) as a child process with its own state directory,
for tests that exercise it end to end over its local API and xDS sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from meshcore.identity import tokens
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import resources

READY_TIMEOUT = 20.0


class Controller:
    def __init__(self, state: str) -> None:
        self.state = state
        self.api_socket = os.path.join(state, "api.sock")
        self.xds_socket = os.path.join(state, "xds.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(state, "controller.log")

    def start(self) -> None:
        env = {
            **os.environ,
            "CONTROLLER_STATE_DIR": os.path.join(self.state, "controller"),
            "LOCAL_API_SOCKET": self.api_socket,
            "XDS_LISTEN": f"unix://{self.xds_socket}",
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller"], env=env, stdout=out, stderr=out
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def token(self, node: str) -> str:
        """A file holding a valid xDS/CA token for `node`, minted with the controller's secret."""
        path = os.path.join(self.state, f"{node}.token")
        secret = tokens.load_or_create_secret(
            os.path.join(self.state, "controller", "token-secret")
        )
        with open(path, "w") as f:
            f.write(tokens.NodeTokens(secret).mint(node))
        return path

    def _fail(self, why: str) -> None:
        with open(self.log) as f:
            pytest.fail(f"{why}:\n{f.read()}")

    async def wait_ready(self) -> kube_client.ApiClient:
        """A client once the API answers and the xDS socket exists (both appear while the
        process starts); fails with the controller's log if it exits or never gets there."""
        api = kube_client.ApiClient(f"unix://{self.api_socket}", timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                await api.close()
                self._fail("controller exited")
            try:
                await api.list(resources.NAMESPACES)
                if os.path.exists(self.xds_socket):
                    return api
            except (OSError, kube_errors.KubeError):
                pass
            if loop.time() > deadline:
                await api.close()
                self._fail("the controller never became ready")
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def temporary_controller() -> Iterator[Controller]:
    """A controller (not started) whose state directory and process go away afterwards."""
    state = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    ctl = Controller(state)
    try:
        yield ctl
    finally:
        ctl.stop()
        shutil.rmtree(state, ignore_errors=True)
