"""One pod on one node, from sandbox to deletion: what kubelet's pod workers do.

Level-triggered: the worker holds the latest API object and, whenever it changes, a container
exits or a period passes, compares what runs with what should run and acts. Order of life:

1. sandbox: ``sandbox.json`` (intent), network namespace, hosts/resolv.conf, CNI ADD. An ADD
   failure is reported in the pod's status and retried with backoff after a DEL that undoes
   whatever the chain did; containers never start in a sandbox that is not fully set up (the
   mesh agent fails ADD closed when it cannot capture a pod that must be captured).
2. containers: started in the sandbox, restarted with backoff per restartPolicy.
3. status: podIP, phase, container states, Ready once every container runs and every declared
   TCP containerPort accepts a connection made from inside the pod's namespace.
4. deletion (deletionTimestamp set, or the object vanished): SIGTERM, grace period, SIGKILL,
   CNI DEL, namespace deleted, pod directory removed, then the API object is deleted with grace 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from meshcore import log, netns
from meshcore.identity import tokens
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import objects, resources
from meshctl import podfields
from meshctl.playground import (
    cni_runtime,
    containers,
    netcmd,
    podstatus,
    procs,
    sandbox,
    volumes,
)

_LOG = logging.getLogger("kubelet.pod")

RESYNC_SECONDS = 1.0
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
RESET_AFTER_SECONDS = 30.0  # a container that ran this long starts its backoff afresh
SHUTDOWN_GRACE_MAX = 5.0
# What the containers still get after preStop hooks used up the whole grace period (kubelet: 2s).
PRE_STOP_OVERRUN_GRACE = 2.0
PROBE_TIMEOUT = 1.0
DEL_ATTEMPTS = 3


class PodHost(Protocol):
    """What a worker needs from its kubelet (the seam tests can fill)."""

    node_name: str
    node_ip: str
    node_state_dir: str
    netns_prefix: str
    bin_dir: str
    api: kube_client.ApiClient
    cni: cni_runtime.CniRuntime
    conflist: cni_runtime.NetworkConfigList

    def find_service_names(self) -> list[sandbox.ServiceName]: ...

    def read_node_token(self) -> str: ...


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class ContainerState:
    """Mutable bookkeeping of one container (owned by its worker's task only)."""

    name: str
    proc: asyncio.subprocess.Process | None = None
    started_at: str = ""
    started_mono: float = 0.0
    restarts: int = 0
    has_run: bool = False
    last_exit_code: int | None = None
    last_finished_at: str = ""
    next_start: float = 0.0
    failures: int = 0
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    record: sandbox.ContainerRecord | None = None

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def next_backoff(failures: int) -> float:
    return min(BACKOFF_BASE * (1 << min(max(failures, 0), 16)), BACKOFF_MAX)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _is_finished_for_good(policy: str, state: ContainerState) -> bool:
    """The container exited and its restartPolicy says it stays down."""
    if not state.has_run or state.last_exit_code is None:
        return False
    return policy == "Never" or (policy == "OnFailure" and state.last_exit_code == 0)


class PodWorker:
    def __init__(self, host: PodHost, pod: dict[str, Any]) -> None:
        self.host = host
        self.uid = objects.uid(pod)
        self.namespace = objects.namespace(pod)
        self.name = objects.name(pod)
        self._pod = pod
        self._deleted = False
        self._wake = asyncio.Event()
        self._dir = sandbox.PodDir(host.node_state_dir, self.uid)
        self._netns = sandbox.netns_name(host.netns_prefix, self.uid)
        self._rt = cni_runtime.RuntimeConf(
            container_id=self.uid,
            netns=netns.path_for(self._netns),
            pod_namespace=self.namespace,
            pod_name=self.name,
            pod_uid=self.uid,
        )
        self._pod_ip = ""
        self._sandbox_ready = False
        self._sandbox_error = ""
        self._sandbox_failures = 0
        self._containers: dict[str, ContainerState] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._ports_ready: dict[str, bool] = {}
        self._start_time = now_rfc3339()
        self._transitions: dict[str, str] = {}
        self._last_ok: dict[str, bool] = {}
        self._last_status: dict[str, Any] | None = None
        # The phase this worker last decided (sent or about to be): ahead of the API's copy.
        self._phase = podfields.phase(pod)
        self._stopped = False  # containers stopped and sandbox gone: the slot is free
        self._seed_from_status(pod)
        self._fields = log.fields(pod=f"{self.namespace}/{self.name}", uid=self.uid)

    # -- inputs -------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        """Still holds one of the node's pod slots (kubelet's admission counts these).

        False as soon as this worker knows better than the API: the phase it is about to report
        is terminal, the object was deleted, or termination finished before the final delete.
        The API server schedules a waiting pod onto the slot the moment it learns, and that
        pod's event may reach the kubelet before the answer to our own write does (or, after a
        relist, which lists additions first, before the DELETED event of the pod that left).
        """
        return not (self._deleted or self._stopped or podstatus.is_terminal_phase(self._phase))

    def update(self, pod: dict[str, Any] | None) -> None:
        """A newer object (None: it was deleted from the API)."""
        if pod is None:
            self._deleted = True
        else:
            self._pod = pod
        self._wake.set()

    def refresh_hosts(self) -> None:
        """Services changed: rewrite the hosts file in place (the bind mounts see it at once)."""
        if self._dir.exists():
            self._dir.write_file(self._dir.hosts, self._hosts_text())

    def _seed_from_status(self, pod: Mapping[str, Any]) -> None:
        """After a kubelet restart, keep counting restarts where the API left off."""
        for st in podfields.container_statuses(pod):
            count = st.get("restartCount")
            state = st.get("state") or {}
            had_run = isinstance(state, Mapping) and ("running" in state or "terminated" in state)
            self._containers[str(st.get("name"))] = ContainerState(
                name=str(st.get("name")),
                restarts=count if isinstance(count, int) else 0,
                has_run=had_run or bool(count),
            )
        start = podfields.status(pod).get("startTime")
        if isinstance(start, str) and start:
            self._start_time = start

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                # Cleared before looking, so a change that arrives while we act is not lost:
                # the sleep below then returns at once.
                self._wake.clear()
                if self._deleted or objects.is_terminating(self._pod):
                    await self._terminate()
                    return
                if not self._sandbox_ready and not await self._setup_sandbox():
                    await self._report_status()
                    await self._sleep(next_backoff(self._sandbox_failures - 1))
                    continue
                await self._sync_containers()
                await self._probe_ports()
                await self._report_status()
                await self._sleep(RESYNC_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOG.exception("pod worker failed", extra=self._fields)
            raise

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    # -- sandbox ------------------------------------------------------------------------------

    def _hosts_text(self) -> str:
        return sandbox.build_hosts_file(
            self.namespace, self.name, self._pod_ip, self.host.find_service_names()
        )

    async def _setup_sandbox(self) -> bool:
        host = self.host
        old = self._dir.load()
        cached = host.cni.find_cached_result(host.conflist, self._rt)
        if old is not None and cached is not None and _exists(self._rt.netns):
            # A restarted kubelet finds its sandbox intact: keep it (and the pod's IP).
            self._pod_ip = cni_runtime.find_ip(cached) or old.ip
            self._finish_sandbox()
            _LOG.info("reusing sandbox", extra=self._fields)
            return True
        if cached is not None:
            # The sandbox is gone but the chain still holds state for it: release that first.
            with contextlib.suppress(cni_runtime.CniError):
                await host.cni.delete(host.conflist, self._rt)
        self._dir.save(sandbox.SandboxRecord(self.uid, self.namespace, self.name, self._netns))
        self._dir.write_file(self._dir.hosts, self._hosts_text())
        self._dir.write_file(self._dir.resolv, sandbox.build_resolv_conf(self.namespace))
        try:
            if not _exists(self._rt.netns):
                await netcmd.aip("netns", "add", self._netns)
                await netcmd.aip("link", "set", "lo", "up", netns=self._netns)
            result = await host.cni.add(host.conflist, self._rt)
        except (cni_runtime.CniError, netcmd.CommandError) as exc:
            self._sandbox_failures += 1
            self._sandbox_error = f"failed to set up sandbox network: {exc}"
            _LOG.warning(
                "sandbox setup failed; will retry",
                extra=log.fields(
                    pod=f"{self.namespace}/{self.name}",
                    error=str(exc),
                    attempt=self._sandbox_failures,
                ),
            )
            # Undo whatever the chain did before it failed, so the retry starts clean.
            with contextlib.suppress(cni_runtime.CniError):
                await host.cni.delete(host.conflist, self._rt)
            return False
        ip = cni_runtime.find_ip(result)
        if not ip:
            self._sandbox_failures += 1
            self._sandbox_error = "CNI ADD returned no IPv4 address"
            with contextlib.suppress(cni_runtime.CniError):
                await host.cni.delete(host.conflist, self._rt)
            host.cni.forget(host.conflist, self._rt)
            return False
        self._pod_ip = ip
        self._finish_sandbox()
        _LOG.info("sandbox ready", extra=log.fields(pod=f"{self.namespace}/{self.name}", ip=ip))
        return True

    def _finish_sandbox(self) -> None:
        self._sandbox_ready = True
        self._sandbox_error = ""
        self._sandbox_failures = 0
        self._dir.write_file(self._dir.hosts, self._hosts_text())
        self._dir.write_file(self._dir.resolv, sandbox.build_resolv_conf(self.namespace))
        self._save_record()

    def _save_record(self) -> None:
        self._dir.save(
            sandbox.SandboxRecord(
                uid=self.uid,
                namespace=self.namespace,
                name=self.name,
                netns=self._netns,
                ip=self._pod_ip,
                containers={
                    n: c.record for n, c in self._containers.items() if c.is_running and c.record
                },
            )
        )

    # -- containers ---------------------------------------------------------------------------

    async def _sync_containers(self) -> None:
        pod = self._pod
        policy = podfields.restart_policy(pod)
        for spec in podfields.containers(pod):
            name = str(spec.get("name", ""))
            state = self._containers.setdefault(name, ContainerState(name=name))
            if state.is_running:
                continue
            if _is_finished_for_good(policy, state):
                state.waiting_reason = ""
                continue
            if time.monotonic() < state.next_start:
                state.waiting_reason = "CrashLoopBackOff" if state.has_run else state.waiting_reason
                continue
            await self._start_container(state, spec)

    async def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        spec: Mapping[str, Any],
        container: str,
        mounts: Sequence[tuple[str, str]] = (),
    ) -> asyncio.subprocess.Process:
        """A process in the pod's sandbox, as container `container` runs (its log, its cwd)."""
        return await containers.start(
            argv,
            env=env,
            cwd=str(spec.get("workingDir") or "/"),
            netns_path=self._rt.netns,
            hosts_file=self._dir.hosts,
            resolv_file=self._dir.resolv,
            log_path=self._dir.log_path(container),
            mounts=mounts,
        )

    def _prepare_volumes(self, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Write the container's token volumes; (directory, mountPath) to bind-mount."""
        mounts = volumes.build_mounts(self._pod, spec)
        if not mounts:
            return []
        claims = tokens.PodClaims(
            node=self.host.node_name,
            namespace=self.namespace,
            name=self.name,
            uid=self.uid,
            service_account=podfields.service_account(self._pod),
        )
        node_token = self.host.read_node_token()
        try:
            return [
                (volumes.write_volume(self._dir.path, m, node_token, claims), m.mount_path)
                for m in mounts
            ]
        except (OSError, tokens.TokenError) as exc:
            raise sandbox.ContainerConfigError(f"cannot write token volume: {exc}") from exc

    async def _start_container(self, state: ContainerState, spec: Mapping[str, Any]) -> None:
        try:
            env = sandbox.build_container_env(
                self._pod_with_ip(), spec, host_ip=self.host.node_ip, bin_dir=self.host.bin_dir
            )
            argv = sandbox.build_container_argv(spec, env)
            mounts = self._prepare_volumes(spec)
            proc = await self._spawn(argv, env, spec, state.name, mounts)
        except sandbox.ContainerConfigError as exc:
            state.waiting_reason, state.waiting_message = "CreateContainerConfigError", str(exc)
            state.next_start = time.monotonic() + next_backoff(state.failures)
            state.failures += 1
            return
        except containers.ContainerStartError as exc:
            state.waiting_reason, state.waiting_message = "RunContainerError", str(exc)
            state.next_start = time.monotonic() + next_backoff(state.failures)
            state.failures += 1
            return
        if state.has_run:
            state.restarts += 1
        state.has_run = True
        state.proc = proc
        state.started_at = now_rfc3339()
        state.started_mono = time.monotonic()
        state.waiting_reason = state.waiting_message = ""
        start_time = procs.read_start_time(proc.pid) or 0
        state.record = sandbox.ContainerRecord(proc.pid, start_time)
        self._ports_ready.pop(state.name, None)
        self._save_record()
        _LOG.info(
            "container started",
            extra=log.fields(
                pod=f"{self.namespace}/{self.name}",
                container=state.name,
                pid=proc.pid,
                restarts=state.restarts,
            ),
        )
        task = asyncio.create_task(self._watch_exit(state, proc), name=f"exit-{state.name}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _pod_with_ip(self) -> dict[str, Any]:
        pod = dict(self._pod)
        status = dict(podfields.status(pod))
        status["podIP"] = self._pod_ip
        pod["status"] = status
        return pod

    async def _watch_exit(self, state: ContainerState, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        containers.kill_leftovers(proc.pid)
        ran = time.monotonic() - state.started_mono
        if ran >= RESET_AFTER_SECONDS:
            state.failures = 0
        state.last_exit_code = code
        state.last_finished_at = now_rfc3339()
        state.next_start = time.monotonic() + next_backoff(state.failures)
        state.failures += 1
        state.waiting_reason = "CrashLoopBackOff" if code != 0 else "Completed"
        self._ports_ready.pop(state.name, None)
        _LOG.info(
            "container exited",
            extra=log.fields(
                pod=f"{self.namespace}/{self.name}", container=state.name, exit_code=code
            ),
        )
        self._wake.set()

    async def _probe_ports(self) -> None:
        for spec in podfields.containers(self._pod):
            name = str(spec.get("name", ""))
            state = self._containers.get(name)
            if state is None or not state.is_running:
                self._ports_ready[name] = False
                continue
            if self._ports_ready.get(name):
                continue
            ports = [p for _, p, proto in podfields.container_ports(spec) if proto == "TCP"]
            results = [await self._probe(port) for port in ports]
            self._ports_ready[name] = all(results)

    async def _probe(self, port: int) -> bool:
        """A TCP connect from inside the pod's namespace (so readiness never depends on the
        mesh: the probe never leaves the pod)."""
        target = self._pod_ip or "127.0.0.1"

        def make_socket() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            return s

        try:
            fd = netns.open_netns(self._rt.netns)
        except OSError:
            return False
        try:
            sock = await asyncio.to_thread(netns.run_in, fd, make_socket)
        finally:
            os.close(fd)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, (target, port))
            return True
        except (OSError, TimeoutError):
            return False
        finally:
            sock.close()

    # -- status -------------------------------------------------------------------------------

    def _views(self) -> list[podstatus.ContainerView]:
        views = []
        for spec in podfields.containers(self._pod):
            name = str(spec.get("name", ""))
            st = self._containers.get(name) or ContainerState(name=name)
            views.append(
                podstatus.ContainerView(
                    name=name,
                    running=st.is_running,
                    ready=st.is_running and self._ports_ready.get(name, False),
                    started_at=st.started_at,
                    restarts=st.restarts,
                    waiting_reason="" if st.is_running else st.waiting_reason,
                    waiting_message="" if st.is_running else st.waiting_message,
                    exit_code=st.last_exit_code,
                    finished_at=st.last_finished_at,
                    pid=st.proc.pid if st.is_running and st.proc else 0,
                )
            )
        return views

    async def _report_status(self) -> None:
        views = self._views()
        sandbox_ok = self._sandbox_ready
        all_ready = sandbox_ok and bool(views) and all(v.ready for v in views)
        now = now_rfc3339()
        for kind, ok in (
            ("PodScheduled", True),
            ("PodReadyToStartContainers", sandbox_ok),
            ("Initialized", True),
            ("ContainersReady", all_ready),
            ("Ready", all_ready),
        ):
            if self._last_ok.get(kind) != ok:
                self._last_ok[kind] = ok
                self._transitions[kind] = now
        status = podstatus.build_pod_status(
            phase=podstatus.build_phase(podfields.restart_policy(self._pod), views, sandbox_ok),
            pod_ip=self._pod_ip,
            host_ip=self.host.node_ip,
            start_time=self._start_time,
            sandbox_error=self._sandbox_error,
            views=views,
            transitions=self._transitions,
        )
        if status == self._last_status:
            return
        self._phase = str(status["phase"])
        try:
            await self.host.api.patch(
                resources.PODS, self.name, self.namespace, {"status": status}, subresource="status"
            )
        except kube_errors.NotFoundError:
            return
        except kube_errors.KubeError as exc:
            _LOG.warning(
                "status update failed",
                extra=log.fields(pod=f"{self.namespace}/{self.name}", error=str(exc)),
            )
            return
        self._last_status = status

    # -- termination --------------------------------------------------------------------------

    async def stop_containers(self, grace: float) -> None:
        running = [c for c in self._containers.values() if c.is_running and c.proc]
        await asyncio.gather(*(containers.stop(c.proc, grace) for c in running if c.proc))
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _run_pre_stop_hooks(self, budget: float) -> None:
        """Every running container's `lifecycle.preStop`, side by side, within `budget` seconds."""
        specs = {str(c.get("name")): c for c in podfields.containers(self._pod)}
        hooks = []
        for state in self._containers.values():
            handler = podfields.pre_stop_handler(specs.get(state.name, {}))
            if handler is not None and state.is_running:
                hooks.append(self._pre_stop(state.name, specs[state.name], handler))
        if not hooks or budget <= 0:
            return
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*hooks)
        except TimeoutError:
            _LOG.warning(
                "preStop hook did not finish within the grace period",
                extra=log.fields(pod=f"{self.namespace}/{self.name}", grace=budget),
            )

    async def _pre_stop(
        self, name: str, spec: Mapping[str, Any], handler: Mapping[str, Any]
    ) -> None:
        fields = log.fields(pod=f"{self.namespace}/{self.name}", container=name)
        if "sleep" in handler:
            _LOG.info("running preStop sleep", extra=fields)
            await asyncio.sleep(float(handler["sleep"].get("seconds", 0)))
            return
        command = [str(a) for a in handler["exec"]["command"]]
        _LOG.info("running preStop exec", extra=log.fields(command=command, **fields))
        try:
            env = sandbox.build_container_env(
                self._pod_with_ip(), spec, host_ip=self.host.node_ip, bin_dir=self.host.bin_dir
            )
            proc = await self._spawn(command, env, spec, name)
        except (sandbox.ContainerConfigError, containers.ContainerStartError) as exc:
            _LOG.warning("preStop hook failed", extra=log.fields(error=str(exc), **fields))
            return
        try:
            code = await proc.wait()
        finally:
            # Cancelled (out of time): the hook must not outlive the container.
            await containers.stop(proc, 0)
        if code != 0:
            _LOG.warning("preStop hook exited", extra=log.fields(code=code, **fields))

    async def shutdown(self) -> None:
        """The kubelet is stopping: stop the containers, keep the sandbox for the next kubelet."""
        await self.stop_containers(min(podfields.grace_period(self._pod), SHUTDOWN_GRACE_MAX))
        if self._dir.exists():
            self._save_record()

    async def _terminate(self) -> None:
        grace = podfields.grace_period(self._pod)
        _LOG.info(
            "stopping pod", extra=log.fields(pod=f"{self.namespace}/{self.name}", grace=grace)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._run_pre_stop_hooks(float(grace))
        # As the kubelet: hooks spend the grace period; overrunning it still leaves a little.
        left = max(grace - (loop.time() - started), PRE_STOP_OVERRUN_GRACE if grace else 0.0)
        await self.stop_containers(left)
        await remove_sandbox(self.host, self._dir, self._netns, self._rt)
        self._stopped = True
        if self._deleted:
            return
        try:
            # Only this incarnation: a pod recreated under the same name must survive.
            await self.host.api.delete(
                resources.PODS,
                self.name,
                self.namespace,
                grace_period_seconds=0,
                precondition_uid=objects.uid(self._pod),
            )
        except (kube_errors.NotFoundError, kube_errors.ConflictError):
            pass
        _LOG.info("pod deleted", extra=self._fields)


async def remove_sandbox(
    host: PodHost, pod_dir: sandbox.PodDir, netns_name: str, rt: cni_runtime.RuntimeConf
) -> None:
    """CNI DEL (reverse chain), delete the namespace, remove the pod directory. Idempotent.

    DEL is retried a few times (the agent may be restarting); after that the pod goes anyway:
    deleting its namespace removes every in-pod rule, and the bridge plugin's DEL, which runs
    even when mesh-cni's fails, has released the address.
    """
    for attempt in range(DEL_ATTEMPTS):
        try:
            await host.cni.delete(host.conflist, rt)
            break
        except cni_runtime.CniError as exc:
            _LOG.warning(
                "CNI DEL failed",
                extra=log.fields(netns=netns_name, error=str(exc), attempt=attempt + 1),
            )
            if attempt + 1 == DEL_ATTEMPTS:
                host.cni.forget(host.conflist, rt)
            else:
                await asyncio.sleep(next_backoff(attempt))
    try:
        await netcmd.aip("netns", "del", netns_name)
    except netcmd.CommandError as exc:
        if not netcmd.is_missing(exc):
            _LOG.warning("netns delete failed", extra=log.fields(netns=netns_name, error=str(exc)))
    pod_dir.remove()
