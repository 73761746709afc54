"""Stopping a playground from its record alone: the supervisor's last step and `meshctl down`'s
fallback when the supervisor is gone.

Order: recorded components (kubelets first, so they stop their containers; the controller
last), then any process still inside a pod's network namespace (those are containers our
kubelets started), then the network (`topology.teardown_topology`), then the runtime state.
Only recorded (pid, start time) pairs and processes inside our own pod namespaces are ever
signalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
from collections.abc import Sequence

from meshcore import bpffs, netns
from meshctl.playground import paths, procs, record, topology

STOP_ORDER = ("kubelet", "ztunnel", "agent", "controller")
STOP_TIMEOUTS = {"kubelet": 15.0, "ztunnel": 8.0, "agent": 8.0, "controller": 8.0}


@dataclasses.dataclass(frozen=True, slots=True)
class PlaygroundTeardownReport:
    stopped: tuple[str, ...]
    killed_pod_pids: tuple[int, ...]
    network: topology.TeardownReport
    surviving: tuple[str, ...] = ()  # recorded processes still alive after SIGKILL
    mounts: tuple[str, ...] = ()  # bpf filesystems still mounted under the state directory

    @property
    def is_clean(self) -> bool:
        return self.network.is_clean and not self.surviving and not self.mounts

    def describe_leftovers(self) -> str:
        parts = [self.network.describe_leftovers()] if not self.network.is_clean else []
        if self.surviving:
            parts.append("processes " + ", ".join(self.surviving))
        if self.mounts:
            parts.append("mounts " + ", ".join(self.mounts))
        return "; ".join(parts)


def describe(proc: record.ProcessRecord) -> str:
    where = f" on {proc.node}" if proc.node else ""
    return f"{proc.name}{where} (pid {proc.pid})"


def stop_recorded(processes: tuple[record.ProcessRecord, ...]) -> tuple[list[str], list[str]]:
    """Stop recorded components in `STOP_ORDER`; (stopped, still alive) descriptions."""
    stopped: list[str] = []
    surviving: list[str] = []
    rank = {name: i for i, name in enumerate(STOP_ORDER)}
    by_stage: dict[int, list[record.ProcessRecord]] = {}
    for proc in processes:
        by_stage.setdefault(rank.get(proc.name, len(STOP_ORDER)), []).append(proc)
    for stage in sorted(by_stage):
        group = [p for p in by_stage[stage] if procs.is_record_alive(p)]
        if not group:
            continue
        timeout = max(STOP_TIMEOUTS.get(p.name, 8.0) for p in group)
        left = procs.stop_all([(p.pid, p.start_time) for p in group], timeout=timeout)
        for p in group:
            (surviving if (p.pid, p.start_time) in left else stopped).append(describe(p))
    return stopped, surviving


def kill_pod_processes(prefix: str) -> list[int]:
    """SIGKILL every process inside one of our pod namespaces (``<prefix>-p-*``)."""
    inodes = set()
    for name in topology.find_netns_with_prefix(f"{prefix}-p"):
        with contextlib.suppress(OSError):
            inodes.add(os.stat(netns.path_for(name)).st_ino)
    killed = []
    for pid in procs.find_pids_in_netns(inodes):
        start = procs.read_start_time(pid)
        if start is not None and procs.signal_if_alive(pid, start, signal.SIGKILL):
            killed.append(pid)
    return killed


# What a playground creates under its state directory (docs/internals.md, "State directory"),
# relative to it. Only these are removed: a --state-dir pointed at a directory holding other
# things must not lose them.
CONTROLLER_STATE = ("store", "ca", "token-secret", "api.sock", "xds.sock")
NODE_STATE = ("pods", "cni", "agent", "token", "cni.sock", "ztunnel.sock", "bpf")


def remove_runtime_state(
    state_dir: str, nodes: Sequence[str] = (), *, keep_record: bool = False
) -> tuple[str, ...]:
    """Remove what a running playground keeps (store, CA, sockets, tokens, pod sandboxes,
    eBPF mode's bpf filesystems and the record); component logs stay for a post-mortem until
    the next `meshctl up`. Returns the mount points that could not be unmounted."""
    where = paths.Paths(state_dir)
    # eBPF mode's pinned maps go with their filesystems (the pods that used them are gone).
    for mount_point in bpf_mounts(state_dir):
        with contextlib.suppress(OSError):  # reported below as still mounted
            bpffs.unmount(mount_point)
    targets = [os.path.join(where.controller_dir, name) for name in CONTROLLER_STATE]
    for node in nodes:
        targets += [os.path.join(where.node_dir(node), name) for name in NODE_STATE]
    for path in targets:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for directory in [where.controller_dir, *(where.node_dir(n) for n in nodes)]:
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only if empty: logs stay
    if not keep_record:
        record.RecordFile(state_dir).remove()
    return tuple(bpf_mounts(state_dir))


def bpf_mounts(state_dir: str) -> list[str]:
    """The bpf filesystems mounted under the playground's node directories (found in
    /proc/self/mountinfo, so that a lost record does not hide them)."""
    under = os.path.join(os.path.realpath(paths.Paths(state_dir).node_dir("")), "")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields, _, fs = line.partition(" - ")
            mount_point = _unescape(fields.split(" ")[4])
            if fs.split(" ", 1)[0] == "bpf" and mount_point.startswith(under):
                found.append(mount_point)
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def teardown_playground(
    state_dir: str, *, prefix: str | None = None, keep_record: bool = False
) -> PlaygroundTeardownReport:
    """Everything above, from ``<state_dir>/playground.json`` (or `prefix` if it is lost)."""
    rec = record.RecordFile(state_dir).load()
    use_prefix = prefix or (rec.prefix if rec else None)
    if use_prefix is None:
        raise topology.TopologyError(
            f"no playground record in {state_dir}; pass the prefix to clean up"
        )
    stopped, surviving = stop_recorded(rec.processes if rec else ())
    killed = kill_pod_processes(use_prefix)
    network = topology.teardown_topology(rec.topology if rec else None, use_prefix)
    nodes = [n.name for n in rec.topology.nodes] if rec and rec.topology else []
    nodes += [p.node for p in (rec.processes if rec else ()) if p.node and p.node not in nodes]
    mounts = remove_runtime_state(state_dir, nodes, keep_record=keep_record)
    return PlaygroundTeardownReport(
        stopped=tuple(stopped),
        killed_pod_pids=tuple(killed),
        network=network,
        surviving=tuple(surviving),
        mounts=mounts,
    )
