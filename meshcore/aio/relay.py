"""Carrying bytes between two ends of a proxied connection, with backpressure both ways.

An *end* is anything bytes can be written to and read from: a TCP transport (`TcpEnd`) or one
HBONE stream. A `Relay` joins two ends: data read on one is written to the other; when an end's
outgoing buffer is full it asks the relay to stop reading the opposite end until it drains
(uvicorn's flow_control pattern). A half-close (EOF) travels across as a half-close, so protocols
that shut down one direction keep working.

Invariants:
- Reading on an end is paused until the relay starts. uvloop may still deliver the first read
  of an accepted connection (it starts reading after `connection_made`, ignoring the pause), so
  whatever arrives early is held and replayed, in order, when the relay attaches.
- `Relay.done` resolves exactly once, after both directions ended or either end failed; by then
  both ends are closed or aborted, and `error` says why if it was not a clean close.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable
from typing import Protocol

# Large buffers amortise per-call overhead (perf-baselines: 256 KiB reads, bigger write buffers).
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10


class Sink(Protocol):
    """What an end reports to: a `Relay`, or anything else that consumes one end (the waypoint
    puts an HTTP engine on an HBONE stream this way)."""

    def on_data(self, side: int, data: bytes | memoryview) -> None: ...
    def on_eof(self, side: int) -> None: ...
    def on_closed(self, side: int, error: str | None) -> None: ...
    def on_pause_writing(self, side: int) -> None: ...
    def on_resume_writing(self, side: int) -> None: ...


class End(Protocol):
    """One side of a relayed connection."""

    def attach(self, relay: Relay, side: int) -> None: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Relay:
    """Joins ends 0 and 1. `received[i]` counts bytes read from end i (then written to 1 - i)."""

    __slots__ = ("_ends", "_eof", "_finished", "done", "error", "received")

    def __init__(self) -> None:
        self._ends: list[End] = []
        self.received = [0, 0]
        self._eof = [False, False]
        self._finished = False
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, a: End, b: End) -> None:
        self._ends = [a, b]
        a.attach(self, 0)
        b.attach(self, 1)
        a.resume_reading()
        b.resume_reading()

    @property
    def is_finished(self) -> bool:
        return self._finished

    # Callbacks from the ends.

    def on_data(self, side: int, data: bytes | memoryview) -> None:
        if self._finished:
            return
        self.received[side] += len(data)
        self._ends[1 - side].write(data)

    def on_eof(self, side: int) -> None:
        if self._finished or self._eof[side]:
            return
        self._eof[side] = True
        self._ends[1 - side].write_eof()
        if all(self._eof):
            self._finish(None, abort=False)

    def on_closed(self, side: int, error: str | None) -> None:
        """End `side` is gone. Without an error after both EOFs this is the normal end."""
        if self._finished:
            return
        if error is None and not self._eof[side]:
            # The peer closed without a half-close first; forward what we have, then close.
            self._eof[side] = True
            self._ends[1 - side].write_eof()
            self._finish(None, abort=False)
            return
        self._finish(error, abort=error is not None)

    def on_pause_writing(self, side: int) -> None:
        """End `side` can't take more: stop reading the end that feeds it."""
        if not self._finished:
            self._ends[1 - side].pause_reading()

    def on_resume_writing(self, side: int) -> None:
        if not self._finished:
            self._ends[1 - side].resume_reading()

    def abort(self, error: str) -> None:
        """Tear the connection down from outside (pod removed, policy now denies it)."""
        if not self._finished:
            self._finish(error, abort=True)

    def _finish(self, error: str | None, *, abort: bool) -> None:
        self._finished = True
        self.error = error
        for end in self._ends:
            if abort:
                end.abort()
            else:
                end.close()
        if not self.done.done():
            self.done.set_result(None)


class TcpEnd(asyncio.Protocol):
    """A TCP connection as a relay end. Reading stays paused until a relay attaches.

    `on_connected` runs once the transport exists; listeners use it to start planning the
    connection they just accepted.
    """

    __slots__ = (
        "_early",
        "_early_eof",
        "_on_connected",
        "_reading_paused",
        "_relay",
        "_side",
        "is_lost",
        "lost_error",
        "transport",
    )

    def __init__(self, on_connected: Callable[[TcpEnd], object] | None = None) -> None:
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self._relay: Relay | None = None
        self._side = 0
        self._reading_paused = True
        self._early: list[bytes] = []
        self._early_eof = False
        self.lost_error: str | None = None
        self.is_lost = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        transport.pause_reading()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.on_data(self._side, data)
        else:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._relay is not None:
            self._relay.on_eof(self._side)
        else:
            self._early_eof = True
        return True  # keep the write half open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        self.lost_error = _describe(exc) if exc is not None else None
        if self._relay is not None:
            self._relay.on_closed(self._side, self.lost_error)

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.on_pause_writing(self._side)

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.on_resume_writing(self._side)

    # End

    def attach(self, relay: Relay, side: int) -> None:
        self._relay = relay
        self._side = side
        early, self._early = self._early, []
        for data in early:
            relay.on_data(side, data)
        if self._early_eof:
            relay.on_eof(side)
        if self.is_lost:
            relay.on_closed(side, self.lost_error or "connection closed before the relay started")

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.is_lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.is_lost:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
