"""The playground kubelet (``python -m meshctl.playground.kubelet``), run inside a node's netns.

It plays kubelet and container runtime and nothing more: registers its Node, runs the pods the
API server schedules onto it (one `podworker.PodWorker` each, networking through the CNI chain
exactly as a container runtime does it), and plays kube-proxy for pods the mesh does not capture.
It knows nothing about the mesh: enrollment happens in the CNI chain and the node agent.

Admission, as kubelet does it: the Node reports `max_pods` as its pods capacity and allocatable,
and a new pod that would exceed it (one given a `spec.nodeName` directly passes no scheduler) is
rejected before anything is made for it: status Failed/OutOfpods, no sandbox, no CNI call. A
rejected or finished pod is never started (again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from meshcore import envconfig, log, netns
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import informer, objects, resources
from meshctl import errors, podfields
from meshctl.playground import (
    cni_runtime,
    kubeproxy,
    netcmd,
    podstatus,
    podworker,
    procs,
    sandbox,
)

_LOG = logging.getLogger("kubelet")

HEARTBEAT_SECONDS = 10.0
REJECT_RETRY_FIRST = 0.1
REJECT_RETRY_MAX = 5.0
KUBELET_VERSION = "v1.31.0-playground"


class ConfigError(errors.MeshctlError):
    """A required environment variable is missing or malformed (the variable is named)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    kube_api: str
    node_state_dir: str
    pod_cidr: str
    cni_bin_dirs: tuple[str, ...]
    netns_prefix: str
    log_level: str = "info"
    node_ip: str = ""  # empty: the address of eth0
    max_pods: int = podstatus.DEFAULT_MAX_PODS
    node_token_file: str = ""  # the node's credential, to vouch for pods with; empty: none

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        reader = envconfig.Env(env, ConfigError)
        need = reader.required
        dirs = env.get("CNI_BIN_DIRS", "").strip()
        return cls(
            node_name=need("NODE_NAME"),
            kube_api=need("KUBE_API"),
            node_state_dir=need("NODE_STATE_DIR"),
            pod_cidr=need("POD_CIDR"),
            cni_bin_dirs=tuple(d for d in dirs.split(":") if d)
            if dirs
            else cni_runtime.default_bin_dirs(),
            netns_prefix=need("NETNS_PREFIX"),
            log_level=env.get("LOG_LEVEL", "info") or "info",
            node_ip=env.get("NODE_IP", "").strip(),
            max_pods=reader.count("MAX_PODS", podstatus.DEFAULT_MAX_PODS),
            node_token_file=env.get("NODE_TOKEN_FILE", "").strip(),
        )


def build_node(config: Config, node_ip: str, ready_since: str, now: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": config.node_name,
            "labels": {
                "kubernetes.io/hostname": config.node_name,
                "kubernetes.io/os": "linux",
            },
        },
        "spec": {"podCIDR": config.pod_cidr, "podCIDRs": [config.pod_cidr]},
        "status": build_node_status(
            node_ip, ready=True, since=ready_since, now=now, max_pods=config.max_pods
        ),
    }


def build_node_status(
    node_ip: str,
    *,
    ready: bool,
    since: str,
    now: str,
    max_pods: int = podstatus.DEFAULT_MAX_PODS,
) -> dict[str, Any]:
    return {
        "addresses": [{"type": "InternalIP", "address": node_ip}],
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "KubeletStopped",
                "message": "kubelet is posting ready status" if ready else "kubelet stopped",
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            }
        ],
        "nodeInfo": {
            "kubeletVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "playground://0.1",
        },
        # Quantities are strings in the API; the scheduler fits pods into allocatable.
        "capacity": {"pods": str(max_pods)},
        "allocatable": {"pods": str(max_pods)},
    }


async def fetch_node_ip(iface: str = "eth0") -> str:
    out = await netcmd.arun(["ip", "-j", "-4", "addr", "show", "dev", iface])
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                return str(info["local"])
    raise ConfigError(f"no IPv4 address on {iface}; set NODE_IP")


class Kubelet:
    """Composition root of the kubelet process (implements `podworker.PodHost`)."""

    def __init__(self, config: Config, api: kube_client.ApiClient, node_ip: str) -> None:
        self.config = config
        self.api = api
        self.node_name = config.node_name
        self.node_ip = node_ip
        self.node_state_dir = config.node_state_dir
        self.netns_prefix = config.netns_prefix
        self.bin_dir = os.path.dirname(sys.executable)
        self.cni = cni_runtime.CniRuntime(
            config.cni_bin_dirs, os.path.join(config.node_state_dir, "cni", "cache")
        )
        self.conflist = cni_runtime.build_playground_conflist(
            config.node_state_dir, config.pod_cidr
        )
        self._workers: dict[str, tuple[podworker.PodWorker, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Pods refused at admission (by uid): never started, even if an event still shows them
        # Pending before our Failed status comes back.
        self._rejected: set[str] = set()
        # Informers: services (hosts files, kube-proxy), every pod (kube-proxy endpoints) and
        # this node's pods (the pod runtime), the last with a field selector like kubelet's.
        self.services = informer.Informer(api, resources.SERVICES, handler=self._on_service)
        # ServiceEntry hosts resolve in every pod (the playground's DNS is its hosts files).
        self.entries = informer.Informer(
            api, resources.SERVICE_ENTRIES, handler=self._on_service_entry
        )
        self.all_pods = informer.Informer(api, resources.PODS, handler=self._on_any_pod)
        self.node_pods = informer.Informer(
            api,
            resources.PODS,
            field_selector=f"spec.nodeName={config.node_name}",
            handler=self._on_node_pod,
        )
        self.proxy = kubeproxy.KubeProxy(self.services.items, self.all_pods.items)
        self._ready_since = podworker.now_rfc3339()
        self._service_names: list[sandbox.ServiceName] | None = None

    # -- PodHost ------------------------------------------------------------------------------

    def find_service_names(self) -> list[sandbox.ServiceName]:
        return sandbox.build_service_names(
            self.services.items(), self.all_pods.items(), self.entries.items()
        )

    def read_node_token(self) -> str:
        """This node's credential (read at each use: the file may be rewritten)."""
        path = self.config.node_token_file
        if not path:
            raise sandbox.ContainerConfigError(
                "this kubelet has no node token to vouch for pods with (NODE_TOKEN_FILE unset)"
            )
        try:
            with open(path, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise sandbox.ContainerConfigError(f"cannot read node token {path}: {exc}") from exc

    # -- run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        os.makedirs(os.path.join(self.node_state_dir, "pods"), exist_ok=True)
        await self._register_node()
        await self.proxy.setup()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.services.run(), name="informer-services")
                tg.create_task(self.all_pods.run(), name="informer-pods")
                tg.create_task(self.entries.run(), name="informer-service-entries")
                tg.create_task(self.proxy.run(), name="kube-proxy")
                await self.services.wait_synced()
                await self.all_pods.wait_synced()
                await self.entries.wait_synced()
                self.proxy.mark_dirty()
                tg.create_task(self.node_pods.run(), name="informer-node-pods")
                await self.node_pods.wait_synced()
                await self._remove_stale_sandboxes()
                _LOG.info("kubelet running", extra=log.fields(node=self.node_name, ip=self.node_ip))
                tg.create_task(self._heartbeat(), name="heartbeat")
        finally:
            await self._shutdown()

    async def _register_node(self) -> None:
        """Create or update our Node; waits (with backoff) for the API server to answer."""
        delay = 0.1
        while True:
            try:
                now = podworker.now_rfc3339()
                node = build_node(self.config, self.node_ip, self._ready_since, now)
                try:
                    await self.api.get(resources.NODES, self.node_name)
                except kube_errors.NotFoundError:
                    await self.api.create(node)
                else:
                    await self.api.patch(
                        resources.NODES,
                        self.node_name,
                        None,
                        {
                            "metadata": node["metadata"],
                            "spec": node["spec"],
                            "status": node["status"],
                        },
                    )
                return
            except kube_errors.ApiConnectionError as exc:
                _LOG.info("waiting for the API server", extra=log.fields(error=str(exc)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await self._patch_node_status(ready=True)

    async def _patch_node_status(self, *, ready: bool) -> None:
        now = podworker.now_rfc3339()
        status = build_node_status(
            self.node_ip,
            ready=ready,
            since=self._ready_since,
            now=now,
            max_pods=self.config.max_pods,
        )
        try:
            await self.api.patch(resources.NODES, self.node_name, None, {"status": status})
        except kube_errors.KubeError as exc:
            _LOG.warning("node status update failed", extra=log.fields(error=str(exc)))

    async def _shutdown(self) -> None:
        """Stop every container (the sandboxes stay for the next kubelet) and say NotReady."""
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._stop_workers())
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._patch_node_status(ready=False), 2.0)

    async def _stop_workers(self) -> None:
        for extra in list(self._tasks):
            extra.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        items = list(self._workers.values())
        for _, task in items:
            task.cancel()
        await asyncio.gather(*(t for _, t in items), return_exceptions=True)
        await asyncio.gather(*(w.shutdown() for w, _ in items), return_exceptions=True)

    # -- events -------------------------------------------------------------------------------

    async def _on_service(self, event: objects.WatchEvent) -> None:
        self.proxy.mark_dirty()
        self._refresh_hosts_files()

    async def _on_service_entry(self, event: objects.WatchEvent) -> None:
        self._refresh_hosts_files()

    async def _on_any_pod(self, event: objects.WatchEvent) -> None:
        self.proxy.mark_dirty()
        self._refresh_hosts_files()  # a headless service's answer follows its pods

    def _refresh_hosts_files(self) -> None:
        names = self.find_service_names()
        if names == self._service_names:
            return
        self._service_names = names
        for worker, _ in self._workers.values():
            try:
                worker.refresh_hosts()
            except OSError as exc:
                _LOG.warning("hosts file update failed", extra=log.fields(error=str(exc)))

    async def _on_node_pod(self, event: objects.WatchEvent) -> None:
        pod = event.object
        uid = objects.uid(pod)
        if not uid:
            return
        entry = self._workers.get(uid)
        if event.type == objects.DELETED:
            self._rejected.discard(uid)
            if entry is not None:
                entry[0].update(None)
            return
        if entry is not None:
            entry[0].update(pod)
            return
        if uid in self._rejected:
            if objects.is_terminating(pod):
                self._spawn(self._delete_rejected(pod))  # nothing ran: nothing to stop
            return
        if objects.is_terminating(pod):
            self._start_worker(pod)  # whatever an earlier kubelet left is cleaned up
            return
        if podstatus.is_terminal_phase(podfields.phase(pod)):
            return  # finished or rejected before: a terminal pod never runs again
        rejection = podstatus.find_rejection(self.count_admitted(), self.config.max_pods)
        if rejection is not None:
            self._rejected.add(uid)
            _LOG.warning(
                "pod rejected",
                extra=log.fields(
                    pod=f"{objects.namespace(pod)}/{objects.name(pod)}",
                    reason=rejection.reason,
                    detail=rejection.message,  # not `message`: the record's own key
                ),
            )
            self._spawn(self._reject(pod, rejection))
            return
        self._start_worker(pod)

    # -- admission ----------------------------------------------------------------------------

    def count_admitted(self) -> int:
        """Pods admitted here that still hold a slot (kubelet's active pods)."""
        return sum(1 for worker, _ in self._workers.values() if worker.is_active)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reject(self, pod: dict[str, Any], rejection: podstatus.Rejection) -> None:
        """Write the rejected pod's final status (kubelet's rejectPod), retrying until it lands
        or the pod is gone. Each write is conditional on the version we saw, so a pod recreated
        under the same name is never failed by mistake."""
        uid, name, namespace = objects.uid(pod), objects.name(pod), objects.namespace(pod)
        status = podstatus.build_rejected_status(rejection, podworker.now_rfc3339())
        delay = REJECT_RETRY_FIRST
        while True:
            latest = self.node_pods.find(name, namespace)
            if latest is None or objects.uid(latest) != uid:
                return
            if podstatus.is_terminal_phase(podfields.phase(latest)):
                return
            patch = {
                "metadata": {"resourceVersion": objects.resource_version(latest)},
                "status": status,
            }
            try:
                await self.api.patch(resources.PODS, name, namespace, patch, subresource="status")
                return
            except kube_errors.NotFoundError:
                return
            except kube_errors.KubeError as exc:
                # A conflict means our cache is behind: it catches up while we wait.
                _LOG.info(
                    "rejection status not written yet; retrying",
                    extra=log.fields(pod=f"{namespace}/{name}", error=str(exc)),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, REJECT_RETRY_MAX)

    async def _delete_rejected(self, pod: dict[str, Any]) -> None:
        """A rejected pod being deleted goes at once: it has no containers or sandbox."""
        try:
            await self.api.delete(
                resources.PODS,
                objects.name(pod),
                objects.namespace(pod),
                grace_period_seconds=0,
                precondition_uid=objects.uid(pod),
            )
        except (kube_errors.NotFoundError, kube_errors.ConflictError):
            pass
        except kube_errors.KubeError as exc:
            _LOG.warning("rejected pod delete failed", extra=log.fields(error=str(exc)))

    def _start_worker(self, pod: dict[str, Any]) -> None:
        uid = objects.uid(pod)
        worker = podworker.PodWorker(self, pod)
        task = asyncio.create_task(worker.run(), name=f"pod-{objects.name(pod)}")
        self._workers[uid] = (worker, task)

        def done(t: asyncio.Task[None]) -> None:
            if self._workers.get(uid, (None, None))[1] is t:
                del self._workers[uid]
            if not t.cancelled() and t.exception() is not None:
                # A worker bug must not orphan the pod: start a fresh worker for it.
                latest = self.node_pods.find(objects.name(pod), objects.namespace(pod))
                if latest is not None and objects.uid(latest) == uid:
                    asyncio.get_running_loop().call_later(
                        1.0, self._restart_worker, uid, objects.name(pod), objects.namespace(pod)
                    )

        task.add_done_callback(done)

    def _restart_worker(self, uid: str, name: str, namespace: str) -> None:
        latest = self.node_pods.find(name, namespace)
        if latest is not None and objects.uid(latest) == uid and uid not in self._workers:
            self._start_worker(latest)

    async def _remove_stale_sandboxes(self) -> None:
        """Sandboxes left by an earlier kubelet for pods that no longer exist."""
        for uid in sandbox.find_pod_dirs(self.node_state_dir):
            if uid in self._workers:
                continue
            pod_dir = sandbox.PodDir(self.node_state_dir, uid)
            rec = pod_dir.load()
            name = rec.netns if rec else sandbox.netns_name(self.netns_prefix, uid)
            if rec is not None:
                for c in rec.containers.values():
                    procs.signal_if_alive(c.pid, c.start_time, signal.SIGKILL)
            rt = cni_runtime.RuntimeConf(
                container_id=uid,
                netns=netns.path_for(name),
                pod_namespace=rec.namespace if rec else "",
                pod_name=rec.name if rec else "",
                pod_uid=uid,
            )
            _LOG.info("removing stale sandbox", extra=log.fields(uid=uid, netns=name))
            await podworker.remove_sandbox(self, pod_dir, name, rt)


async def serve(config: Config) -> None:
    node_ip = config.node_ip or await fetch_node_ip()
    api = kube_client.ApiClient(config.kube_api)
    kubelet = Kubelet(config, api, node_ip)
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        await kubelet.run()
    except asyncio.CancelledError:
        _LOG.info("kubelet stopping")
    finally:
        await api.close()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    del argv
    try:
        config = Config.from_env(os.environ if env is None else env)
    except ConfigError as exc:
        print(f"kubelet: {exc}", file=sys.stderr)
        return 2
    log.configure(config.log_level)
    # Plain asyncio, not uvloop: containers are forked with a preexec_fn from this loop's thread
    # (their parent-death signal follows that thread).
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
