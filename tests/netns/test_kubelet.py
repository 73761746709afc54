"""The playground kubelet as a real process inside a real node namespace, against the real local
API server, with the real CNI chain (bridge + host-local + mesh-cni) whose mesh-cni talks to the
agent's real event server (with a recording handler standing in for the node agent)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from cni.agent import plugin_server
from controller.sources.local import apiserver, kinds, store
from meshcore import netns
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import resources
from meshctl import podfields
from meshctl.playground import paths, procs, sandbox, topology

pytestmark = pytest.mark.netns

T = TypeVar("T")


class Agent:
    """Stands in for the node agent behind mesh-cni: records events, can refuse ADDs."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.refuse: str | None = None

    async def on_add(self, event: plugin_server.PodAddEvent) -> None:
        if self.refuse:
            raise RuntimeError(self.refuse)
        self.events.append(event)

    async def on_del(self, event: plugin_server.PodDelEvent) -> None:
        self.events.append(event)

    async def on_check(self, event: plugin_server.PodCheckEvent) -> None:
        self.events.append(event)


class Cluster:
    """API server + agent events on a background loop; one node with a kubelet process."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.prefix = f"mt{token}"
        self.state_dir = f"/tmp/mt-{token}"
        self.paths = paths.Paths(self.state_dir)
        self.agent = Agent()
        self.kubelet: subprocess.Popen[bytes] | None = None
        self.topo = topology.Topology(prefix=self.prefix, state_dir=self.state_dir).node("node1")
        self.node = self.topo.build().nodes[0]
        self.node_dir = self.paths.node_dir("node1")
        os.makedirs(self.node_dir)
        os.makedirs(self.paths.controller_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.api_server = apiserver.LocalApiServer(store.ObjectStore(kinds.build_registry()))
        self.events = plugin_server.PluginEventServer(self.paths.cni_socket("node1"), self.agent)
        self.on_loop(self.api_server.start(self.paths.api_socket))
        self.on_loop(self.events.start())

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def start_kubelet(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NODE_NAME": "node1",
            "KUBE_API": self.paths.kube_api,
            "NODE_STATE_DIR": self.node_dir,
            "POD_CIDR": self.node.pod_cidr,
            "NETNS_PREFIX": self.prefix,
            "LOG_LEVEL": "debug",
        }
        fd = netns.open_netns(netns.path_for(self.node.netns))
        log = open(os.path.join(self.node_dir, "kubelet.log"), "ab")  # noqa: SIM115
        try:
            self.kubelet = subprocess.Popen(
                [sys.executable, "-m", "meshctl.playground.kubelet"],
                env=env,
                stdout=log,
                stderr=log,
                preexec_fn=netns.preexec_enter(fd),
            )
        finally:
            log.close()
            os.close(fd)
        self.wait_for(lambda: self._node_ready(), "the Node to be Ready")

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        if self.kubelet is not None and self.kubelet.poll() is None:
            self.kubelet.send_signal(sig)
            self.kubelet.wait(timeout=30)
        self.kubelet = None

    def kubelet_log(self) -> str:
        with open(os.path.join(self.node_dir, "kubelet.log"), errors="replace") as f:
            return f.read()

    def call(self, fn: Callable[[kube_client.ApiClient], Awaitable[T]]) -> T:
        async def go() -> T:
            api = kube_client.ApiClient(self.paths.kube_api)
            try:
                return await fn(api)
            finally:
                await api.close()

        return asyncio.run(go())

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.call(lambda api: api.create(obj))

    def find_pod(self, name: str, namespace: str = "shop") -> dict[str, Any] | None:
        async def get(api: kube_client.ApiClient) -> dict[str, Any] | None:
            try:
                return await api.get(resources.PODS, name, namespace)
            except kube_errors.NotFoundError:
                return None

        return self.call(get)

    def pod(self, name: str, namespace: str = "shop") -> dict[str, Any]:
        found = self.find_pod(name, namespace)
        assert found is not None, f"pod {namespace}/{name} not found"
        return found

    def _node_ready(self) -> bool:
        try:
            node = self.call(lambda api: api.get(resources.NODES, "node1"))
        except kube_errors.KubeError:
            return False
        return podfields.is_condition_true(node, "Ready")

    def wait_for(self, check: Callable[[], object], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if self.kubelet is not None and self.kubelet.poll() is not None:
                pytest.fail(
                    f"kubelet exited while waiting for {what}:\n{self.kubelet_log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out waiting for {what}; kubelet log:\n{self.kubelet_log()[-3000:]}"
                )
            time.sleep(0.1)

    def wait_ready(self, name: str, namespace: str = "shop") -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            pod = self.find_pod(name, namespace)
            return pod if pod is not None and podfields.is_pod_ready(pod) else None

        result: dict[str, Any] = self.wait_for(ready, f"pod {namespace}/{name} to be Ready")
        return result

    def exec(
        self, name: str, argv: list[str], namespace: str = "shop"
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "meshctl",
            "--state-dir",
            self.state_dir,
            "exec",
            "-n",
            namespace,
            name,
            "--",
            *argv,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    def sandbox(self, pod: dict[str, Any]) -> sandbox.SandboxRecord | None:
        return sandbox.PodDir(self.node_dir, pod["metadata"]["uid"]).load()

    def close(self) -> None:
        try:
            self.stop_kubelet()
        finally:
            self.on_loop(self.events.close())
            self.on_loop(self.api_server.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            report = self.topo.teardown()
            shutil.rmtree(self.state_dir, ignore_errors=True)
            assert report.is_clean, report.describe_leftovers()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        yield c
    finally:
        c.close()


def pod_manifest(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "command": command}
    container.update(extra.pop("container", {}))
    spec: dict[str, Any] = {"containers": [container], **extra.pop("spec", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": extra.pop("labels", {})},
        "spec": spec,
    }


def service_manifest(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def demo_server(name: str) -> dict[str, Any]:
    return pod_manifest(
        name,
        ["mesh-demo-app", "serve", "--service", name, "--port", "8080"],
        labels={"app": name},
        container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            ],
        },
    )


def field(path: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": path}}


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def running_sandbox(cluster: Cluster, name: str) -> sandbox.SandboxRecord | None:
    pod = cluster.find_pod(name)
    rec = cluster.sandbox(pod) if pod else None
    return rec if rec is not None and rec.containers else None


def test_pod_runs_in_its_sandbox_with_env_and_service_names(cluster: Cluster) -> None:
    svc = cluster.create(service_manifest("product-catalog", "product-catalog"))
    cluster.start_kubelet()
    cluster.create(
        pod_manifest(
            "web",
            [
                "sh",
                "-c",
                'echo "ip=$MY_IP node=$MY_NODE sa=$MY_SA uid=$MY_UID"; exec sleep infinity',
            ],
            spec={"serviceAccountName": "web-sa"},
            container={
                "env": [
                    {"name": "MY_IP", "valueFrom": field("status.podIP")},
                    {"name": "MY_NODE", "valueFrom": field("spec.nodeName")},
                    {"name": "MY_SA", "valueFrom": field("spec.serviceAccountName")},
                    {"name": "MY_UID", "valueFrom": field("metadata.uid")},
                ]
            },
        )
    )
    pod = cluster.wait_ready("web")
    ip = podfields.pod_ip(pod)
    assert ip.startswith("10.244.0.")
    assert pod["status"]["hostIP"] == cluster.node.address
    assert pod["status"]["phase"] == "Running"
    rec = cluster.sandbox(pod)
    assert rec is not None
    assert rec.ip == ip
    assert rec.netns == sandbox.netns_name(cluster.prefix, pod["metadata"]["uid"])
    pid = rec.containers["app"].pid
    assert procs.netns_inode(pid) == netns.inode(rec.netns_path), "container is in the pod netns"

    log_path = sandbox.PodDir(cluster.node_dir, pod["metadata"]["uid"]).log_path("app")
    uid = pod["metadata"]["uid"]
    expected = f"ip={ip} node=node1 sa=web-sa uid={uid}"
    cluster.wait_for(lambda: expected in read_text(log_path), "the env line in the log")

    vip = svc["spec"]["clusterIP"]
    done = cluster.exec("web", ["getent", "hosts", "product-catalog.shop"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == vip
    done = cluster.exec("web", ["hostname", "-I"])
    assert done.stdout.split() == [ip], "exec runs in the pod's network namespace"
    with open("/etc/hosts") as f:
        assert "product-catalog" not in f.read(), "the host's /etc/hosts is untouched"

    # A service created later appears in the running pod's hosts file (rewritten in place).
    late = cluster.create(service_manifest("late", "nobody"))

    def resolves() -> bool:
        out = cluster.exec("web", ["getent", "hosts", "late.shop.svc.cluster.local"])
        return out.returncode == 0 and out.stdout.split()[0] == late["spec"]["clusterIP"]

    cluster.wait_for(resolves, "the new service in the pod's hosts file")
    assert [type(e).__name__ for e in cluster.agent.events] == ["PodAddEvent"]


def test_graceful_deletion_removes_process_netns_and_pod_dir(cluster: Cluster) -> None:
    cluster.start_kubelet()
    cluster.create(
        pod_manifest(
            "doomed",
            ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"],
            spec={"terminationGracePeriodSeconds": 30},
        )
    )
    pod = cluster.wait_for(
        lambda: (p := cluster.find_pod("doomed")) and p["status"].get("phase") == "Running" and p,
        "the pod to run",
    )
    rec = cluster.wait_for(lambda: running_sandbox(cluster, "doomed"), "the container's pid")
    pid, start = rec.containers["app"].pid, rec.containers["app"].start_time
    pod_dir = sandbox.PodDir(cluster.node_dir, pod["metadata"]["uid"]).path

    started = time.monotonic()
    cluster.call(lambda api: api.delete(resources.PODS, "doomed", "shop"))
    cluster.wait_for(lambda: cluster.find_pod("doomed") is None, "the pod to be gone", timeout=25)
    # Well within the 30 s grace period: the container got SIGTERM, not a timeout and SIGKILL.
    assert time.monotonic() - started < 10
    assert not procs.is_alive(pid, start)
    assert not topology.netns_exists(rec.netns)
    assert not os.path.exists(pod_dir)
    assert [type(e).__name__ for e in cluster.agent.events] == ["PodAddEvent", "PodDelEvent"]


def test_crashing_container_is_restarted_with_backoff(cluster: Cluster) -> None:
    cluster.start_kubelet()
    cluster.create(pod_manifest("crasher", ["sh", "-c", "echo run; exit 3"]))

    def restarted_twice() -> dict[str, Any] | None:
        pod = cluster.find_pod("crasher")
        statuses = podfields.container_statuses(pod) if pod else []
        return pod if statuses and statuses[0].get("restartCount", 0) >= 2 else None

    pod = cluster.wait_for(restarted_twice, "two restarts")
    (status,) = podfields.container_statuses(pod)
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert not podfields.is_pod_ready(pod)
    log = sandbox.PodDir(cluster.node_dir, pod["metadata"]["uid"]).log_path("app")
    with open(log) as f:
        assert f.read().count("run\n") >= 3


def test_sandbox_failure_fails_closed_and_is_reported(cluster: Cluster) -> None:
    cluster.agent.refuse = "ztunnel is not connected"
    cluster.start_kubelet()
    cluster.create(pod_manifest("blocked", ["sleep", "infinity"]))

    def reported() -> dict[str, Any] | None:
        pod = cluster.find_pod("blocked")
        return pod if pod and pod["status"].get("reason") == "FailedCreatePodSandBox" else None

    pod = cluster.wait_for(reported, "the sandbox failure in the pod status")
    assert "ztunnel is not connected" in pod["status"]["message"]
    assert not podfields.pod_ip(pod)
    rec = cluster.sandbox(pod)
    assert rec is not None
    assert rec.containers == {}, "no container may start uncaptured"
    assert not os.path.exists(
        sandbox.PodDir(cluster.node_dir, pod["metadata"]["uid"]).log_path("app")
    )

    cluster.agent.refuse = None
    ready = cluster.wait_ready("blocked")
    assert podfields.pod_ip(ready)
    assert "reason" not in ready["status"]


def test_kube_proxy_serves_vips_to_unlabelled_pods_only(cluster: Cluster) -> None:
    svc = cluster.create(service_manifest("product-catalog", "product-catalog"))
    cluster.start_kubelet()
    cluster.create(demo_server("product-catalog"))
    cluster.create(pod_manifest("client", ["sleep", "infinity"]))
    server = cluster.wait_ready("product-catalog")
    client = cluster.wait_ready("client")
    url = "http://product-catalog.shop/products"

    def answered() -> subprocess.CompletedProcess[str] | None:
        done = cluster.exec("client", ["mesh-demo-app", "get", "--timeout", "2", url])
        return done if done.returncode == 0 else None

    done = cluster.wait_for(answered, f"{url} through the VIP {svc['spec']['clusterIP']}")
    body = json.loads(done.stdout)
    assert body["pod"] == "product-catalog"
    # DNAT, not proxying: the server sees the client pod's own address.
    assert body["caller"].split(":")[0] == podfields.pod_ip(client)

    # Hairpin: a pod reaching itself through its service's VIP.
    done = cluster.exec("product-catalog", ["mesh-demo-app", "get", "--timeout", "5", url])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pod"] == "product-catalog"
    assert podfields.pod_ip(server)

    # Once the mesh captures the client, VIP traffic from it is no longer DNATed on the node.
    patch = {"metadata": {"annotations": {podfields.REDIRECTION_ANNOTATION: "enabled"}}}
    cluster.call(lambda api: api.patch(resources.PODS, "client", "shop", patch))

    def refused() -> bool:
        done = cluster.exec("client", ["mesh-demo-app", "get", "--timeout", "1", url])
        return done.returncode != 0

    cluster.wait_for(refused, "captured client to bypass kube-proxy")


def test_killed_kubelet_takes_its_containers_and_a_new_one_resumes(cluster: Cluster) -> None:
    cluster.start_kubelet()
    cluster.create(pod_manifest("keeper", ["sleep", "infinity"]))
    cluster.create(pod_manifest("goner", ["sleep", "infinity"]))
    cluster.create(pod_manifest("rebuilt", ["sleep", "infinity"]))
    keeper = cluster.wait_ready("keeper")
    goner = cluster.wait_ready("goner")
    rebuilt_rec = cluster.sandbox(cluster.wait_ready("rebuilt"))
    assert rebuilt_rec is not None
    keeper_rec = cluster.sandbox(keeper)
    goner_rec = cluster.sandbox(goner)
    assert keeper_rec is not None
    assert goner_rec is not None
    old = keeper_rec.containers["app"]

    cluster.stop_kubelet(signal.SIGKILL)
    cluster.wait_for(
        lambda: not procs.is_alive(old.pid, old.start_time), "containers to die with their kubelet"
    )

    # While no kubelet runs, one pod vanishes from the API for good, another loses its sandbox.
    cluster.call(lambda api: api.delete(resources.PODS, "goner", "shop", grace_period_seconds=0))
    subprocess.run(["ip", "netns", "del", rebuilt_rec.netns], check=True)
    cluster.start_kubelet()

    resumed = cluster.wait_for(
        lambda: (
            (p := cluster.find_pod("keeper"))
            and podfields.is_pod_ready(p)
            and (rec := cluster.sandbox(p))
            and rec.containers.get("app")
            and rec.containers["app"].pid != old.pid
            # Reported by the new kubelet (the API's Ready may still be the old one's).
            and podfields.container_statuses(p)[0].get("containerID")
            == f"playground://{rec.containers['app'].pid}"
            and p
        ),
        "the pod to run again",
    )
    assert podfields.pod_ip(resumed) == podfields.pod_ip(keeper), "the sandbox (and IP) is reused"
    assert podfields.container_statuses(resumed)[0]["restartCount"] >= 1
    goner_dir = sandbox.PodDir(cluster.node_dir, goner["metadata"]["uid"]).path
    cluster.wait_for(lambda: not os.path.exists(goner_dir), "the stale sandbox to go")
    assert not topology.netns_exists(goner_rec.netns)

    # The pod whose sandbox vanished gets a new one (new namespace, address in the pod CIDR).
    def fresh_sandbox() -> sandbox.SandboxRecord | None:
        rec = running_sandbox(cluster, "rebuilt")
        if rec is None or not topology.netns_exists(rec.netns):
            return None
        app = rec.containers["app"]
        alive = procs.is_alive(app.pid, app.start_time)
        return rec if alive and procs.netns_inode(app.pid) == netns.inode(rec.netns_path) else None

    cluster.wait_for(fresh_sandbox, "a new sandbox with the container inside")
    assert cluster.wait_ready("rebuilt")["status"]["podIP"].startswith("10.244.0.")


def test_force_deleted_pod_is_cleaned_up_by_its_deleted_event(cluster: Cluster) -> None:
    cluster.start_kubelet()
    cluster.create(pod_manifest("forced", ["sleep", "infinity"]))
    cluster.wait_ready("forced")
    rec = cluster.wait_for(lambda: running_sandbox(cluster, "forced"), "the container's pid")
    app = rec.containers["app"]
    # Grace 0 removes the object at once: the kubelet only ever sees DELETED.
    cluster.call(lambda api: api.delete(resources.PODS, "forced", "shop", grace_period_seconds=0))
    pod_dir = sandbox.PodDir(cluster.node_dir, rec.uid).path
    # The pod directory goes last (after the container, CNI DEL and the namespace).
    cluster.wait_for(lambda: not os.path.exists(pod_dir), "the sandbox to be removed")
    assert not topology.netns_exists(rec.netns)
    assert not procs.is_alive(app.pid, app.start_time)
    assert [type(e).__name__ for e in cluster.agent.events] == ["PodAddEvent", "PodDelEvent"]
