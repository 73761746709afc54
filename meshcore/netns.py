"""Entering network namespaces from Python 3.11, which has no os.setns.

A network namespace is per thread. Sockets keep the namespace they were created in for their whole
life, so the pattern is: create the socket while the thread is in the pod's namespace, then serve
it from the event loop on any thread. `call_in` does that on the calling thread itself (setns
there and back: ~3 us, like Rust ztunnel's in-pod socket factory), so the event loop thread can
make pod sockets with no thread hop; `NetnsThread` keeps a worker thread per namespace (~0.12 ms
per call) for blocking work, and `run_in` uses a fresh thread (~1.3 ms, platform notes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from meshcore import errors

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type (linux/nsfs.h)
NETNS_RUN_DIR = "/var/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(errors.MeshError, OSError):
    """Entering or opening a network namespace failed."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind `fd`."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"unshare: {os.strerror(err)}")


def path_for(name: str) -> str:
    """Path of a named namespace as `ip netns add` creates it."""
    return os.path.join(NETNS_RUN_DIR, name)


def open_netns(path: str) -> int:
    """Open a namespace file read-only. Never creates one (unlike pyroute2's default flags)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(
            exc.errno, f"cannot open network namespace {path}: {exc.strerror}"
        ) from exc
    except ValueError as exc:  # an embedded NUL
        raise NetnsError(errno.EINVAL, f"cannot open network namespace {path!r}: {exc}") from exc


def check_netns(path: str) -> None:
    """Raise NetnsError unless `path` is a network namespace file (a /proc/PID/ns/net or a
    bind mount of one, as a container runtime hands to CNI)."""
    fd = open_netns(path)
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno != errno.ENOTTY:
            raise NetnsError(exc.errno, f"cannot inspect {path}: {exc.strerror}") from exc
        nstype = None  # not a namespace file at all
    finally:
        os.close(fd)
    if nstype != CLONE_NEWNET:
        raise NetnsError(errno.EINVAL, f"{path} is not a network namespace")


def inode(fd_or_path: int | str) -> int:
    return os.stat(fd_or_path).st_ino


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the body with the current thread in the namespace `fd`, then move back.

    Only for threads that own no event loop: while inside, every new socket lands in that netns.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


_home = threading.local()


def _home_fd() -> int:
    """The calling thread's own namespace, opened once per thread (kept for its life)."""
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _home.fd = fd
    return fd


def call_in(fd: int, fn: Callable[[], T]) -> T:
    """Call `fn` with the calling thread in namespace `fd`, then move the thread back.

    Meant for short synchronous work such as creating a socket: nothing else runs on this
    thread meanwhile, so an event loop thread may use it between callbacks. If the thread
    cannot get back to its own namespace, the process exits: every later socket would land
    in the wrong namespace, and carrying on would misroute traffic (fail closed).
    """
    home = _home_fd()
    setns(fd)
    try:
        return fn()
    finally:
        try:
            setns(home)
        except NetnsError as exc:
            sys.stderr.write(f"fatal: cannot return to the thread's own network namespace: {exc}\n")
            sys.stderr.flush()
            os._exit(70)


def run_in(fd: int, fn: Callable[[], T]) -> T:
    """Call `fn` on a short-lived thread inside namespace `fd` and return its result."""
    result: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            setns(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=work, name="netns-call")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class NetnsThread:
    """One long-lived worker thread that lives inside a network namespace.

    The namespace fd is duplicated, so the caller may close its own copy. `close()` stops the
    thread and closes the fd; calls after that raise RuntimeError.
    """

    def __init__(self, fd: int, name: str = "netns") -> None:
        self._fd = os.dup(fd)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=setns, initargs=(self._fd,)
        )

    @property
    def fd(self) -> int:
        return self._fd

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._executor.submit(fn)

    def call(self, fn: Callable[[], T]) -> T:
        return self.submit(fn).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def preexec_enter(fd: int) -> Callable[[], None]:
    """A subprocess `preexec_fn` that moves the child into namespace `fd` before exec."""

    def enter() -> None:
        setns(fd)

    return enter
