"""The client side of the waypoint's HTTP/1.1 engine: an `asyncio.Protocol` that parses requests
with httptools and runs them as `Exchange`s, one at a time and in order.

Keep-alive and pipelining: requests parsed while one is in flight wait in `_exchanges` (their
bodies buffered) and start, in order, when the one before has been answered and fully read.
Reading pauses while more than `MAX_QUEUED` requests or `MAX_BUFFERED` body bytes wait, and
while the upstream connection cannot take more; upstream reading pauses while the client
cannot take more (explicit backpressure both ways).

A malformed request gets 400 and the connection closes: after a framing error nothing that
follows on the connection can be trusted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import typing

import httptools

from meshcore import log
from waypoint import engine as engine_mod
from waypoint import exchange, http1, routing

logger = logging.getLogger("waypoint.http")

MAX_QUEUED = 16
MAX_BUFFERED = 1 << 20
MAX_HEAD_BYTES = 64 * 1024
COALESCE_LIMIT = 16 * 1024  # pieces this small wait for the loop iteration's others


class DownstreamProtocol(asyncio.Protocol):
    def __init__(
        self, engine: engine_mod.Engine, port: int, caller: engine_mod.Caller | None = None
    ) -> None:
        self._engine = engine
        self._port = port  # the service port the client called
        self._caller = caller  # None: learned from the socket in connection_made
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._exchanges: collections.deque[exchange.Exchange] = collections.deque()
        self._parsing: exchange.Exchange | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._paused_for: set[str] = set()
        self.is_closed = False
        self._out: list[bytes] = []
        self._flush_scheduled = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        if self._caller is None:
            self._caller = caller_of(transport, self._port)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(501, "protocol upgrades are not supported by the waypoint")
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")

    def eof_received(self) -> bool | None:
        # The client is done sending; answer what is in flight, then close.
        self.flush()  # what was answered goes out before the transport closes
        if not self._exchanges:
            return None
        for ex in self._exchanges:
            ex.closes_connection = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._set_upstream_reading(False)

    def resume_writing(self) -> None:
        self._set_upstream_reading(True)

    # -- exchange.Downstream --

    def write(self, data: bytes) -> None:
        """Small pieces written in one loop iteration (a response head and its body) go out in
        one write; a large piece goes at once, after what is pending (no copy of bulk data)."""
        if self.transport is None or self.transport.is_closing():
            return
        if len(data) >= COALESCE_LIMIT:
            self.flush()
            self.transport.write(data)
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def set_upstream_paused(self, paused: bool) -> None:
        self._pause("upstream", paused)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        self._count(len(name) + len(value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        length = None
        is_chunked = False
        for name, value in self._headers:
            if name == "content-length":
                length = int(value)  # llhttp has checked it is a number
            elif name == "transfer-encoding" and "chunked" in value.lower():
                is_chunked = True
        expects_continue = any(
            n == "expect" and v.lower() == "100-continue" for n, v in self._headers
        )
        head = http1.RequestHead(
            method=parser.get_method().decode("latin-1"),
            target=self._url.decode("latin-1"),
            version=parser.get_http_version(),
            headers=[(n, v) for n, v in self._headers if n != "expect"],
            keep_alive=parser.should_keep_alive(),
            content_length=length,
            is_chunked=is_chunked,
        )
        assert self._caller is not None  # set in connection_made
        ex = exchange.Exchange(head, Http1Responder(self, head), self._caller.address[0])
        self._parsing = ex
        self._exchanges.append(ex)
        if expects_continue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as Envoy does, not the upstream
        if len(self._exchanges) == 1:
            self._start(ex)
        self._check_buffers()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.request_body(body)
            self._check_buffers()

    def on_message_complete(self) -> None:
        ex, self._parsing = self._parsing, None
        if ex is not None:
            ex.request_end()
            if ex is self._exchanges[0] and self._task is None:
                self._finish(ex)

    # -- running exchanges --

    def _start(self, ex: exchange.Exchange) -> None:
        assert self._caller is not None  # set in connection_made
        plan = build_plan(self._engine, self._caller, ex, self._port)
        self._task = asyncio.get_running_loop().create_task(self._run(ex, plan))

    async def _run(
        self, ex: exchange.Exchange, plan: routing.ForwardPlan | routing.LocalReply
    ) -> None:
        assert self._caller is not None
        try:
            await serve(self._engine, self._caller, ex, plan)
        finally:
            self._task = None
        if ex.is_body_done:
            self._finish(ex)
        # else: the answer went out before the body was read; on_message_complete finishes.

    def _finish(self, ex: exchange.Exchange) -> None:
        """`ex` is answered and its request fully read: go on with the next, or close."""
        self._exchanges.popleft()
        if ex.closes_connection or self.is_closed:
            self._exchanges.clear()
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self._check_buffers()
        if self._exchanges:
            # Its head is parsed; its body may still be arriving, and streams on from here.
            self._start(self._exchanges[0])

    def _fail(self, status: int, reason: str) -> None:
        logger.info("waypoint refused a request", extra=log.fields(status=status, reason=reason))
        if self._task is None:
            self.write(http1.local_response(status, reason, close=True))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # -- backpressure --

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head larger than 64 KiB")

    def check_buffers(self) -> None:
        self._check_buffers()

    def _check_buffers(self) -> None:
        buffered = sum(ex.buffered for ex in self._exchanges)
        self._pause("queue", len(self._exchanges) > MAX_QUEUED or buffered > MAX_BUFFERED)

    def _pause(self, reason: str, paused: bool) -> None:
        before = bool(self._paused_for)
        if paused:
            self._paused_for.add(reason)
        else:
            self._paused_for.discard(reason)
        after = bool(self._paused_for)
        if self.transport is None or before == after:
            return
        if after:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _set_upstream_reading(self, on: bool) -> None:
        current = self._exchanges[0] if self._exchanges else None
        if current is not None:
            current.set_upstream_reading(on)


def _describe_span(ex: exchange.Exchange) -> None:
    assert ex.span is not None
    outcome = ex.outcome
    attributes = ex.span.attributes
    attributes["http.method"] = ex.head.method
    attributes["http.url"] = ex.head.target
    attributes["http.status_code"] = outcome.status
    attributes["response_flags"] = outcome.flag.value if outcome.flag is not None else "-"
    if outcome.endpoint is not None:
        attributes["upstream_address"] = f"{outcome.endpoint[0]}:{outcome.endpoint[1]}"
    ex.span.is_error = outcome.status >= 500 or outcome.status == 0


class Http1Responder:
    """One response's HTTP/1.1 framing on the client connection: the upstream's length when it
    gave one, else chunked (HTTP/1.1 clients) or the connection's close (HTTP/1.0)."""

    def __init__(self, protocol: DownstreamProtocol, head: http1.RequestHead) -> None:
        self._protocol = protocol
        self._version = head.version
        self._chunked = False

    def send_head(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        length: int | None,
        *,
        no_body: bool,
        close: bool,
    ) -> bool:
        framing: list[tuple[str, str]] = []
        if length is not None:
            framing.append(("content-length", str(length)))
        elif not no_body:
            if self._version == "1.1":
                self._chunked = True
                framing.append(("transfer-encoding", "chunked"))
            else:
                close = True  # HTTP/1.0: the close ends the body
        self._protocol.write(http1.encode_response(status, reason, headers, framing, close=close))
        return close

    def send_body(self, data: bytes) -> None:
        self._protocol.write(http1.encode_chunk(data) if self._chunked else data)

    def send_end(self) -> None:
        if self._chunked:
            self._protocol.write(http1.LAST_CHUNK)

    def set_upstream_paused(self, paused: bool) -> None:
        self._protocol.set_upstream_paused(paused)

    def check_buffers(self) -> None:
        self._protocol.check_buffers()


# -- shared by the HTTP/1.1 and HTTP/2 sides ------------------------------------------------


def caller_of(transport: asyncio.BaseTransport, port: int) -> engine_mod.Caller:
    """Who is calling, as far as the socket tells (no tunnel: no identity)."""
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    return engine_mod.Caller(
        address=(peer[0], peer[1]) if isinstance(peer, tuple) else ("", 0),
        destination=(local[0] if isinstance(local, tuple) else "", port),
    )


def build_plan(
    engine: engine_mod.Engine, caller: engine_mod.Caller, ex: exchange.Exchange, port: int
) -> routing.ForwardPlan | routing.LocalReply:
    """Trace, authorize, route: what happens to `ex`, decided before any I/O."""
    engine.trace(ex, caller.service or ex.head.authority, port)
    denial = engine.authorize(caller, ex.head)  # the RBAC filter runs before routing
    if denial is not None:
        return denial
    # The service the tunnel named decides, as in Istio's waypoint; the Host field only when
    # the connection did not come through a tunnel (tests, benchmarks).
    table = engine.tables.find_route_table(caller.service or ex.head.authority, port)
    return routing.build_plan(table, ex.head, port, engine.rolls())


async def serve(
    engine: engine_mod.Engine,
    caller: engine_mod.Caller,
    ex: exchange.Exchange,
    plan: routing.ForwardPlan | routing.LocalReply,
) -> None:
    """Run `ex`, then record it (telemetry, access log, span) however it ended."""
    try:
        await ex.run(plan, engine)
    except asyncio.CancelledError:
        ex.outcome.flag = routing.Flag.DOWNSTREAM_CONNECTION_TERMINATION
        raise
    except Exception:  # one request's bug must not take the listener down
        logger.exception("waypoint exchange failed", extra=log.fields(path=ex.head.target))
        ex.closes_connection = True
    finally:
        ex.outcome.duration_ms = (time.monotonic() - ex.started) * 1000
        if ex.span is not None and engine.tracer is not None:
            _describe_span(ex)
            engine.tracer.finish(ex.span)
        engine.finish(caller, ex.head, ex.outcome)
