"""``meshctl exec`` and ``meshctl logs``: reach a playground pod through its sandbox record.

exec joins a running container's network *and* mount namespaces (found through
``/proc/<pid>/ns``, the pid coming from the pod's ``sandbox.json``), so the command sees the
pod's address, its /etc/hosts and its /etc/resolv.conf, and runs with the container's
environment. The pid is trusted only if its start time matches the record and it really sits in
the pod's network namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshcore import netns
from meshcore.kube import objects
from meshctl import errors, podfields
from meshctl.playground import paths, procs, sandbox


class PodAccessError(errors.MeshctlError):
    """The pod has no running container or sandbox on this machine to reach."""


def find_pod_dir(state_dir: str, pod: Mapping[str, Any]) -> sandbox.PodDir:
    node = podfields.node_name(pod)
    if not node:
        raise PodAccessError(f"pod {objects.name(pod)} is not scheduled to a node yet")
    return sandbox.PodDir(paths.Paths(state_dir).node_dir(node), objects.uid(pod))


def pick_container(pod: Mapping[str, Any], container: str | None) -> str:
    names = [str(c.get("name", "")) for c in podfields.containers(pod)]
    if container is None:
        if not names:
            raise PodAccessError(f"pod {objects.name(pod)} has no containers")
        return names[0]
    if container not in names:
        raise PodAccessError(
            f"container {container} is not valid for pod {objects.name(pod)}"
            f" (containers: {', '.join(names)})"
        )
    return container


def find_container_pid(state_dir: str, pod: Mapping[str, Any], container: str) -> int:
    pod_dir = find_pod_dir(state_dir, pod)
    rec = pod_dir.load()
    if rec is None:
        raise PodAccessError(
            f"pod {objects.name(pod)} has no sandbox on this machine yet (status:"
            f" {podfields.phase(pod)})"
        )
    entry = rec.containers.get(container)
    if entry is None or not procs.is_alive(entry.pid, entry.start_time):
        raise PodAccessError(f"container {container} of pod {objects.name(pod)} is not running")
    try:
        expected = netns.inode(rec.netns_path)
    except OSError as exc:
        raise PodAccessError(f"the network namespace of pod {objects.name(pod)} is gone") from exc
    if procs.netns_inode(entry.pid) != expected:
        raise PodAccessError(
            f"process {entry.pid} is not in the network namespace of pod {objects.name(pod)}"
        )
    return entry.pid


def read_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def build_enter_preexec(pid: int) -> tuple[Callable[[], None], list[int]]:
    """A preexec_fn joining the mount and network namespaces of `pid`, and the fds it uses
    (open in the parent: the child must not depend on /proc after switching mounts)."""
    mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        netns.setns(net, netns.CLONE_NEWNET)
        netns.setns(mnt, netns.CLONE_NEWNS)
        os.chdir("/")

    return enter, [mnt, net]


def exec_in_container(pid: int, argv: Sequence[str]) -> int:
    """Run `argv` inside the container of `pid` with inherited stdio; its exit code (128+n for
    a signal, as a shell reports it)."""
    env = read_environ(pid)
    enter, fds = build_enter_preexec(pid)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets the terminal's ^C
    try:
        try:
            proc = subprocess.Popen(list(argv), env=env, preexec_fn=enter)
        finally:
            for fd in fds:
                os.close(fd)
        code = proc.wait()
    except FileNotFoundError as exc:
        raise PodAccessError(f'exec: "{argv[0]}": executable file not found in $PATH') from exc
    except subprocess.SubprocessError as exc:
        raise PodAccessError(f"cannot enter the container: {exc}") from exc
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code


def log_path(state_dir: str, pod: Mapping[str, Any], container: str) -> str:
    return find_pod_dir(state_dir, pod).log_path(container)
