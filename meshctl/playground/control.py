"""Starting and stopping a playground from the outside: what ``meshctl up`` / ``meshctl down``
and the test fixtures do with the supervisor process.

The supervisor runs detached (its own session, output to ``<state>/supervisor.log``) and reports
through ``playground.json`` only; these functions read that record, never the supervisor's
memory, so they work the same from another terminal or after a crash.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from meshctl import errors
from meshctl.playground import paths, podstatus, procs, record, teardown, topology

POLL = 0.1


class PlaygroundRunningError(errors.MeshctlError):
    """A playground (or its leftovers) already occupies this state directory or prefix."""


class StartFailedError(errors.MeshctlError):
    """The supervisor reported a failed start; `log_path`/`log_tail` name the culprit's log."""

    def __init__(self, message: str, log_path: str | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


@dataclasses.dataclass(frozen=True, slots=True)
class UpOptions:
    state_dir: str
    nodes: int = 1
    prefix: str = "mesh"
    host_access: bool = True
    timeout: float = 180.0
    log_level: str = "info"
    owner_pid: int | None = None  # the playground goes away when this process does
    max_pods: int = podstatus.DEFAULT_MAX_PODS  # pods each node admits (kubelet's --max-pods)
    otlp_endpoint: str = ""  # where waypoints export trace spans (OTLP/HTTP); empty: nowhere
    redirect_mode: str = "iptables"  # how the node agents capture pods: iptables or ebpf


@dataclasses.dataclass(frozen=True, slots=True)
class DownReport:
    prefix: str
    stopped_supervisor: bool
    netns: tuple[str, ...]  # namespaces that existed before and are gone now
    links: tuple[str, ...]
    processes: tuple[str, ...]  # recorded processes that were alive before
    leftovers: str = ""  # what still exists; empty when everything is gone

    @property
    def is_clean(self) -> bool:
        return not self.leftovers


def is_supervisor_alive(rec: record.PlaygroundRecord) -> bool:
    return rec.supervisor is not None and procs.is_record_alive(rec.supervisor)


def check_can_start(state_dir: str, prefix: str) -> None:
    rec = record.RecordFile(state_dir).load()
    if rec is not None and not rec.torn_down:
        if is_supervisor_alive(rec):
            assert rec.supervisor is not None
            raise PlaygroundRunningError(
                f"a playground is already running (prefix {rec.prefix!r}, supervisor pid"
                f" {rec.supervisor.pid}, state dir {state_dir}); stop it with `meshctl down`"
            )
        raise PlaygroundRunningError(
            f"a previous playground (prefix {rec.prefix!r}) in {state_dir} was not torn down and"
            " its supervisor is gone; clean it up with `meshctl down`"
        )
    leftover = topology.find_netns_with_prefix(prefix)
    if leftover:
        raise PlaygroundRunningError(
            f"network namespaces with prefix {prefix!r} already exist ({', '.join(leftover)});"
            f" remove them with `meshctl down --prefix {prefix}` or choose another --prefix"
        )


def check_options(opts: UpOptions) -> None:
    """Refuse options the supervisor would refuse, before anything starts (UsageError)."""
    if opts.max_pods < 1:
        raise errors.UsageError(f"--max-pods must be at least 1, got {opts.max_pods}")


def build_supervisor_argv(opts: UpOptions) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "meshctl.playground.supervisor",
        "--state-dir",
        opts.state_dir,
        "--nodes",
        str(opts.nodes),
        "--prefix",
        opts.prefix,
        "--log-level",
        opts.log_level,
        "--ready-timeout",
        f"{max(opts.timeout - 5.0, 10.0):g}",
        "--max-pods",
        str(opts.max_pods),
    ]
    if opts.host_access:
        argv.append("--host-access")
    if opts.owner_pid is not None:
        argv += ["--owner-pid", str(opts.owner_pid)]
    if opts.otlp_endpoint:
        argv += ["--otlp-endpoint", opts.otlp_endpoint]
    if opts.redirect_mode != "iptables":
        argv += ["--redirect-mode", opts.redirect_mode]
    return argv


def launch_supervisor(opts: UpOptions, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the supervisor detached from this terminal; output to ``supervisor.log``."""
    check_options(opts)
    check_can_start(opts.state_dir, opts.prefix)
    paths.Paths(opts.state_dir).check_socket_lengths([f"node{opts.nodes}"])
    os.makedirs(opts.state_dir, exist_ok=True)
    record.RecordFile(opts.state_dir).remove()  # a torn-down record of an earlier failure
    log_path = paths.Paths(opts.state_dir).supervisor_log
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            build_supervisor_argv(opts),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def read_log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(
    state_dir: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    on_progress: Callable[[str], None] = lambda _: None,
) -> record.PlaygroundRecord:
    """Follow the record until phase ``ready``; each new progress message goes to `on_progress`.

    Raises StartFailedError on a failed start, a supervisor that exits early, or the deadline.
    """
    records = record.RecordFile(state_dir)
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        try:
            rec = records.load()
        except record.RecordError:
            rec = None  # the supervisor is between writes of its first record
        if rec is not None:
            for msg in rec.messages[seen:]:
                on_progress(msg.text)
            seen = len(rec.messages)
            if rec.phase == record.PHASE_READY:
                return rec
            if rec.phase == record.PHASE_FAILED:
                raise StartFailedError(
                    rec.error or "the playground failed to start",
                    rec.failed_log,
                    read_log_tail(rec.failed_log) if rec.failed_log else "",
                )
        if proc.poll() is not None:
            log_path = paths.Paths(state_dir).supervisor_log
            raise StartFailedError(
                f"the supervisor exited (code {proc.returncode}) before the playground was ready",
                log_path,
                read_log_tail(log_path),
            )
        if time.monotonic() > deadline:
            raise StartFailedError(
                f"the playground was not ready after {timeout:g}s"
                + (f" (last step: {rec.messages[-1].text})" if rec and rec.messages else ""),
                paths.Paths(state_dir).supervisor_log,
            )
        time.sleep(POLL)


def _root_links(names: Sequence[str]) -> set[str]:
    return set(names) & topology.find_root_links()


def stop_playground(state_dir: str, prefix: str | None = None, timeout: float = 90.0) -> DownReport:
    """Stop the supervisor (SIGTERM, deadline, SIGKILL) and finish from the record; then check
    that nothing it made remains."""
    rec = record.RecordFile(state_dir).load()
    use_prefix = prefix or (rec.prefix if rec else None)
    if use_prefix is None:
        raise errors.NotRunningError(
            f"no playground record in {state_dir}; pass --prefix to remove leftovers by name"
        )
    topology.validate_prefix(use_prefix)
    links = [f"{use_prefix}-host", *(rec.topology.links if rec and rec.topology else ())]
    netns_before = topology.find_netns_with_prefix(use_prefix)
    links_before = _root_links(links)
    procs_before = [p for p in (rec.processes if rec else ()) if procs.is_record_alive(p)]

    stopped_supervisor = False
    if rec is not None and rec.supervisor is not None and is_supervisor_alive(rec):
        sup = rec.supervisor
        left = procs.stop_all([(sup.pid, sup.start_time)], timeout=timeout)
        stopped_supervisor = not left

    # Whatever the supervisor did or did not finish, finish it from the record.
    report = teardown.teardown_playground(state_dir, prefix=use_prefix)

    problems = []
    remaining_netns = topology.find_netns_with_prefix(use_prefix)
    if remaining_netns:
        problems.append("network namespaces " + ", ".join(remaining_netns))
    remaining_links = _root_links(links)
    if remaining_links:
        problems.append("links " + ", ".join(sorted(remaining_links)))
    alive = [teardown.describe(p) for p in procs_before if procs.is_record_alive(p)]
    if alive:
        problems.append("processes " + ", ".join(alive))
    if report.mounts:
        problems.append("mounts " + ", ".join(report.mounts))
    if report.network.lingering_pids:
        problems.append(
            "processes inside deleted namespaces: "
            + ", ".join(str(p) for p in report.network.lingering_pids)
        )
    return DownReport(
        prefix=use_prefix,
        stopped_supervisor=stopped_supervisor,
        netns=tuple(n for n in netns_before if n not in remaining_netns),
        links=tuple(sorted(links_before - remaining_links)),
        processes=tuple(teardown.describe(p) for p in procs_before),
        leftovers="; ".join(problems),
    )


def shut_down_launched(
    proc: subprocess.Popen[bytes] | None, state_dir: str, prefix: str, timeout: float = 90.0
) -> DownReport:
    """Stop a playground this process launched (idempotent): ask its supervisor to stop, wait
    (SIGKILL after `timeout`), finish from the record, remove the state directory."""
    report = DownReport(prefix, False, (), (), ())
    if proc is not None:
        interrupt_supervisor(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.isdir(state_dir):
        report = stop_playground(state_dir, prefix)
        shutil.rmtree(state_dir, ignore_errors=True)
    return report


def interrupt_supervisor(proc: subprocess.Popen[bytes]) -> None:
    """Ask a supervisor we launched to stop (it tears down itself)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
