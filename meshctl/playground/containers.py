"""Starting and stopping a container: a process in the pod's network namespace and in a private
mount namespace where /etc/hosts and /etc/resolv.conf are the pod's own files.

The child, between fork and exec (`build_preexec`):
1. asks for SIGKILL when the kubelet dies (pods never outlive their kubelet);
2. joins the pod's network namespace;
3. unshares its mount namespace and makes every mount a *slave* of the host's: nothing it mounts
   propagates back, while the host's unmounts (``ip netns del``) still propagate in, so a
   container never pins a deleted namespace's bind mount;
4. bind-mounts the pod's hosts and resolv.conf files over /etc's.

Containers run in their own session, so stopping signals the whole process group.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from meshcore import mounts, netns
from meshctl import errors
from meshctl.playground import procs


class ContainerStartError(errors.MeshctlError):
    """The container's process could not be started (bad command, missing executable)."""


def build_preexec(
    netns_fd: int, bind_mounts: Sequence[tuple[str, str]], parent_pid: int
) -> Callable[[], None]:
    """The `preexec_fn` that puts a freshly forked child into the pod (see module docstring)."""

    def enter() -> None:
        procs.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:  # the kubelet died before the prctl took effect
            os._exit(1)
        netns.setns(netns_fd, netns.CLONE_NEWNET)
        netns.unshare(netns.CLONE_NEWNS)
        mounts.mount(None, "/", mounts.MS_REC | mounts.MS_SLAVE)
        for source, target in bind_mounts:
            mounts.mount(source, target, mounts.MS_BIND)

    return enter


async def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    netns_path: str,
    hosts_file: str,
    resolv_file: str,
    log_path: str,
    mounts: Sequence[tuple[str, str]] = (),
) -> asyncio.subprocess.Process:
    """Spawn the container. Must be called from the event loop's (long-lived) thread.
    `mounts` are (host directory, container path) bind mounts; a missing container path is
    created (on the host: the container shares its filesystem) as an empty directory."""
    try:
        for _, target in mounts:
            os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise ContainerStartError(f"cannot create mount point: {exc}") from exc
    fd = netns.open_netns(netns_path)
    log = _open_log(log_path)
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=build_preexec(
                fd,
                [(hosts_file, "/etc/hosts"), (resolv_file, "/etc/resolv.conf"), *mounts],
                os.getpid(),
            ),
        )
    except FileNotFoundError as exc:
        raise ContainerStartError(
            f'exec: "{argv[0]}": executable file not found in $PATH ({env.get("PATH", "")})'
        ) from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContainerStartError(f"cannot start {argv[0]!r}: {exc}") from exc
    except ValueError as exc:  # a NUL byte in the command, an argument or the environment
        raise ContainerStartError(f"cannot start {argv[0]!r}: {exc}") from exc
    finally:
        log.close()
        os.close(fd)


def _open_log(path: str) -> BinaryIO:
    return open(path, "ab")  # the caller closes it; the child keeps its own copy


async def stop(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM the container's process group, SIGKILL after `grace` seconds; its exit code."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=grace)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
    code = await proc.wait()
    kill_leftovers(proc.pid)
    return code


def kill_leftovers(pgid: int) -> None:
    """SIGKILL what is left of a container's process group after its leader exited.

    Safe after the leader was reaped: Linux never hands out a PID that is still some live
    group's id, so `pgid` names only that container's remaining processes, if any.
    """
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
