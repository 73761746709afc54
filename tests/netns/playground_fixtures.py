"""A whole playground for end-to-end tests, started through the same code as ``meshctl up``.

    def test_shop(playground_factory):
        cluster = playground_factory().nodes(2).start()
        cluster.apply(manifests.build_demo_manifest())
        cluster.wait_pod_ready("shop", "client")
        done = cluster.exec("shop", "client", ["curl", "-s", "http://product-catalog.shop/products"])
        assert done.returncode == 0

Each `Playground` gets its own prefix (``mt`` + 6 hex) and a short state directory
(``/tmp/mt-<hex>``: Unix socket paths must stay under 108 bytes). The supervisor is launched
detached, like ``meshctl up``, and followed through ``playground.json``; `stop()` is the same
teardown as ``meshctl down`` and runs from the fixture's finalizer even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from meshcore.kube import client as kube_client
from meshcore.kube import resources
from meshctl import commands, podfields
from meshctl.playground import control, paths, podstatus
from meshctl.playground import record as pg_record

T = TypeVar("T")


class PlaygroundError(AssertionError):
    """A playground operation failed; the message carries the relevant log tail."""


class Playground:
    def __init__(
        self, prefix: str | None = None, *, host_access: bool = False, log_level: str = "debug"
    ) -> None:
        token = secrets.token_hex(3)
        self.prefix = prefix or f"mt{token}"
        self.state_dir = f"/tmp/mt-{token}"
        self.host_access = host_access
        self.log_level = log_level
        self._nodes = 1
        self._max_pods = podstatus.DEFAULT_MAX_PODS
        self._otlp_endpoint = ""
        self._redirect_mode = "iptables"
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: pg_record.PlaygroundRecord | None = None
        self.paths = paths.Paths(self.state_dir)

    # -- building -----------------------------------------------------------------------------

    def nodes(self, count: int) -> Playground:
        self._nodes = count
        return self

    def otlp_endpoint(self, url: str) -> Playground:
        """Waypoints export spans to `url` (``meshctl up --otlp-endpoint``)."""
        self._otlp_endpoint = url
        return self

    def redirect_mode(self, mode: str) -> Playground:
        """How the node agents capture pods (``meshctl up --redirect-mode``)."""
        self._redirect_mode = mode
        return self

    def max_pods(self, count: int) -> Playground:
        """Each node admits at most `count` pods (``meshctl up --max-pods``)."""
        self._max_pods = count
        return self

    def with_host_access(self, enabled: bool = True) -> Playground:
        self.host_access = enabled
        return self

    def start(self, timeout: float = 180.0) -> Playground:
        opts = control.UpOptions(
            state_dir=self.state_dir,
            nodes=self._nodes,
            prefix=self.prefix,
            host_access=self.host_access,
            timeout=timeout,
            log_level=self.log_level,
            owner_pid=os.getpid(),
            max_pods=self._max_pods,
            otlp_endpoint=self._otlp_endpoint,
            redirect_mode=self._redirect_mode,
        )
        self._proc = control.launch_supervisor(opts, dict(os.environ))
        try:
            self._record = control.wait_until_ready(self.state_dir, self._proc, timeout)
        except control.StartFailedError as exc:
            tail = exc.log_tail or control.read_log_tail(self.paths.supervisor_log)
            self.stop()
            raise PlaygroundError(
                f"playground failed to start: {exc}\n{exc.log_path}:\n{tail}"
            ) from exc
        return self

    def stop(self) -> control.DownReport:
        """Stop everything (idempotent) and remove the state directory."""
        proc, self._proc = self._proc, None
        return control.shut_down_launched(proc, self.state_dir, self.prefix)

    def __enter__(self) -> Playground:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def meshctl(
        self, *args: str, stdin: str | None = None, timeout: float = 150.0
    ) -> subprocess.CompletedProcess[str]:
        """The real ``meshctl`` against this playground, in a subprocess; output captured."""
        return subprocess.run(
            [sys.executable, "-m", "meshctl", "--state-dir", self.state_dir, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- facts --------------------------------------------------------------------------------

    @property
    def record(self) -> pg_record.PlaygroundRecord:
        rec = pg_record.RecordFile(self.state_dir).load()
        if rec is None:
            raise PlaygroundError(f"no playground record in {self.state_dir}")
        return rec

    def _node(self, node: str) -> pg_record.NodeRecord:
        topo = self.record.topology
        found = topo.find_node(node) if topo else None
        if found is None:
            raise PlaygroundError(f"no node {node!r} in playground {self.prefix}")
        return found

    def node_address(self, node: str = "node1") -> str:
        return self._node(node).address

    def node_netns(self, node: str = "node1") -> str:
        return self._node(node).netns

    def logs(self, component: str, node: str | None = None) -> str:
        """A component's log: controller, supervisor, or agent/ztunnel/kubelet of `node`."""
        if component == "supervisor":
            path = self.paths.supervisor_log
        else:
            path = self.paths.log(component, None if component == "controller" else node or "node1")
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    # -- API ----------------------------------------------------------------------------------

    def call(self, fn: Callable[[kube_client.ApiClient], Awaitable[T]]) -> T:
        """Run `fn(api)` on a fresh client and event loop (nothing is left running)."""

        async def go() -> T:
            api = kube_client.ApiClient(self.paths.kube_api)
            try:
                return await fn(api)
            finally:
                await api.close()

        return asyncio.run(go())

    def apply(self, yaml_text: str, namespace: str | None = None) -> list[str]:
        """Apply a multi-document manifest; the ``kind/name created`` lines."""
        out, err = io.StringIO(), io.StringIO()

        async def go(api: kube_client.ApiClient) -> int:
            items = await commands.load_manifests(api, [(yaml_text, "test")], namespace)
            return await commands.apply(api, items, commands.Streams(out, err))

        if self.call(go) != 0:
            raise PlaygroundError(f"apply failed: {err.getvalue()}")
        return out.getvalue().splitlines()

    def get(self, rtype: resources.ResourceType, name: str, namespace: str | None = None) -> Any:
        return self.call(lambda api: api.get(rtype, name, namespace))

    def wait_pod_ready(self, namespace: str, name: str, timeout: float = 90.0) -> dict[str, Any]:
        try:
            self.call(lambda api: commands.wait_pods_ready(api, namespace, [name], timeout))
        except Exception as exc:
            raise PlaygroundError(f"{exc}\nkubelet log tail:\n{self._tail('kubelet')}") from exc
        pod: dict[str, Any] = self.get(resources.PODS, name, namespace)
        return pod

    def pod_ip(self, namespace: str, name: str) -> str:
        return podfields.pod_ip(self.get(resources.PODS, name, namespace))

    def label_namespace(self, namespace: str, labels: Mapping[str, str | None]) -> None:
        patch = {"metadata": {"labels": dict(labels)}}
        self.call(lambda api: api.patch(resources.NAMESPACES, namespace, None, patch))

    def exec(
        self,
        namespace: str,
        pod: str,
        argv: list[str],
        *,
        container: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``meshctl exec`` (the real command, in a subprocess); output captured."""
        cmd = [sys.executable, "-m", "meshctl", "--state-dir", self.state_dir, "exec"]
        cmd += ["-n", namespace, pod, *(["-c", container] if container else []), "--", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def in_node(
        self, node: str, argv: list[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a node's network namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.node_netns(node), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _tail(self, component: str, node: str = "node1") -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logs(component, node).splitlines()[-30:])
        return ""

    def log_tails(self, node: str, *components: str) -> str:
        """The last lines of each of `node`'s `components`' logs, for a failure message."""
        return "".join(f"\n{c} log tail ({node}):\n{self._tail(c, node)}" for c in components)


@contextlib.contextmanager
def started(pg: Playground) -> Iterator[Playground]:
    """`pg` started, and stopped on the way out (also when the test failed), having left no
    namespace, link or process behind."""
    try:
        pg.start()
        yield pg
    finally:
        report = pg.stop()
        assert report.is_clean, f"playground teardown left things behind: {report.leftovers}"


@pytest.fixture
def playground_factory() -> Iterator[Callable[..., Playground]]:
    """Make playgrounds (``playground_factory(host_access=True).nodes(2).start()``); every one
    is stopped and checked for leftovers at the end of the test, even when it fails."""
    made: list[Playground] = []

    def make(prefix: str | None = None, **kwargs: Any) -> Playground:
        pg = Playground(prefix, **kwargs)
        made.append(pg)
        return pg

    yield make
    leftovers = []
    for pg in made:
        report = pg.stop()
        if not report.is_clean:
            leftovers.append(f"{pg.prefix}: {report.leftovers}")
    assert not leftovers, "playground teardown left things behind: " + "; ".join(leftovers)
