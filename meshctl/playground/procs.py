"""Processes, named safely: (pid, start time) pairs, /proc scans, and signalling by PID.

A PID alone is not an identity: once the process exits the kernel may hand the number to an
unrelated process. Everything the playground records carries the start time from
``/proc/<pid>/stat`` as well, and nothing is signalled unless both still match.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Iterable

from meshctl.playground import record

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def read_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if there is no such live process.

    Zombies count as gone: they have exited and only wait to be reaped.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat[stat.rfind(")") + 2 :].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def is_alive(pid: int, start_time: int) -> bool:
    return read_start_time(pid) == start_time


def is_record_alive(proc: record.ProcessRecord) -> bool:
    return is_alive(proc.pid, proc.start_time)


def netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def find_pids_in_netns(inodes: Iterable[int]) -> dict[int, int]:
    """Live processes whose network namespace is one of `inodes`, as pid -> inode."""
    wanted = set(inodes)
    found: dict[int, int] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        ino = netns_inode(pid)
        if ino in wanted and read_start_time(pid) is not None:
            found[pid] = ino
    return found


def signal_if_alive(pid: int, start_time: int, sig: int) -> bool:
    """Send `sig` to `pid` only if it is still the process we recorded; True if sent."""
    if not is_alive(pid, start_time):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_all(
    procs: Iterable[tuple[int, int]], *, timeout: float, poll: float = 0.05
) -> list[tuple[int, int]]:
    """SIGTERM each (pid, start time), wait until they are gone or `timeout`, then SIGKILL.

    Returns the processes that were still alive after SIGKILL and a second grace period
    (normally none). Never signals a process whose start time no longer matches.
    """
    pending = [p for p in procs if signal_if_alive(p[0], p[1], signal.SIGTERM)]
    pending = _wait_gone(pending, timeout, poll)
    for pid, start in pending:
        signal_if_alive(pid, start, signal.SIGKILL)
    return _wait_gone(pending, 5.0, poll)


def _wait_gone(procs: list[tuple[int, int]], timeout: float, poll: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in procs if is_alive(*p)]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(poll)


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when the thread that forked it dies.

    Meant for a subprocess ``preexec_fn``. The signal follows the parent *thread*, so the parent
    must fork from a thread that lives as long as it does (the event loop's thread).
    """
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
