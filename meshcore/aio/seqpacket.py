"""asyncio over AF_UNIX SOCK_SEQPACKET sockets with SCM_RIGHTS (the ZDS transport).

asyncio has no transport for SEQPACKET, and uvloop's `sock_recv` family has no `recvmsg`, so this
module drives non-blocking sockets itself with `loop.add_reader` / `loop.add_writer`, which both
loops implement.

Ownership of file descriptors:
- `SeqpacketChannel.recv()` returns fds that the caller owns and must close. Fds that arrive with
  a datagram `recv()` rejects (truncated) are closed here, never leaked.
- `SeqpacketChannel.send()` only borrows the fds it is given: the kernel duplicates them into the
  message, and the caller still closes its own copies.
- Received fds are close-on-exec (MSG_CMSG_CLOEXEC), so they never leak into subprocesses.

A zero-length datagram is indistinguishable from end-of-stream on SEQPACKET; both are reported as
`ChannelClosedError`. No ZDS message encodes to zero bytes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Sequence

from meshcore import errors

_INT_SIZE = array.array("i").itemsize


class SeqpacketError(errors.MeshError):
    """Root of the errors raised by this module."""


class ChannelClosedError(SeqpacketError):
    """The peer closed (or reset) the connection, or the channel was closed locally."""


class TruncatedMessageError(SeqpacketError):
    """A datagram or its control data did not fit the receive buffers (MSG_TRUNC/MSG_CTRUNC)."""


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds the caller does not want (errors ignored: they are ours to drop)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % _INT_SIZE])
            fds.extend(received)
    return fds


class _Waiter:
    """Waits for one fd to become readable or writable; `cancel()` wakes it with an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
        self._loop = loop
        self._fd = fd
        self._writable = writable
        self.future: asyncio.Future[None] = loop.create_future()

    def _ready(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def register(self) -> None:
        if self._writable:
            self._loop.add_writer(self._fd, self._ready)
        else:
            self._loop.add_reader(self._fd, self._ready)

    def unregister(self) -> None:
        if self._writable:
            self._loop.remove_writer(self._fd)
        else:
            self._loop.remove_reader(self._fd)


class _Pollable:
    """A non-blocking socket plus the bookkeeping to wait on it and close it safely."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._waiters: set[_Waiter] = set()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    async def _wait(self, *, writable: bool) -> None:
        if self._closed:
            raise ChannelClosedError("socket closed locally")
        waiter = _Waiter(asyncio.get_running_loop(), self._sock.fileno(), writable)
        waiter.register()
        self._waiters.add(waiter)
        try:
            await waiter.future
        finally:
            # close() unregisters before closing the fd; never touch a number that may since
            # belong to another socket.
            if waiter in self._waiters:
                self._waiters.discard(waiter)
                waiter.unregister()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            waiter.unregister()
            if not waiter.future.done():
                waiter.future.set_exception(ChannelClosedError("socket closed locally"))
        self._waiters.clear()
        self._sock.close()


class SeqpacketChannel(_Pollable):
    """One connected SEQPACKET socket: whole datagrams in and out, with optional fds.

    One task may `recv()` while another `send()`s; two concurrent receivers (or senders) are not
    supported. `close()` wakes any waiting task with ChannelClosedError.
    """

    def __init__(self, sock: socket.socket, *, max_size: int = 1024, max_fds: int = 1) -> None:
        super().__init__(sock)
        self._max_size = max_size
        self._max_fds = max_fds

    async def recv(self) -> tuple[bytes, list[int]]:
        """The next datagram and the fds that came with it (the caller owns and closes them)."""
        while True:
            if self._closed:
                raise ChannelClosedError("socket closed locally")
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    self._max_size,
                    socket.CMSG_SPACE(self._max_fds * _INT_SIZE),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except ConnectionError as exc:
                raise ChannelClosedError(f"connection lost: {exc}") from exc
            break
        fds = _fds_from(ancdata)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            what = "datagram" if flags & socket.MSG_TRUNC else "control data (too many fds)"
            raise TruncatedMessageError(
                f"{what} truncated: limits are {self._max_size} bytes and {self._max_fds} fd(s)"
            )
        if not data and not fds:
            raise ChannelClosedError("peer closed the connection")
        return data, fds

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one datagram; `fds` are duplicated into it (the caller keeps ownership)."""
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        while True:
            if self._closed:
                raise ChannelClosedError("socket closed locally")
            try:
                self._sock.sendmsg([data], ancdata if fds else [], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            except ConnectionError as exc:
                raise ChannelClosedError(f"connection lost: {exc}") from exc
            return


async def connect(path: str, *, max_size: int = 1024, max_fds: int = 1) -> SeqpacketChannel:
    """Connect to a SEQPACKET listener at `path`.

    Raises OSError (FileNotFoundError, ConnectionRefusedError, ...) when nobody listens, and
    SeqpacketError when the listener's backlog is full (AF_UNIX reports that as EAGAIN, and
    there is nothing to wait for: retry later).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError as exc:
            raise SeqpacketError(f"listener at {path} has a full backlog") from exc
    except BaseException:
        sock.close()
        raise
    return SeqpacketChannel(sock, max_size=max_size, max_fds=max_fds)


class Listener(_Pollable):
    """A SEQPACKET listening socket on a filesystem path, mode 0600 (root-only, like ZDS needs)."""

    def __init__(
        self, sock: socket.socket, path: str, *, max_size: int = 1024, max_fds: int = 1
    ) -> None:
        super().__init__(sock)
        self.path = path
        self._inode = os.stat(path).st_ino
        self._max_size = max_size
        self._max_fds = max_fds

    @classmethod
    def bind(
        cls, path: str, *, backlog: int = 16, max_size: int = 1024, max_fds: int = 1
    ) -> Listener:
        """Listen on `path`, replacing a stale socket file left by an earlier run.

        Refuses to replace anything that is not a socket.
        """
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise SeqpacketError(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # Linux creates the socket file with the socket inode's mode, so there is no window
            # in which the path is reachable with the umask's (wider) permissions.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return cls(sock, path, max_size=max_size, max_fds=max_fds)

    async def accept(self) -> SeqpacketChannel:
        while True:
            if self._closed:
                raise ChannelClosedError("listener closed")
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except ConnectionAbortedError:
                continue
            conn.set_inheritable(False)
            return SeqpacketChannel(conn, max_size=self._max_size, max_fds=self._max_fds)

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self._closed:
            return
        super().close()
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
