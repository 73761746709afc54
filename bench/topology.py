"""The benchmark's world: a 2-node playground with client and server pods, and the processes the
benchmark itself starts inside their network namespaces.

Two Kubernetes namespaces with the same pods: ``bench-plain`` (not in the mesh: direct traffic,
the nginx pair and HAProxy) and ``bench-mesh`` (labelled ``istio.io/dataplane-mode=ambient``).
Each has ``client`` and ``local`` on node1 and ``server`` on node2. Pods only run a sleeper; the
servers, proxies and clients are started by `Bench.spawn` with ``ip netns exec`` into the pod's
namespace, so the in-pod redirection applies to them exactly as to the pod's own processes, and
the benchmark knows (and alone stops) every PID it started.

Everything lives under ``/tmp/bd-<hex>`` and prefix ``bd<hex>``; `Bench.close` stops what was
spawned (by PID), then runs the playground's own teardown, and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from meshcore.kube import client as kube_client
from meshcore.kube import resources
from meshctl import commands, podfields
from meshctl.playground import control, paths, record, sandbox

T = TypeVar("T")

PLAIN = "bench-plain"
MESH = "bench-mesh"
PODS = (("client", 0), ("local", 0), ("server", 1))  # (name, node index)
# 10,000 held connections make 10,000+ sockets in each ztunnel (and in the C holder and echo
# server); the playground's processes inherit our limit, so take the hard limit.
NOFILE = 131072
CAPTURE_TIMEOUT = 60.0


class BenchError(Exception):
    """The benchmark topology could not be built or a measuring process failed."""


def raise_nofile_limit(limit: int = NOFILE) -> None:
    """Soft limit up to `limit`: above the hard limit only with CAP_SYS_RESOURCE."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pod(name: str, namespace: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "idle", "command": ["sleep", "infinity"]}],
        },
    }


def _namespace(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


class Bench:
    """A running benchmark topology; use as a context manager so that `close` always runs."""

    def __init__(self, log: Callable[[str], None], *, redirect_mode: str = "iptables") -> None:
        token = secrets.token_hex(3)
        self.prefix = f"bd{token}"
        self.state_dir = f"/tmp/bd-{token}"
        self.work_dir = os.path.join(self.state_dir, "bench")
        self.paths = paths.Paths(self.state_dir)
        self.log = log
        self.redirect_mode = redirect_mode
        self.ips: dict[tuple[str, str], str] = {}
        self.netns: dict[tuple[str, str], str] = {}
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        raise_nofile_limit()
        opts = control.UpOptions(
            state_dir=self.state_dir,
            nodes=2,
            prefix=self.prefix,
            host_access=False,
            timeout=timeout,
            log_level="warning",
            owner_pid=os.getpid(),
            redirect_mode=self.redirect_mode,
        )
        self.log(
            f"starting a 2-node playground ({self.prefix}, {self.state_dir}), "
            f"{self.redirect_mode} redirection"
        )
        self._supervisor = control.launch_supervisor(opts, dict(os.environ))
        rec = control.wait_until_ready(self.state_dir, self._supervisor, timeout)
        os.makedirs(self.work_dir, exist_ok=True)
        if rec.topology is None or len(rec.topology.nodes) < 2:
            raise BenchError("the playground came up without two nodes")
        nodes = [n.name for n in rec.topology.nodes]
        docs = [_namespace(PLAIN, False), _namespace(MESH, True)]
        docs += [_pod(name, ns, nodes[i]) for ns in (PLAIN, MESH) for name, i in PODS]
        self._apply(docs)
        for ns in (PLAIN, MESH):
            names = [name for name, _ in PODS]
            self._wait_ready(ns, names)
            for name in names:
                pod = self._get_pod(ns, name)
                self.ips[ns, name] = podfields.pod_ip(pod)
                self.netns[ns, name] = sandbox.netns_name(self.prefix, pod["metadata"]["uid"])
        self._wait_captured()

    def close(self) -> None:
        for proc in reversed(self._spawned):
            stop_process(proc)
        self._spawned.clear()
        supervisor, self._supervisor = self._supervisor, None
        report = control.shut_down_launched(supervisor, self.state_dir, self.prefix)
        if not report.is_clean:
            self.log(f"teardown left: {report.leftovers}")

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts --------------------------------------------------------------------------------

    def ztunnel_pids(self) -> list[int]:
        """The ztunnel process of each node, node1 first (from the playground record)."""
        rec = record.RecordFile(self.state_dir).load()
        if rec is None or rec.topology is None:
            raise BenchError(f"no playground record in {self.state_dir}")
        pids = []
        for node in rec.topology.nodes:
            proc = rec.find_process("ztunnel", node.name)
            if proc is None:
                raise BenchError(f"no ztunnel recorded for {node.name}")
            pids.append(proc.pid)
        return pids

    # -- processes ----------------------------------------------------------------------------

    def spawn(
        self, where: tuple[str, str], argv: Sequence[str], name: str, *, stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in a pod's network namespace; output goes to ``<work>/<name>.log``."""
        log_path = os.path.join(self.work_dir, f"{name}.log")
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns[where], *argv],
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdin is not None else out,
                stderr=out,
                start_new_session=True,
            )
        self._spawned.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop_process(proc)
        with contextlib.suppress(ValueError):
            self._spawned.remove(proc)

    def run(self, where: tuple[str, str], argv: Sequence[str], timeout: float) -> str:
        """Run a client to completion in a pod's namespace; its stdout (error on failure)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns[where], *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} in {where[0]}/{where[1]} exited {done.returncode}:"
                f" {done.stderr.strip()[-500:]}"
            )
        return done.stdout

    def wait_listening(self, where: tuple[str, str], port: int, timeout: float = 15.0) -> None:
        """Until something listens on TCP `port` (IPv4 or IPv6) in the pod's namespace."""
        deadline = time.monotonic() + timeout
        needle = f":{port:04X} "
        while time.monotonic() < deadline:
            out = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns[where],
                    "cat",
                    "/proc/net/tcp",
                    "/proc/net/tcp6",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            for line in out.splitlines():
                fields = line.split()
                if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                    return
            time.sleep(0.05)
        raise BenchError(f"nothing listens on port {port} in {where[0]}/{where[1]}")

    # -- API ----------------------------------------------------------------------------------

    def _call(self, fn: Callable[[kube_client.ApiClient], Awaitable[T]]) -> T:
        async def go() -> T:
            api = kube_client.ApiClient(self.paths.kube_api)
            try:
                return await fn(api)
            finally:
                await api.close()

        return asyncio.run(go())

    def _get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        async def go(api: kube_client.ApiClient) -> dict[str, Any]:
            pod: dict[str, Any] = await api.get(resources.PODS, name, namespace)
            return pod

        return self._call(go)

    def _wait_ready(self, namespace: str, names: Sequence[str]) -> None:
        async def go(api: kube_client.ApiClient) -> None:
            await commands.wait_pods_ready(api, namespace, names, 120)

        self._call(go)

    def _apply(self, docs: Sequence[dict[str, Any]]) -> None:
        out, err = io.StringIO(), io.StringIO()
        # JSON is YAML: one document per source keeps the manifest code path of `meshctl apply`.
        sources = [(json.dumps(d), f"bench-{i}") for i, d in enumerate(docs)]

        async def go(api: kube_client.ApiClient) -> int:
            items = await commands.load_manifests(api, sources, None)
            return await commands.apply(api, items, commands.Streams(out, err))

        if self._call(go) != 0:
            raise BenchError(f"apply failed: {err.getvalue()}")

    def _wait_captured(self) -> None:
        """Until the node agent has set up redirection in every enrolled pod."""
        deadline = time.monotonic() + CAPTURE_TIMEOUT
        for name, _ in PODS:
            while True:
                pod = self._get_pod(MESH, name)
                notes = pod["metadata"].get("annotations") or {}
                if notes.get("ambient.istio.io/redirection") == "enabled":
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"pod {MESH}/{name} was not captured in time")
                time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM then SIGKILL one process we started (by its PID; its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def log_to_stderr(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
