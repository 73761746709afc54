"""``playground.json``: the record of everything a playground made, written before it is made.

Teardown works from this file alone (after a crash of the supervisor, of meshctl, or of the
machine's patience), so every network namespace and root link is recorded *before* it is
created, and every process right after it is spawned (with its start time, so that a PID the
kernel has since reused for someone else's process is never signalled).

Writes are atomic (temporary file, fsync, rename): readers such as ``meshctl up`` polling for
progress never see half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from meshcore import files
from meshctl import errors

RECORD_NAME = "playground.json"
FORMAT_VERSION = 1

PHASE_STARTING = "starting"
PHASE_READY = "ready"
PHASE_FAILED = "failed"
PHASE_STOPPING = "stopping"
PHASES = (PHASE_STARTING, PHASE_READY, PHASE_FAILED, PHASE_STOPPING)


class RecordError(errors.MeshctlError):
    """``playground.json`` is unreadable or malformed; `path` names the file."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"playground record {path}: {problem}")
        self.path = path
        self.problem = problem


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    netns: str
    address: str  # the node's fabric address, without prefix length
    pod_cidr: str
    fabric_link: str  # the veth's name on the fabric side


@dataclasses.dataclass(frozen=True, slots=True)
class TopologyRecord:
    prefix: str
    fabric_netns: str
    bridge: str
    subnet: str
    host_link: str | None = None
    host_address: str | None = None
    nodes: tuple[NodeRecord, ...] = ()
    netns: tuple[str, ...] = ()  # every namespace we created or were about to create
    links: tuple[str, ...] = ()  # links in the root namespace, same rule

    def find_node(self, name: str) -> NodeRecord | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str  # controller | agent | ztunnel | kubelet | supervisor
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat; (pid, start_time) names one process for ever
    log: str
    node: str | None = None
    restarts: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    time: float
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class PlaygroundRecord:
    prefix: str
    state_dir: str
    phase: str = PHASE_STARTING
    messages: tuple[Message, ...] = ()
    error: str | None = None
    failed_log: str | None = None  # log file of the component that failed, for `meshctl up`
    supervisor: ProcessRecord | None = None
    topology: TopologyRecord | None = None
    processes: tuple[ProcessRecord, ...] = ()
    torn_down: bool = False  # set after a failed start was fully cleaned up

    def with_message(self, text: str, now: float | None = None) -> PlaygroundRecord:
        stamp = time.time() if now is None else now
        return dataclasses.replace(self, messages=(*self.messages, Message(stamp, text)))

    def with_process(self, proc: ProcessRecord) -> PlaygroundRecord:
        """Insert or replace the process with the same (name, node)."""
        others = tuple(p for p in self.processes if (p.name, p.node) != (proc.name, proc.node))
        return dataclasses.replace(self, processes=(*others, proc))

    def find_process(self, name: str, node: str | None = None) -> ProcessRecord | None:
        return next((p for p in self.processes if (p.name, p.node) == (name, node)), None)


def path_for(state_dir: str) -> str:
    return os.path.join(state_dir, RECORD_NAME)


def encode(record: PlaygroundRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["version"] = FORMAT_VERSION
    return out


def decode(data: Mapping[str, Any]) -> PlaygroundRecord:
    """Build a record from parsed JSON; KeyError/TypeError/ValueError mean malformed."""
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r}")
    topo = data.get("topology")
    sup = data.get("supervisor")
    return PlaygroundRecord(
        prefix=str(data["prefix"]),
        state_dir=str(data["state_dir"]),
        phase=_phase(data["phase"]),
        messages=tuple(Message(float(m["time"]), str(m["text"])) for m in data["messages"]),
        error=_opt_str(data.get("error")),
        failed_log=_opt_str(data.get("failed_log")),
        supervisor=_process(sup) if sup is not None else None,
        topology=_topology(topo) if topo is not None else None,
        processes=tuple(_process(p) for p in data["processes"]),
        torn_down=bool(data.get("torn_down", False)),
    )


def _phase(value: object) -> str:
    if value not in PHASES:
        raise ValueError(f"unknown phase {value!r}")
    return str(value)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _process(data: Mapping[str, Any]) -> ProcessRecord:
    return ProcessRecord(
        name=str(data["name"]),
        pid=int(data["pid"]),
        start_time=int(data["start_time"]),
        log=str(data["log"]),
        node=_opt_str(data.get("node")),
        restarts=int(data.get("restarts", 0)),
    )


def _topology(data: Mapping[str, Any]) -> TopologyRecord:
    return TopologyRecord(
        prefix=str(data["prefix"]),
        fabric_netns=str(data["fabric_netns"]),
        bridge=str(data["bridge"]),
        subnet=str(data["subnet"]),
        host_link=_opt_str(data.get("host_link")),
        host_address=_opt_str(data.get("host_address")),
        nodes=tuple(
            NodeRecord(
                name=str(n["name"]),
                netns=str(n["netns"]),
                address=str(n["address"]),
                pod_cidr=str(n["pod_cidr"]),
                fabric_link=str(n["fabric_link"]),
            )
            for n in data["nodes"]
        ),
        netns=tuple(str(n) for n in data["netns"]),
        links=tuple(str(n) for n in data["links"]),
    )


class RecordFile:
    """Load and atomically rewrite one ``playground.json``."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = path_for(state_dir)

    def load(self) -> PlaygroundRecord | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(self.path, exc.strerror or str(exc)) from exc
        try:
            return decode(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(self.path, f"malformed: {exc}") from exc

    def save(self, record: PlaygroundRecord) -> None:
        text = json.dumps(encode(record), indent=2, sort_keys=True) + "\n"
        files.write_atomic(self.path, text.encode(), mode=0o644)

    def update(
        self, change: Callable[[PlaygroundRecord], PlaygroundRecord], *, default: PlaygroundRecord
    ) -> PlaygroundRecord:
        """Apply `change` to the stored record (or to `default` if there is none) and save it."""
        current = self.load() or default
        new = change(current)
        self.save(new)
        return new

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
