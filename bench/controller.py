"""Controller figures of the benchmark suite (issue 5): snapshot, fan-out and memory at 10k pods.

Run: `python -m bench.controller [--quick]`. It starts the real controller (`python -m
controller`, state under a fresh temp dir, removed at the end) and loads, through its local API
and with several requests in flight, 10,000 pods (on 100 nodes, with IPs, Ready, redirected to
ztunnel so they are HBONE workloads), 1,000 Services (each selecting 10 of the pods) and 500
AuthorizationPolicies (each selecting the pods of one Service). It then measures, with real
gRPC `DeltaXdsClient`s holding node tokens minted with the controller's own token secret:

- snapshot_10k_s: a NEW client, from its first DeltaDiscoveryRequest until it has received and
  ACKed every Address and Authorization resource (11,000 + 500);
- pod_change_100_clients_ms: with 100 clients connected and synced, from the store write of one
  pod change (a new pod IP, PATCHed through the API) until the 100th client has applied it;
- controller_rss_mib: VmRSS of the controller process holding that state with 100 clients.

Each figure is measured 3 times (once with --quick) on the one loaded controller; the medians
are printed and written to `bench/results/<UTC timestamp>-controller.json` (`figures`).
Targets: snapshot <= 1.0 s, pod change <= 200 ms, RSS <= 300 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from google.protobuf import any_pb2

from meshcore.identity import tokens
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import resources
from meshcore.model import ids
from meshcore.xds import client as xds_client
from meshcore.xds import types

PODS = 10_000
SERVICES = 1_000
POLICIES = 500
NODES = 100
NAMESPACES = 20
CLIENTS = 100
IN_FLIGHT = 32  # concurrent API requests while loading
API_CLIENTS = 4  # connections share the load (each ApiClient pools a few)
TIMEOUT = 300.0
PODS_PER_SERVICE = PODS // SERVICES
SERVICES_PER_NAMESPACE = SERVICES // NAMESPACES
PODS_PER_NAMESPACE = PODS // NAMESPACES

TARGETS = {"snapshot_10k_s": 1.0, "pod_change_100_clients_ms": 200.0, "controller_rss_mib": 300.0}


class BenchError(RuntimeError):
    """The controller did not start, load, or serve what the benchmark waits for."""


# --- objects ---------------------------------------------------------------------------------


def _namespace(n: int) -> str:
    return f"bench-{n:02d}"


def _pod_ip(i: int, generation: int = 0) -> str:
    # 10.(64+gen).x.y: a pod change moves the pod into another /16, never onto another pod.
    return f"10.{64 + generation}.{i // 250}.{i % 250 + 1}"


def _pod(i: int) -> dict[str, Any]:
    ns = i // PODS_PER_NAMESPACE
    app = (i % PODS_PER_NAMESPACE) // PODS_PER_SERVICE  # service index within the namespace
    ip = _pod_ip(i)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": _namespace(ns),
            "labels": {"app": f"svc-{app}"},
            "annotations": {"ambient.istio.io/redirection": "enabled"},
        },
        "spec": {
            "nodeName": f"node-{i % NODES}",
            "serviceAccountName": f"sa-{app}",
            "containers": [{"name": "app", "command": ["sleep", "infinity"]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _service(i: int) -> dict[str, Any]:
    ns, app = divmod(i, SERVICES_PER_NAMESPACE)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{app}", "namespace": _namespace(ns)},
        "spec": {
            "selector": {"app": f"svc-{app}"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def _policy(i: int) -> dict[str, Any]:
    # Every other Service's pods get an ALLOW policy naming two callers.
    ns, app = divmod(i * 2, SERVICES_PER_NAMESPACE)
    namespace = _namespace(ns)
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"allow-{app}", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": f"svc-{app}"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    f"cluster.local/ns/{namespace}/sa/sa-{(app + 1) % 50}",
                                    f"cluster.local/ns/{namespace}/sa/sa-{(app + 2) % 50}",
                                ]
                            }
                        }
                    ],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        },
    }


def _node(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": f"node-{i}"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


# --- xDS clients -----------------------------------------------------------------------------


class CountingHandler:
    """Accepts everything; tracks the names held and when a watched name last arrived."""

    def __init__(self) -> None:
        self.held: dict[str, set[str]] = {types.ADDRESS: set(), types.AUTHORIZATION: set()}
        self.watch: str | None = None
        self.seen_at: float | None = None
        self.changed = asyncio.Event()

    def apply(
        self,
        type_url: str,
        updated: Sequence[tuple[str, any_pb2.Any]],
        removed: Sequence[str],
    ) -> Sequence[str]:
        held = self.held[type_url]
        for name, _ in updated:
            held.add(name)
            if name == self.watch:
                self.seen_at = time.monotonic()
        held.difference_update(removed)
        self.changed.set()
        return ()

    def holds(self, addresses: int, policies: int) -> bool:
        return (
            len(self.held[types.ADDRESS]) >= addresses
            and len(self.held[types.AUTHORIZATION]) >= policies
        )


def _new_client(xds: str, token_file: str, handler: CountingHandler) -> xds_client.DeltaXdsClient:
    return xds_client.DeltaXdsClient(
        xds,
        node_id="ztunnel~bench",
        node_metadata={},
        token_file=token_file,
        cluster_id=ids.DEFAULT_CLUSTER_ID,
        type_urls=(types.AUTHORIZATION, types.ADDRESS),
        handler=handler,
    )


@contextlib.asynccontextmanager
async def _running(clients: Sequence[xds_client.DeltaXdsClient]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def _until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# --- the controller --------------------------------------------------------------------------


class Controller:
    """A `python -m controller` child with its own state dir; `stop()` ends only that PID."""

    def __init__(self, root: str) -> None:
        self.state_dir = os.path.join(root, "state")
        self.api = f"unix://{root}/api.sock"
        self.xds = f"unix://{root}/xds.sock"
        self.log_path = os.path.join(root, "controller.log")
        self._root = root
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        env = {
            **os.environ,
            "CONTROLLER_STATE_DIR": self.state_dir,
            "LOCAL_API_SOCKET": self.api.removeprefix("unix://"),
            "XDS_LISTEN": self.xds,
            "LOG_LEVEL": "warning",
        }
        with open(self.log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "controller"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            raise BenchError(f"controller exited with {self._proc.returncode}:\n{tail}")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS in /proc status")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=15)

    def has_files(self) -> bool:
        """The token secret and the xDS socket exist (the secret must be the controller's own:
        `token_file` would otherwise create one)."""
        secret = os.path.join(self.state_dir, "token-secret")
        return os.path.exists(secret) and os.path.exists(self.xds.removeprefix("unix://"))

    def token_file(self, node: str) -> str:
        secret = tokens.load_or_create_secret(os.path.join(self.state_dir, "token-secret"))
        path = os.path.join(self._root, f"token-{node}")
        with open(path, "w", encoding="ascii") as f:
            f.write(tokens.NodeTokens(secret).mint(node))
        return path


async def _wait_ready(controller: Controller, api: kube_client.ApiClient) -> None:
    deadline = time.monotonic() + 60
    while True:
        controller.check_alive()
        try:
            await api.list(resources.NAMESPACES)
            if controller.has_files():
                return
        except (OSError, kube_errors.KubeError):
            pass
        if time.monotonic() > deadline:
            raise BenchError("controller API did not answer within 60 s")
        await asyncio.sleep(0.05)


async def _create_all(
    apis: Sequence[kube_client.ApiClient], objs: Sequence[dict[str, Any]]
) -> None:
    queue = iter(enumerate(objs))

    async def worker() -> None:
        for i, obj in queue:
            await apis[i % len(apis)].create(obj)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def _load(apis: Sequence[kube_client.ApiClient]) -> None:
    ns_objs = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": _namespace(n), "labels": {"istio.io/dataplane-mode": "ambient"}},
        }
        for n in range(NAMESPACES)
    ]
    for objs in (
        ns_objs,
        [_node(i) for i in range(NODES)],
        [_service(i) for i in range(SERVICES)],
        [_policy(i) for i in range(POLICIES)],
        [_pod(i) for i in range(PODS)],
    ):
        started = time.monotonic()
        await _create_all(apis, objs)
        print(
            f"  created {len(objs)} {objs[0]['kind']}s in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )


# --- measurements ----------------------------------------------------------------------------


async def _measure_snapshot(controller: Controller, token_file: str) -> float:
    handler = CountingHandler()
    client = _new_client(controller.xds, token_file, handler)
    started = time.monotonic()
    async with _running([client]):
        await _until(lambda: handler.holds(PODS + SERVICES, POLICIES), "a full snapshot")
        # The ACK of the last response is written right after the handler returns.
        await _until(lambda: client.is_synced, "the snapshot to be ACKed")
    return time.monotonic() - started


async def _measure_change(
    api: kube_client.ApiClient, handlers: Sequence[CountingHandler], generation: int
) -> float:
    i = generation * 37 % PODS
    namespace = _namespace(i // PODS_PER_NAMESPACE)
    uid = ids.pod_uid(namespace, f"pod-{i}")
    for handler in handlers:
        handler.watch, handler.seen_at = uid, None
    ip = _pod_ip(i, generation)
    started = time.monotonic()
    await api.patch(
        resources.PODS,
        f"pod-{i}",
        namespace,
        {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
        subresource="status",
    )
    await _until(lambda: all(h.seen_at is not None for h in handlers), "the pod change", 30)
    return (max(h.seen_at or 0.0 for h in handlers) - started) * 1000


async def _measure(controller: Controller, repetitions: int) -> dict[str, list[float]]:
    apis = [kube_client.ApiClient(controller.api, timeout=120) for _ in range(API_CLIENTS)]
    try:
        await _wait_ready(controller, apis[0])
        print(f"Loading {PODS} pods, {SERVICES} services, {POLICIES} policies...", file=sys.stderr)
        await _load(apis)
        token = controller.token_file("node-0")
        # Everything translated: a first client sees the whole state.
        started = time.monotonic()
        warm = CountingHandler()
        async with _running([_new_client(controller.xds, token, warm)]):
            await _until(lambda: warm.holds(PODS + SERVICES, POLICIES), "the loaded state")
        print(
            f"  translated in {time.monotonic() - started:.1f} s, "
            f"RSS without clients {controller.rss_mib():.0f} MiB",
            file=sys.stderr,
        )

        snapshots = []
        for n in range(repetitions):
            controller.check_alive()
            snapshots.append(await _measure_snapshot(controller, token))
            print(f"  snapshot {n + 1}: {snapshots[-1]:.3f} s", file=sys.stderr, flush=True)

        handlers = [CountingHandler() for _ in range(CLIENTS)]
        clients = [
            _new_client(controller.xds, controller.token_file(f"node-{i % NODES}"), h)
            for i, h in enumerate(handlers)
        ]
        changes: list[float] = []
        rss: list[float] = []
        async with _running(clients):
            started = time.monotonic()
            await _until(
                lambda: (
                    all(c.is_synced for c in clients)
                    and all(h.holds(PODS + SERVICES, POLICIES) for h in handlers)
                ),
                f"{CLIENTS} clients to sync",
            )
            print(
                f"  {CLIENTS} clients synced in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
            for n in range(repetitions):
                controller.check_alive()
                changes.append(await _measure_change(apis[0], handlers, n + 1))
                rss.append(controller.rss_mib())
                print(
                    f"  pod change {n + 1}: {changes[-1]:.1f} ms, RSS {rss[-1]:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        return {
            "snapshot_10k_s": snapshots,
            "pod_change_100_clients_ms": changes,
            "controller_rss_mib": rss,
        }
    finally:
        for api in apis:
            await api.close()


def run(quick: bool) -> dict[str, float]:
    """Start a controller, load it, measure; the medians of 3 repetitions (1 if `quick`)."""
    samples = run_samples(quick)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_samples(quick: bool) -> dict[str, list[float]]:
    root = tempfile.mkdtemp(prefix="bench-controller-")
    controller = Controller(root)
    try:
        controller.start()
        return _run_async(_measure(controller, 1 if quick else 3))
    finally:
        controller.stop()
        shutil.rmtree(root, ignore_errors=True)


def _run_async(coro: Awaitable[dict[str, list[float]]]) -> dict[str, list[float]]:
    async def main() -> dict[str, list[float]]:
        return await coro

    return asyncio.run(main())


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    samples = run_samples(quick)
    figures = {name: round(statistics.median(values), 3) for name, values in samples.items()}
    print(f"controller with {PODS} pods, {SERVICES} services, {POLICIES} policies:")
    for name, value in figures.items():
        verdict = "ok" if value <= TARGETS[name] else "OVER TARGET"
        print(f"  {name:28} {value:10.3f}   (target <= {TARGETS[name]:g}: {verdict})")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stamp}-controller.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "figures": figures,
                "samples": samples,
                "targets": TARGETS,
                "load": {
                    "pods": PODS,
                    "services": SERVICES,
                    "policies": POLICIES,
                    "nodes": NODES,
                    "clients": CLIENTS,
                },
            },
            f,
            indent=2,
        )
    print(f"  written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
