"""The playground supervisor (``python -m meshctl.playground.supervisor``): owns the topology and
every process of a local playground, and records all of it in ``playground.json``.

Start-up, in order (each step is a progress message in the record, which ``meshctl up`` shows):
1. the network (`topology.Topology`): fabric, one namespace per node, host access if asked;
2. the controller in the root namespace, ready when its API answers ``GET /api/v1``;
3. node tokens minted into ``<state>/nodes/<node>/token``;
4. per node, inside the node's namespace: the node agent (ready: ``GET /healthz`` on its event
   socket), ztunnel (ready: ``GET /healthz/ready`` on ``<node address>:15021`` from inside the
   node's namespace) and the kubelet (ready: its Node is Ready).

A component that dies during start-up fails the start (its log is named in the record); once the
playground is ready a dying component is restarted with backoff. SIGTERM or SIGINT stops
everything in reverse and removes the network and the runtime state (`teardown`); so does a
failed start, which leaves the record behind, marked torn down, for ``meshctl up`` to report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import BinaryIO

from meshcore import bpffs, envconfig, files, log, netns
from meshcore.identity import tokens
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import resources
from meshctl import errors, podfields
from meshctl.playground import (
    cni_runtime,
    podstatus,
    probes,
    procs,
    record,
    teardown,
    topology,
)
from meshctl.playground import paths as state_paths

_LOG = logging.getLogger("supervisor")

DEFAULT_PREFIX = "mesh"
DEFAULT_READY_TIMEOUT = 120.0
PASSTHROUGH_ENV = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "LANG", "LC_ALL", "TZ", "HOME")
RESTART_BACKOFF_MAX = 30.0
STABLE_SECONDS = 30.0  # a component that ran this long restarts without delay
POLL = 0.2
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StartupError(errors.MeshctlError):
    """The playground could not start; `log` names the failing component's log file."""

    def __init__(self, message: str, log_path: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    state_dir: str
    nodes: int
    prefix: str
    host_access: bool
    log_level: str
    ready_timeout: float
    python: str
    base_env: Mapping[str, str]
    # Tear everything down when this process exits (tests: a killed test run leaves nothing).
    owner_pid: int | None = None
    max_pods: int = podstatus.DEFAULT_MAX_PODS  # each node's capacity (kubelet's --max-pods)
    otlp_endpoint: str = ""  # waypoints export spans here (OTLP/HTTP base URL); empty: nowhere
    redirect_mode: str = "iptables"  # the node agents' REDIRECT_MODE: iptables or ebpf

    @property
    def node_names(self) -> list[str]:
        return [f"node{i + 1}" for i in range(self.nodes)]

    @classmethod
    def from_args(cls, argv: Sequence[str], env: Mapping[str, str]) -> Config:
        parser = argparse.ArgumentParser(prog="python -m meshctl.playground.supervisor")
        parser.add_argument(
            "--state-dir", default=env.get("MESH_STATE_DIR") or state_paths.DEFAULT_STATE_DIR
        )
        parser.add_argument("--nodes", type=int, default=1)
        parser.add_argument("--prefix", default=DEFAULT_PREFIX)
        parser.add_argument("--host-access", action="store_true")
        parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT)
        parser.add_argument("--log-level", default=env.get("LOG_LEVEL") or "info")
        parser.add_argument("--owner-pid", type=int, default=None)
        parser.add_argument("--max-pods", type=int, default=podstatus.DEFAULT_MAX_PODS)
        parser.add_argument("--otlp-endpoint", default="")
        parser.add_argument("--redirect-mode", choices=envconfig.REDIRECT_MODES, default="iptables")
        args = parser.parse_args(list(argv))
        if not 1 <= args.nodes <= topology.MAX_NODES:
            raise errors.UsageError(f"--nodes must be between 1 and {topology.MAX_NODES}")
        if args.max_pods < 1:
            raise errors.UsageError(f"--max-pods must be at least 1, got {args.max_pods}")
        topology.validate_prefix(args.prefix)
        bin_dir = os.path.dirname(sys.executable)
        base = {k: env[k] for k in PASSTHROUGH_ENV if k in env}
        base["PATH"] = f"{bin_dir}:{env.get('PATH') or SYSTEM_PATH}"
        return cls(
            state_dir=os.path.abspath(args.state_dir),
            nodes=args.nodes,
            prefix=args.prefix,
            host_access=args.host_access,
            log_level=args.log_level,
            ready_timeout=args.ready_timeout,
            python=sys.executable,
            base_env=base,
            owner_pid=args.owner_pid,
            max_pods=args.max_pods,
            otlp_endpoint=args.otlp_endpoint,
            redirect_mode=args.redirect_mode,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ComponentSpec:
    name: str
    node: str | None
    argv: tuple[str, ...]
    env: Mapping[str, str]
    netns: str | None  # namespace name, None for the root namespace
    log: str


def build_controller_spec(config: Config, paths: state_paths.Paths) -> ComponentSpec:
    return ComponentSpec(
        name="controller",
        node=None,
        argv=(config.python, "-m", "controller"),
        env={
            **config.base_env,
            "CONTROLLER_STATE_DIR": paths.controller_dir,
            "LOCAL_API_SOCKET": paths.api_socket,
            "XDS_LISTEN": f"unix://{paths.xds_socket}",
            "LOG_LEVEL": config.log_level,
            "WAYPOINT_OTLP_ENDPOINT": config.otlp_endpoint,
        },
        netns=None,
        log=paths.log("controller", None),
    )


def build_node_specs(
    config: Config, paths: state_paths.Paths, node: record.NodeRecord
) -> tuple[ComponentSpec, ComponentSpec, ComponentSpec]:
    """Agent, ztunnel and kubelet of one node, each inside the node's namespace."""
    common = {**config.base_env, "NODE_NAME": node.name, "LOG_LEVEL": config.log_level}
    node_dir = paths.node_dir(node.name)
    agent = ComponentSpec(
        name="agent",
        node=node.name,
        argv=(config.python, "-m", "cni.agent"),
        env={
            **common,
            "KUBE_API": paths.kube_api,
            "CNI_EVENT_UDS": paths.cni_socket(node.name),
            "ZTUNNEL_UDS": paths.zds_socket(node.name),
            "AGENT_STATE_DIR": os.path.join(node_dir, "agent"),
            "REDIRECT_MODE": config.redirect_mode,
            "BPF_PIN_DIR": paths.bpf_dir(node.name),
        },
        netns=node.netns,
        log=paths.log("agent", node.name),
    )
    ztunnel = ComponentSpec(
        name="ztunnel",
        node=node.name,
        argv=(config.python, "-m", "ztunnel"),
        env={
            **common,
            "XDS_ADDRESS": f"unix://{paths.xds_socket}",
            "CA_ADDRESS": f"unix://{paths.xds_socket}",
            "XDS_TOKEN_FILE": paths.token(node.name),
            "INPOD_UDS": paths.zds_socket(node.name),
            "INSTANCE_IP": node.address,
        },
        netns=node.netns,
        log=paths.log("ztunnel", node.name),
    )
    kubelet = ComponentSpec(
        name="kubelet",
        node=node.name,
        argv=(config.python, "-m", "meshctl.playground.kubelet"),
        env={
            **common,
            "KUBE_API": paths.kube_api,
            "NODE_STATE_DIR": node_dir,
            "NODE_IP": node.address,
            "POD_CIDR": node.pod_cidr,
            "CNI_BIN_DIRS": ":".join(cni_runtime.default_bin_dirs()),
            "NETNS_PREFIX": config.prefix,
            "MAX_PODS": str(config.max_pods),
            # To vouch for its pods' projected service account tokens (waypoints).
            "NODE_TOKEN_FILE": paths.token(node.name),
        },
        netns=node.netns,
        log=paths.log("kubelet", node.name),
    )
    return agent, ztunnel, kubelet


class Component:
    """One supervised process."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started = 0.0

    @property
    def label(self) -> str:
        return f"{self.spec.name} on {self.spec.node}" if self.spec.node else self.spec.name

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> record.ProcessRecord:
        spec = self.spec
        os.makedirs(os.path.dirname(spec.log), exist_ok=True)
        fd = netns.open_netns(netns.path_for(spec.netns)) if spec.netns else -1
        with _open_log(spec.log, self.label) as logf:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    env=dict(spec.env),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    preexec_fn=_component_preexec(fd, os.getpid()),
                )
            except OSError as exc:
                raise StartupError(f"cannot start {self.label}: {exc}", spec.log) from exc
            finally:
                if fd >= 0:
                    os.close(fd)
        self.started = time.monotonic()
        start_time = procs.read_start_time(self.proc.pid) or 0
        return record.ProcessRecord(
            name=spec.name,
            pid=self.proc.pid,
            start_time=start_time,
            log=spec.log,
            node=spec.node,
            restarts=self.restarts,
        )

    async def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except TimeoutError:
            _LOG.warning("component ignored SIGTERM; killing", extra=log.fields(name=self.label))
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _open_log(path: str, label: str) -> BinaryIO:
    logf = open(path, "ab")  # noqa: SIM115 (returned to a with statement)
    logf.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {label}\n".encode())
    logf.flush()
    return logf


def _component_preexec(netns_fd: int, parent: int) -> Callable[[], None]:
    def enter() -> None:
        # If the supervisor dies, components get SIGTERM and stop cleanly (kubelets stop
        # their containers); `meshctl down` then finishes from the record.
        procs.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
        if netns_fd >= 0:
            netns.setns(netns_fd, netns.CLONE_NEWNET)

    return enter


def restart_delay(failures: int) -> float:
    """0 for the first crash in a while, then 2, 4, 8 ... seconds up to the maximum."""
    if failures <= 0:
        return 0.0
    return min(float(1 << min(failures, 16)), RESTART_BACKOFF_MAX)


def write_token(path: str, token: str) -> None:
    files.write_atomic(path, (token + "\n").encode())


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.paths = state_paths.Paths(config.state_dir)
        self.records = record.RecordFile(config.state_dir)
        self.topology = topology.Topology(
            prefix=config.prefix, state_dir=config.state_dir, host_access=config.host_access
        ).nodes(config.nodes)
        self.components: list[Component] = []
        self._stop = asyncio.Event()
        self._api: kube_client.ApiClient | None = None

    # -- record -------------------------------------------------------------------------------

    def _default(self) -> record.PlaygroundRecord:
        return record.PlaygroundRecord(prefix=self.config.prefix, state_dir=self.config.state_dir)

    def _update(
        self, change: Callable[[record.PlaygroundRecord], record.PlaygroundRecord]
    ) -> record.PlaygroundRecord:
        return self.records.update(change, default=self._default())

    def progress(self, text: str) -> None:
        _LOG.info(text)
        self._update(lambda r: r.with_message(text))

    # -- run ----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.config.owner_pid is not None:
            self._watch_owner(self.config.owner_pid)
        me = record.ProcessRecord(
            name="supervisor",
            pid=os.getpid(),
            start_time=procs.read_start_time(os.getpid()) or 0,
            log=self.paths.supervisor_log,
        )
        self.records.save(dataclasses.replace(self._default(), supervisor=me))
        starting = asyncio.create_task(self._start())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
                return await self._shutdown("interrupted during start-up")
            try:
                starting.result()
            except (StartupError, errors.MeshctlError, kube_errors.KubeError, OSError) as exc:
                return await self._fail(exc)
            self._update(lambda r: dataclasses.replace(r, phase=record.PHASE_READY))
            self.progress("playground ready")
            await self._supervise()
            return await self._shutdown("stop requested")
        finally:
            stopping.cancel()
            if self._api is not None:
                await self._api.close()

    def _watch_owner(self, pid: int) -> None:
        """Stop when `pid` exits: a pidfd becomes readable then (works even after SIGKILL)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._stop.set()
            return
        asyncio.get_running_loop().add_reader(fd, self._stop.set)

    async def _start(self) -> None:
        cfg, paths = self.config, self.paths
        paths.check_socket_lengths(cfg.node_names)
        for stale in (paths.api_socket, paths.xds_socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        self.progress(
            f"building the network: {cfg.nodes} node(s), prefix {cfg.prefix!r}"
            + (", host access" if cfg.host_access else "")
        )
        topo = await asyncio.to_thread(self.topology.build)
        addresses = ", ".join(f"{n.name} {n.address}" for n in topo.nodes)
        self.progress(f"network ready: fabric {topo.subnet} ({addresses})")

        os.makedirs(paths.controller_dir, exist_ok=True)
        secret = tokens.load_or_create_secret(paths.token_secret)
        minter = tokens.NodeTokens(secret)
        for node in topo.nodes:
            write_token(paths.token(node.name), minter.mint(node.name))

        controller = await self._launch(build_controller_spec(cfg, paths))
        self.progress(f"starting the controller (API on {paths.api_socket})")
        await self._wait_ready(
            "the controller API",
            controller,
            [controller],
            lambda: self._probe_unix(paths.api_socket, "/api/v1"),
        )
        self._api = kube_client.ApiClient(paths.kube_api, timeout=5.0)

        started: list[tuple[record.NodeRecord, tuple[Component, ...]]] = []
        for node in topo.nodes:
            os.makedirs(paths.node_dir(node.name), exist_ok=True)
            if cfg.redirect_mode == "ebpf":
                # Where the agent pins its map of captured connections (unmounted at teardown).
                bpffs.mount(paths.bpf_dir(node.name))
            launched = tuple([await self._launch(s) for s in build_node_specs(cfg, paths, node)])
            started.append((node, launched))
            self.progress(f"{node.name}: starting node agent, ztunnel and kubelet in {node.netns}")
        for node, (agent, zt, kubelet) in started:
            every = [controller, agent, zt, kubelet]
            await self._wait_ready(
                f"{node.name}: node agent",
                agent,
                every,
                functools.partial(self._probe_unix, paths.cni_socket(node.name), "/healthz"),
            )
            await self._wait_ready(
                f"{node.name}: ztunnel",
                zt,
                every,
                functools.partial(
                    self._probe_netns, node.netns, node.address, 15021, "/healthz/ready"
                ),
            )
            await self._wait_ready(
                f"{node.name}: kubelet",
                kubelet,
                every,
                functools.partial(self._node_ready, node.name),
            )

    async def _launch(self, spec: ComponentSpec) -> Component:
        comp = Component(spec)
        proc_record = await comp.start()
        self.components.append(comp)
        self._record_process(proc_record)
        return comp

    def _record_process(self, proc: record.ProcessRecord) -> None:
        self._update(lambda r: r.with_process(proc))

    async def _wait_ready(
        self,
        what: str,
        owner: Component,
        watched: Sequence[Component],
        check: Callable[[], Awaitable[str | None]],
    ) -> None:
        """Poll `check` (None: ready; else why not) until ready, a deadline, or a death."""
        self.progress(f"waiting for {what}")
        deadline = time.monotonic() + self.config.ready_timeout
        why = "no answer yet"
        while True:
            for comp in watched:
                if not comp.is_running:
                    code = comp.proc.returncode if comp.proc else None
                    raise StartupError(f"{comp.label} exited (code {code})", comp.spec.log)
            result = await check()
            if result is None:
                return
            why = result
            if time.monotonic() > deadline:
                raise StartupError(
                    f"timed out after {self.config.ready_timeout:g}s waiting for {what}: {why}",
                    owner.spec.log,
                )
            await asyncio.sleep(POLL)

    async def _probe_unix(self, path: str, target: str) -> str | None:
        try:
            status, _ = await probes.http_get_unix(path, target)
        except probes.ProbeError as exc:
            return str(exc)
        return None if status == 200 else f"GET {target} answered {status}"

    async def _probe_netns(self, name: str, host: str, port: int, target: str) -> str | None:
        try:
            status, _ = await probes.http_get_in_netns(netns.path_for(name), host, port, target)
        except (probes.ProbeError, OSError) as exc:
            return str(exc)
        return None if status == 200 else f"GET {target} answered {status}"

    async def _node_ready(self, node: str) -> str | None:
        assert self._api is not None
        try:
            obj = await self._api.get(resources.NODES, node)
        except kube_errors.KubeError as exc:
            return str(exc)
        return None if podfields.is_condition_true(obj, "Ready") else f"Node {node} is not Ready"

    # -- steady state -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Restart components that die, with backoff, until asked to stop."""
        failures: dict[int, int] = {}
        while not self._stop.is_set():
            for i, comp in enumerate(self.components):
                if comp.is_running or comp.proc is None:
                    continue
                code = comp.proc.returncode
                if time.monotonic() - comp.started >= STABLE_SECONDS:
                    failures[i] = 0
                delay = restart_delay(failures.get(i, 0))
                failures[i] = failures.get(i, 0) + 1
                _LOG.warning(
                    "component exited; restarting",
                    extra=log.fields(
                        name=comp.label, exit_code=code, delay=delay, log=comp.spec.log
                    ),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
                comp.restarts += 1
                try:
                    proc_record = await comp.start()
                except StartupError as exc:
                    _LOG.error("restart failed", extra=log.fields(name=comp.label, error=str(exc)))
                    comp.started = time.monotonic()
                    continue
                self._record_process(proc_record)
                self.progress(f"restarted {comp.label} (exit code {code}, restart {comp.restarts})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), POLL)

    # -- stopping -----------------------------------------------------------------------------

    async def _stop_components(self) -> None:
        for stage in teardown.STOP_ORDER:
            group = [c for c in self.components if c.spec.name == stage]
            await asyncio.gather(*(c.stop(teardown.STOP_TIMEOUTS.get(stage, 8.0)) for c in group))

    async def _shutdown(self, why: str) -> int:
        self._update(lambda r: dataclasses.replace(r, phase=record.PHASE_STOPPING))
        self.progress(f"stopping ({why})")
        await self._stop_components()
        report = await asyncio.to_thread(teardown.teardown_playground, self.config.state_dir)
        if not report.is_clean:
            _LOG.error("teardown left things behind: " + report.describe_leftovers())
            return 1
        _LOG.info("playground stopped")
        return 0

    async def _fail(self, exc: BaseException) -> int:
        log_path = exc.log_path if isinstance(exc, StartupError) else None
        message = str(exc)
        _LOG.error("start-up failed", extra=log.fields(error=message, log=log_path))
        self._update(
            lambda r: dataclasses.replace(
                r, phase=record.PHASE_FAILED, error=message, failed_log=log_path
            )
        )
        await self._stop_components()
        report = await asyncio.to_thread(
            teardown.teardown_playground, self.config.state_dir, keep_record=True
        )
        self._update(
            lambda r: dataclasses.replace(
                r, torn_down=report.is_clean, topology=None, processes=()
            ).with_message("cleaned up after the failed start")
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = Config.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    except errors.MeshctlError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 2
    log.configure(config.log_level)
    # Plain asyncio (not uvloop): components are forked with a preexec_fn from this thread.
    return asyncio.run(Supervisor(config).run())


if __name__ == "__main__":
    sys.exit(main())
