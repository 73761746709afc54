"""`meshctl apply/get/scale/delete` on Deployments and `meshctl get nodes`, through `cli.run`
against the real local API server with the deployment controller running (in-process, on a
background event loop), as the controller process runs them."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import yaml

from controller.sources.local import apiserver, deployments, kinds, store
from meshcore.kube import client as kube_client
from meshcore.kube import objects, resources
from meshctl import cli, commands, errors
from meshctl.demo import manifests
from meshctl.playground import paths, procs, record

T = TypeVar("T")
TIMEOUT = 10.0

WEB = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
        - name: app
          command: ["mesh-demo-app", "serve"]
"""


class Cluster:
    def __init__(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="md-", dir="/tmp")
        self.paths = paths.Paths(self.state_dir)
        os.makedirs(self.paths.controller_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store = store.ObjectStore(kinds.build_registry())
        self.server = apiserver.LocalApiServer(self.store)
        self.controller = deployments.DeploymentController(self.store)
        self._task = self.call(self._start())

    async def _start(self) -> asyncio.Task[None]:
        await self.server.start(self.paths.api_socket)
        task = asyncio.create_task(self.controller.run())
        await self.controller.synced.wait()
        return task

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop (the store is only touched from there)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(TIMEOUT + 5)

    def until(self, what: str, predicate: Callable[[store.ObjectStore], bool]) -> None:
        async def wait() -> None:
            subscription = self.store.subscribe(None)
            try:
                async with asyncio.timeout(TIMEOUT):
                    while not predicate(self.store):
                        await anext(subscription)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {what}") from None
            finally:
                subscription.close()

        self.call(wait())

    def close(self) -> None:
        async def stop() -> None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            await self.server.close()

        self.call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def meshctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["--state-dir", self.state_dir, *argv], {}, out, err, io.StringIO(stdin))
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def _pods(st: store.ObjectStore, app: str) -> list[dict[str, Any]]:
    return [
        p
        for p in st.list(resources.PODS, "shop").items
        if objects.labels(p).get("app") == app and not objects.is_terminating(p)
    ]


def _settled(st: store.ObjectStore, name: str, replicas: int) -> bool:
    dep = st.find(kinds.DEPLOYMENTS, name, "shop")
    if dep is None:
        return False
    current = dep.get("status", {})
    return (
        len(_pods(st, name)) == replicas
        and current.get("observedGeneration") == dep["metadata"]["generation"]
        and current.get("replicas") == replicas
    )


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_apply_get_scale_and_delete_a_deployment(cluster: Cluster) -> None:
    cluster.meshctl(
        "apply", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
    )
    code, out, err = cluster.meshctl("apply", "-f", "-", stdin=WEB)
    assert (code, out, err) == (0, "deployment.apps/web created\n", "")
    cluster.until("2 pods", lambda st: _settled(st, "web", 2))
    code, out, _ = cluster.meshctl("apply", "-f", "-", stdin=WEB)
    assert (code, out) == (0, "deployment.apps/web unchanged\n")

    for kind in ("deployments", "deploy", "deployment"):
        code, out, err = cluster.meshctl("get", kind, "-n", "shop")
        assert (code, err) == (0, "")
        header, *rows = _rows(out)
        assert header == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
        assert [r[:4] for r in rows] == [["web", "0/2", "2", "0"]]
    code, out, _ = cluster.meshctl("get", "deploy", "-n", "shop", "-o", "wide")
    header, row = _rows(out)
    assert header[-3:] == ["CONTAINERS", "IMAGES", "SELECTOR"]
    assert row[-3:] == ["app", "mesh-demo-app", "app=web"]
    code, out, _ = cluster.meshctl("get", "deploy", "web", "-n", "shop", "-o", "yaml")
    assert yaml.safe_load(out)["status"]["replicas"] == 2

    for argv in (("deployment/web",), ("deploy", "web"), ("deploy/web",)):
        code, out, err = cluster.meshctl("scale", "-n", "shop", *argv, "--replicas", "3")
        assert (code, out, err) == (0, "deployment.apps/web scaled\n", "")
    cluster.until("3 pods", lambda st: _settled(st, "web", 3))
    code, out, _ = cluster.meshctl("scale", "-n", "shop", "deploy/web", "--replicas", "1")
    assert out == "deployment.apps/web scaled\n"
    # No node in this test: unscheduled pods are removed at once.
    cluster.until("1 pod", lambda st: _settled(st, "web", 1))
    code, out, _ = cluster.meshctl("get", "pods", "-n", "shop")
    assert len(_rows(out)) == 2

    code, out, err = cluster.meshctl("scale", "-n", "shop", "deploy/missing", "--replicas", "1")
    assert (code, out) == (1, "")
    assert err == 'Error from server (NotFound): deployments "missing" not found\n'
    code, _, err = cluster.meshctl("scale", "deploy/web", "--replicas", "2")
    assert code == 1
    assert "not found" in err, "the default namespace has no web"

    code, out, _ = cluster.meshctl("delete", "deploy", "web", "-n", "shop")
    assert (code, out) == (0, 'deployment "web" deleted\n')
    cluster.until("no pods", lambda st: not _pods(st, "web"))
    code, _, err = cluster.meshctl("get", "pods", "-n", "shop")
    assert (code, err) == (0, "No resources found in shop namespace.\n")


def test_demo_deployments_and_finding_their_pods(cluster: Cluster) -> None:
    code, out, err = cluster.meshctl("apply", "-f", "-", stdin=manifests.build_demo_manifest())
    assert (code, err) == (0, "")
    assert "deployment.apps/product-catalog created" in out.splitlines()
    assert "pod/client created" in out.splitlines()
    for name, replicas in manifests.REPLICAS.items():
        cluster.until(name, _settled_check(name, replicas))

    async def find(ref: str) -> dict[str, Any]:
        api = kube_client.ApiClient(f"unix://{cluster.paths.api_socket}")
        try:
            return await commands.find_pod(api, ref, manifests.NAMESPACE)
        finally:
            await api.close()

    catalog = {objects.name(p) for p in cluster.call(_list_pods(cluster, "product-catalog"))}
    assert len(catalog) == 2
    assert objects.name(cluster.call(find("deploy/product-catalog"))) in catalog
    assert objects.name(cluster.call(find("client"))) == "client"
    assert objects.name(cluster.call(find("pod/client"))) == "client"

    # What `meshctl up --demo` waits for: not there yet, since no kubelet makes pods Ready.
    async def wait() -> None:
        api = kube_client.ApiClient(f"unix://{cluster.paths.api_socket}")
        try:
            await commands.wait_deployments_ready(
                api, manifests.NAMESPACE, manifests.DEPLOYMENTS, 0.3
            )
        finally:
            await api.close()

    with pytest.raises(
        errors.MeshctlError, match=r"product-catalog \(0/2 ready; pods: product-catalog-"
    ):
        cluster.call(wait())


def _settled_check(name: str, replicas: int) -> Callable[[store.ObjectStore], bool]:
    return lambda st: _settled(st, name, replicas)


async def _list_pods(cluster: Cluster, app: str) -> list[dict[str, Any]]:
    return _pods(cluster.store, app)


def test_get_nodes_shows_address_cidr_and_ztunnel_state(cluster: Cluster) -> None:
    async def add_nodes() -> None:
        for i in (1, 2, 3):
            cluster.store.create(
                resources.NODES,
                {
                    "metadata": {"name": f"node{i}"},
                    "spec": {"podCIDR": f"10.244.{i - 1}.0/24"},
                    "status": {
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "addresses": [{"type": "InternalIP", "address": f"172.30.0.{9 + i}"}],
                    },
                },
            )

    cluster.call(add_nodes())
    me = os.getpid()
    start = procs.read_start_time(me)
    assert start is not None
    record.RecordFile(cluster.state_dir).save(
        record.PlaygroundRecord(
            prefix="md",
            state_dir=cluster.state_dir,
            phase=record.PHASE_READY,
            processes=(
                record.ProcessRecord("ztunnel", me, start, "z1.log", node="node1"),
                # Same pid, other start time: a process that has exited since.
                record.ProcessRecord("ztunnel", me, start + 1, "z2.log", node="node2"),
                record.ProcessRecord("kubelet", me, start, "k3.log", node="node3"),
            ),
        )
    )
    code, out, err = cluster.meshctl("get", "nodes")
    assert (code, err) == (0, "")
    header, *rows = _rows(out)
    assert header == ["NAME", "STATUS", "ADDRESS", "POD-CIDR", "ZTUNNEL", "AGE"]
    assert [r[:5] for r in rows] == [
        ["node1", "Ready", "172.30.0.10", "10.244.0.0/24", "Running"],
        ["node2", "Ready", "172.30.0.11", "10.244.1.0/24", "Exited"],
        ["node3", "Ready", "172.30.0.12", "10.244.2.0/24", "-"],
    ]

    # An unreadable record does not break the node list.
    with open(record.path_for(cluster.state_dir), "w") as f:
        f.write("{not json")
    code, out, err = cluster.meshctl("get", "no")
    assert (code, err) == (0, "")
    assert [r[4] for r in _rows(out)[1:]] == ["-", "-", "-"]
