"""Connections from the waypoint to endpoints: HTTP/1.1 keep-alive, pooled per endpoint.

A connection carries one exchange at a time (no pipelining upstream: a failed pipelined request
could not be retried safely). It parses the response with httptools and hands the head, the body
pieces and the end to its `Sink` as they arrive, so bodies stream through, never buffered whole.

Invariants: a connection is in the idle list only between exchanges, with a complete response
read and the server's keep-alive consent; anything else about it (an error, an early close, a
response cut short) closes it instead of returning it.
"""

from __future__ import annotations

import asyncio
import typing
from typing import Protocol

import httptools

from meshcore import digits
from waypoint import http1, origin

# Idle connections kept per endpoint; beyond this they are closed rather than pooled.
MAX_IDLE_PER_ENDPOINT = 64
Endpoint = tuple[str, int]


class Sink(Protocol):
    """The exchange a response belongs to."""

    def on_response_head(self, head: http1.ResponseHead) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_upstream_lost(self, reason: str) -> None: ...

    def on_upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, endpoint: Endpoint) -> None:
        self._pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self._no_body = False  # the request was HEAD: the response has no body
        self._headers: list[tuple[str, str]] = []
        self._reason = ""
        self._status = 0
        self._in_response = False
        self._close_delimited = False
        self.is_reusable = False
        self.requests = 0  # exchanges started on this connection

    # -- driven by the exchange --

    def start(self, sink: Sink, data: bytes, *, no_body: bool) -> None:
        """Send a request head (and whatever body is already at hand) for `sink`."""
        self.sink = sink
        self._no_body = no_body
        self.is_reusable = False
        self.requests += 1
        self.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(f"malformed response from {self.endpoint[0]}:{self.endpoint[1]}: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close: a server that stops sending is done with this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        if self._in_response and self._close_delimited:
            self._in_response = False
            self._finish(reusable=False)  # the body ran until the close
            return
        if self.sink is not None:
            self._lost("upstream connection closed" + (f": {exc}" if exc else ""))

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(True)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = ""
        self._in_response = True

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        length = None
        is_chunked = False
        for name, value in self._headers:
            if name == "content-length" and digits.is_digits(value.strip()):
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                is_chunked = True
        no_body = self._no_body or status in (204, 304) or 100 <= status < 200
        self._close_delimited = not no_body and length is None and not is_chunked
        head = http1.ResponseHead(status, self._reason, self._headers, length, is_chunked)
        if self.sink is not None:
            self.sink.on_response_head(head)
        if self._no_body and status >= 200:
            # httptools cannot be told a response answers HEAD: end the exchange here and
            # start a fresh parser for the next response on this connection.
            self._parser = httptools.HttpResponseParser(self)
            self._in_response = False
            self._finish(reusable=True)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if not self._in_response:
            return
        if 100 <= self._status < 200:
            return  # an interim response: the final one follows
        self._in_response = False
        self._finish(reusable=self._parser.should_keep_alive())

    # -- internals --

    def _finish(self, *, reusable: bool) -> None:
        sink, self.sink = self.sink, None
        self.is_reusable = reusable
        if sink is not None:
            sink.on_response_end()

    def _lost(self, reason: str) -> None:
        sink, self.sink = self.sink, None
        self.is_reusable = False
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_upstream_lost(reason)


class UpstreamPool:
    """Idle keep-alive connections per endpoint; new ones are opened on demand."""

    def __init__(
        self, connect_timeout: float = 10.0, connector: origin.Connector | None = None
    ) -> None:
        self._idle: dict[Endpoint, list[UpstreamConnection]] = {}
        self._connect_timeout = connect_timeout
        self._connector = connector if connector is not None else origin.TcpConnector()
        self.opened = 0  # connections ever opened (tests look at reuse)

    async def fetch(self, endpoint: Endpoint, timeout: float | None = None) -> UpstreamConnection:
        idle = self._idle.get(endpoint)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        async with asyncio.timeout(timeout if timeout is not None else self._connect_timeout):
            proto = await self._connector.connect(
                endpoint, lambda: UpstreamConnection(self, endpoint)
            )
        self.opened += 1
        assert isinstance(proto, UpstreamConnection)
        return proto

    def release(self, conn: UpstreamConnection, max_requests: int = 0) -> None:
        """Back to the pool after a complete exchange, or closed if it cannot be reused (or has
        served `max_requests`, when that is not 0)."""
        idle = self._idle.setdefault(conn.endpoint, [])
        transport = conn.transport
        is_open = transport is not None and not transport.is_closing()
        worn = max_requests > 0 and conn.requests >= max_requests
        if conn.is_reusable and is_open and not worn and len(idle) < MAX_IDLE_PER_ENDPOINT:
            conn.sink = None
            idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.endpoint)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
