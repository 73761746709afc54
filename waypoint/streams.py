"""An `asyncio.Protocol` on top of an HBONE stream, as if the stream were a TCP connection.

`StreamTransport` and `StreamBridge` turn the stream's data, half-close, reset and flow control
into the protocol's `data_received`, `eof_received`, `connection_lost` and `pause_writing`/
`resume_writing`, and the protocol's writes and close into stream data and END_STREAM.
Backpressure is HTTP/2 flow control underneath. Used both ways: the waypoint's HTTP engine on
the tunnels it terminates, and its upstream connections on the tunnels it opens.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshcore.aio import hbone


class StreamTransport(asyncio.Transport):
    """An HBONE stream seen by an `asyncio.Protocol` as its transport."""

    def __init__(self, end: hbone.HboneStreamEnd, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._end = end
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._end.write(bytes(data) if isinstance(data, bytearray) else data)

    def write_eof(self) -> None:
        self._end.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """End our side (END_STREAM); the stream is let go once the peer has ended too."""
        if self._closing:
            return
        self._closing = True
        self._end.write_eof()
        if self._end.remote_ended:
            self._end.close()

    def abort(self) -> None:
        self._closing = True
        self._end.abort()

    def pause_reading(self) -> None:
        self._end.pause_reading()

    def resume_reading(self) -> None:
        self._end.resume_reading()

    def is_reading(self) -> bool:
        return not self._end.reading_paused


class StreamBridge:
    """The stream's callbacks (as a relay would get them) turned into protocol callbacks."""

    def __init__(
        self, end: hbone.HboneStreamEnd, protocol: asyncio.Protocol, extra: dict[str, Any]
    ) -> None:
        self._end = end
        self._protocol = protocol
        self._transport = StreamTransport(end, extra)
        self._transport.set_protocol(protocol)
        self._lost = False

    def start(self) -> None:
        self._protocol.connection_made(self._transport)
        self._end.attach(self, 0)  # hands over anything that arrived before

    def on_data(self, side: int, data: bytes | memoryview) -> None:
        self._protocol.data_received(bytes(data))

    def on_eof(self, side: int) -> None:
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self._transport.close()
        if self._transport.is_closing():
            self._end.close()
            self._connection_lost(None)

    def on_closed(self, side: int, error: str | None) -> None:
        self._end.close()
        self._connection_lost(ConnectionResetError(error) if error else None)

    def on_pause_writing(self, side: int) -> None:
        self._protocol.pause_writing()

    def on_resume_writing(self, side: int) -> None:
        self._protocol.resume_writing()

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)
