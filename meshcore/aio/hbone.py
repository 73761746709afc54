"""HBONE connections on asyncio: the sans-I/O codec (meshcore.wire.hbone) driven by a Protocol.
Shared by ztunnel (node to node) and the waypoint (terminating and re-originating tunnels).

One TLS connection carries many CONNECT streams; each stream is a relay end (`HboneStreamEnd`)
joined to a plain TCP connection. Backpressure uses HTTP/2 flow control:
- sending: when the stream or connection window is closed, bytes wait in the stream's `pending`
  queue and the relay stops reading the TCP side until a WINDOW_UPDATE drains it;
- receiving: bytes are acknowledged (window reopened) only once handed to the TCP side and only
  while that side is not paused, so a slow reader throttles the remote sender.
A full TLS write buffer pauses every stream's feeding side.

Invariants: codec calls never raise out of a callback; a stream is in `streams` from the moment
it is opened or requested until both directions ended or it was reset; data that arrives before
a relay attaches is held (and not acknowledged) until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import typing
from collections.abc import Callable, Collection, Sequence

from meshcore import log
from meshcore.aio import relay
from meshcore.identity import certs, spiffe, tls
from meshcore.wire import hbone

logger = logging.getLogger("hbone")

CANCEL = 0x8
# Flood limits, as Envoy has them: PING/SETTINGS ACKs a peer may make us queue while it does
# not read what we send; and once a connection has carried this many streams, the peer may not
# have reset half of them before we answered (Envoy's premature_reset_total_stream_count).
MAX_UNREAD_ACKS = 1000
PREMATURE_RESET_MIN_STREAMS = 500
# Response flags (ztunnel's words, also the access log's) for tunnels that failed here.
FLAG_CONNECT = "CONNECT"
FLAG_TLS_FAILURE = "TLS_FAILURE"
FLAG_IDENTITY_ERROR = "IDENTITY_ERROR"
Headers = tuple[tuple[str, str], ...]


class HboneConnectError(Exception):
    """Opening an HBONE connection or tunnel failed; `flag` is the Istio response flag."""

    def __init__(self, message: str, flag: str, status: int | None = None) -> None:
        super().__init__(message)
        self.flag = flag
        self.status = status


class HboneStreamEnd:
    """One CONNECT stream as a relay end."""

    # Slotted: one per proxied connection on each side, 10,000 of them in the memory benchmark.
    __slots__ = (
        "conn",
        "eof_pending",
        "finished",
        "inbox",
        "inbox_eof",
        "inbox_error",
        "local_ended",
        "pending",
        "reading_paused",
        "relay",
        "remote_ended",
        "response",
        "side",
        "stream_id",
        "unacked",
    )

    def __init__(self, conn: HboneProtocol, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.relay: relay.Sink | None = None
        self.side = 0
        # A list, not a deque: it is almost always empty, and an empty deque is 600 bytes.
        self.pending: list[memoryview] = []
        self.eof_pending = False
        self.reading_paused = False
        self.unacked = 0
        self.local_ended = False
        self.remote_ended = False
        self.finished = False
        # Held until a relay attaches.
        self.inbox: list[tuple[bytes | memoryview, int]] = []
        self.inbox_eof = False
        self.inbox_error: str | None = None
        # Client streams: resolved with (status, headers) when the CONNECT response arrives.
        self.response: asyncio.Future[tuple[int, Headers]] | None = None

    # relay.End

    def attach(self, r: relay.Sink, side: int) -> None:
        self.relay = r
        self.side = side
        for data, length in self.inbox:
            r.on_data(side, data)
            self._ack(length)
        self.inbox.clear()
        if self.inbox_error is not None:
            r.on_closed(side, self.inbox_error)
        elif self.inbox_eof:
            r.on_eof(side)
        self.conn.flush()

    def write(self, data: bytes | memoryview) -> None:
        if self.finished or self.local_ended:
            return
        if self.pending:
            self.pending.append(memoryview(data))
            return
        taken = self.conn.send_data(self.stream_id, data)
        if taken < len(data):
            self.pending.append(memoryview(data)[taken:])
            if self.relay is not None:
                self.relay.on_pause_writing(self.side)
        self.conn.flush()

    def write_eof(self) -> None:
        if self.finished or self.local_ended:
            return
        if self.pending:
            self.eof_pending = True
            return
        self._end_local()

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self.unacked:
            length, self.unacked = self.unacked, 0
            self.conn.consumed(self.stream_id, length)
            self.conn.flush()

    def close(self) -> None:
        """Both directions are done (or the relay gave up cleanly): forget the stream."""
        if not self.finished:
            if not (self.local_ended and self.remote_ended):
                self.conn.reset_stream(self.stream_id, CANCEL)
            self.conn.forget(self)

    def abort(self) -> None:
        if not self.finished:
            self.conn.reset_stream(self.stream_id, CANCEL)
            self.conn.forget(self)

    # Driven by the connection.

    def drain(self) -> None:
        """The send window may have grown: push pending bytes."""
        while self.pending:
            chunk = self.pending[0]
            taken = self.conn.send_data(self.stream_id, chunk)
            if taken < len(chunk):
                self.pending[0] = chunk[taken:]
                return
            del self.pending[0]
        if self.eof_pending:
            self.eof_pending = False
            self._end_local()
        if self.relay is not None:
            self.relay.on_resume_writing(self.side)

    def deliver(self, data: bytes | memoryview, length: int) -> None:
        if self.relay is None:
            self.inbox.append((data, length))
            return
        self.relay.on_data(self.side, data)
        self._ack(length)

    def _ack(self, length: int) -> None:
        # The TCP side may have paused us while we wrote into it just now.
        if self.reading_paused:
            self.unacked += length
        else:
            self.conn.consumed(self.stream_id, length)

    def remote_eof(self) -> None:
        self.remote_ended = True
        if self.relay is None:
            self.inbox_eof = True
        else:
            self.relay.on_eof(self.side)

    def fail(self, error: str) -> None:
        self.finished = True
        if self.response is not None and not self.response.done():
            self.response.set_exception(HboneConnectError(error, FLAG_CONNECT))
        if self.relay is None:
            self.inbox_error = error
        else:
            self.relay.on_closed(self.side, error)

    def _end_local(self) -> None:
        self.local_ended = True
        self.conn.end_stream(self.stream_id)
        self.conn.flush()


class HboneProtocol(asyncio.Protocol):
    """Shared by both roles: drives the codec and routes events to stream ends."""

    def __init__(self, codec: hbone.HboneConnection) -> None:
        self.codec = codec
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStreamEnd] = {}
        # Kept: asyncio.get_running_loop() costs a getpid(2) per call, several per connection.
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str | None] = self.loop.create_future()
        self.is_lost = False
        self.goaway_received = False
        self.peer_identity: spiffe.SpiffeId | None = None
        self.peer_address: tuple[str, int] | None = None
        self._write_paused = False
        self._acks_at_pause = 0
        # Why a flood limit closed the connection (the rest of the input is then ignored).
        self.flood_refusal: str | None = None

    # Codec wrappers: a misuse of a stream that is already gone must not escape a callback.

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        try:
            return self.codec.send_data(stream_id, data)
        except hbone.HboneError:
            return len(data)  # the stream is gone: drop the bytes, the relay ends soon

    def end_stream(self, stream_id: int) -> None:
        try:
            self.codec.end_stream(stream_id)
        except hbone.HboneError:
            pass
        self._maybe_forget(stream_id)

    def reset_stream(self, stream_id: int, code: int) -> None:
        try:
            self.codec.reset_stream(stream_id, code)
        except hbone.HboneError:
            pass
        self.flush()

    def consumed(self, stream_id: int, length: int) -> None:
        try:
            self.codec.consumed(stream_id, length)
        except hbone.HboneError:
            pass

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def forget(self, stream: HboneStreamEnd) -> None:
        stream.finished = True
        self.streams.pop(stream.stream_id, None)
        self.on_stream_count_changed()

    def _maybe_forget(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.local_ended and stream.remote_ended:
            self.forget(stream)

    def on_stream_count_changed(self) -> None:
        """Hook for the pool (idle tracking) and for the server's accounting."""

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except hbone.RemoteProtocolError as exc:
            logger.warning(
                "HBONE peer protocol error",
                extra=log.fields(peer=str(self.peer_address), error=str(exc)),
            )
            self.flush()
            self._fail_all(f"HBONE protocol error: {exc}")
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if self.flood_refusal is not None:
                return
            self.handle_event(event)
        if self.flood_refusal is not None:
            return
        if self._write_paused and self.codec.acks_queued - self._acks_at_pause > MAX_UNREAD_ACKS:
            self._calm_down("PING/SETTINGS flood from a peer that does not read what we send")
            return
        self.flush()

    def _calm_down(self, why: str) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) and close: the peer abuses the connection (as Envoy's
        flood protections do). Its streams fail; its ztunnel reconnects if it is a real one."""
        self.flood_refusal = why
        logger.warning("HBONE peer refused", extra=log.fields(peer=str(self.peer_address), why=why))
        with contextlib.suppress(hbone.HboneError):
            self.codec.close(hbone.ENHANCE_YOUR_CALM)
        self.flush()
        self._fail_all(f"HBONE connection closed: {why}")
        if self.transport is not None:
            if self._write_paused:
                self.transport.abort()  # a peer that does not read would never let it drain
            else:
                self.transport.close()

    def handle_event(self, event: hbone.Event) -> None:
        if isinstance(event, hbone.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.consumed(event.stream_id, event.flow_controlled_length)
            else:
                stream.deliver(event.data, event.flow_controlled_length)
        elif isinstance(event, hbone.WindowOpened):
            targets = (
                list(self.streams.values())
                if event.stream_id is None
                else [s for s in (self.streams.get(event.stream_id),) if s is not None]
            )
            for stream in targets:
                if stream.pending or stream.eof_pending:
                    stream.drain()
        elif isinstance(event, hbone.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_eof()
                self._maybe_forget(event.stream_id)
        elif isinstance(event, hbone.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                who = "peer" if event.remote else "us"
                stream.fail(f"stream reset by {who} (HTTP/2 error {event.error_code})")
                self.on_stream_count_changed()
        elif isinstance(event, hbone.ConnectionTerminated):
            self.goaway_received = True
            for sid in [s for s in self.streams if s > event.last_stream_id]:
                self.streams.pop(sid).fail("connection going away (GOAWAY)")
            self.on_stream_count_changed()
        else:
            self.handle_role_event(event)

    def handle_role_event(self, event: hbone.Event) -> None:
        """Events only one role cares about (requests on the server, responses on the client)."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        reason = f"HBONE connection lost: {exc}" if exc else "HBONE connection closed"
        self._fail_all(reason)
        if not self.closed.done():
            self.closed.set_result(str(exc) if exc else None)

    def _fail_all(self, reason: str) -> None:
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream.fail(reason)
        self.on_stream_count_changed()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._acks_at_pause = self.codec.acks_queued
        for stream in list(self.streams.values()):
            if stream.relay is not None:
                stream.relay.on_pause_writing(stream.side)

    def resume_writing(self) -> None:
        self._write_paused = False
        for stream in list(self.streams.values()):
            if stream.relay is not None and not stream.pending:
                stream.relay.on_resume_writing(stream.side)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.codec.close()
            except hbone.HboneError:
                pass
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HboneClientProtocol(HboneProtocol):
    """Our side of a pooled HBONE connection to a remote ztunnel."""

    def __init__(self, settings: hbone.HboneSettings | None = None) -> None:
        super().__init__(hbone.HboneConnection(client_side=True, settings=settings))
        self.idle_since: float = self.loop.time()
        self.on_idle: Callable[[HboneClientProtocol], None] | None = None
        self.pings_acknowledged = 0
        self.keepalive_failure: str | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._ping_opaque = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=relay.WRITE_HIGH_WATER, low=relay.WRITE_LOW_WATER)
        self.peer_address = transport.get_extra_info("peername")
        self.codec.initiate()
        self.flush()

    @property
    def is_usable(self) -> bool:
        return (
            not self.is_lost
            and not self.goaway_received
            and self.transport is not None
            and not self.transport.is_closing()
            and self.codec.can_open_tunnel()
        )

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]]) -> HboneStreamEnd:
        stream_id = self.codec.open_tunnel(authority, headers)
        stream = HboneStreamEnd(self, stream_id)
        stream.response = self.loop.create_future()
        self.streams[stream_id] = stream
        self.flush()
        return stream

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """PING the peer every `interval`; abort when an ACK is `timeout` overdue."""
        loop = self.loop

        def tick() -> None:
            self._keepalive = None
            if self.is_lost or self.transport is None or self.transport.is_closing():
                return
            now = loop.time()
            if self._ping_sent_at is not None:
                if now - self._ping_sent_at >= timeout:
                    logger.warning(
                        "HBONE keepalive timed out; closing the connection",
                        extra=log.fields(peer=str(self.peer_address), timeout=timeout),
                    )
                    self.keepalive_failure = f"HBONE keepalive: no PING ACK within {timeout:g}s"
                    self._fail_all(self.keepalive_failure)
                    self.transport.abort()
                    return
            else:
                self._ping_opaque = (self._ping_opaque + 1) & 0xFFFFFFFFFFFFFFFF
                try:
                    self.codec.ping(self._ping_opaque.to_bytes(8, "big"))
                except hbone.HboneError:
                    return  # the connection is shutting down
                self._ping_sent_at = now
                self.flush()
            wait = interval if self._ping_sent_at is None else min(interval, timeout)
            self._keepalive = loop.call_later(wait, tick)

        self._keepalive = loop.call_later(interval, tick)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        super().connection_lost(exc)

    def handle_role_event(self, event: hbone.Event) -> None:
        if isinstance(event, hbone.PingAcknowledged):
            self._ping_sent_at = None
            self.pings_acknowledged += 1
            return
        if isinstance(event, hbone.TunnelEstablished | hbone.TunnelRejected):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.response is None or stream.response.done():
                return
            status = 200 if isinstance(event, hbone.TunnelEstablished) else event.status
            stream.response.set_result((status, event.headers))
            if isinstance(event, hbone.TunnelRejected):
                if stream.relay is not None:
                    # Relayed before the answer (optimistic data): the refusal ends the relay.
                    stream.fail(f"HBONE CONNECT refused with {status}")
                # The server ended the stream with its error response.
                stream.remote_ended = True
                stream.local_ended = True
                self.end_stream(event.stream_id)

    def on_stream_count_changed(self) -> None:
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.on_idle is not None:
                self.on_idle(self)


RequestHandler = Callable[["HboneServerProtocol", hbone.TunnelRequested], None]


class HboneServerProtocol(HboneProtocol):
    """An inbound HBONE connection on a pod's port 15008, created by `accept` once TLS is up.

    The peer is checked (ALPN h2, a certificate of our trust domain) in `connection_made`,
    before a single HTTP/2 byte is parsed; a peer that fails is aborted and `refusal` says why.
    """

    def __init__(
        self,
        trust_domain: str,
        on_request: RequestHandler,
        settings: hbone.HboneSettings | None = None,
    ) -> None:
        super().__init__(
            hbone.HboneConnection(
                client_side=False,
                settings=settings or hbone.HboneSettings.server(),
            )
        )
        self._trust_domain = trust_domain
        self._on_request = on_request
        self.refusal: HboneConnectError | None = None
        self.requests = 0  # CONNECTs the peer opened on this connection
        self.premature_resets = 0  # ... of which it reset before we answered
        self._unanswered: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        self.peer_address = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=relay.WRITE_HIGH_WATER, low=relay.WRITE_LOW_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if not tls.alpn_ok(ssl_object):
                raise HboneConnectError("peer did not negotiate ALPN h2", FLAG_TLS_FAILURE)
            self.peer_identity = tls.check_peer_trust_domain(ssl_object, self._trust_domain)
        except HboneConnectError as exc:
            self.refusal = exc
        except certs.IdentityError as exc:
            self.refusal = HboneConnectError(str(exc), FLAG_IDENTITY_ERROR)
        if self.refusal is not None:
            transport.abort()
            return
        self.codec.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.refusal is None:
            super().data_received(data)

    def handle_role_event(self, event: hbone.Event) -> None:
        if isinstance(event, hbone.TunnelRequested):
            self.requests += 1
            self._unanswered.add(event.stream_id)
            self.streams[event.stream_id] = HboneStreamEnd(self, event.stream_id)
            self._on_request(self, event)

    def handle_event(self, event: hbone.Event) -> None:
        super().handle_event(event)
        if not isinstance(event, hbone.StreamReset) or event.stream_id not in self._unanswered:
            return
        self._unanswered.discard(event.stream_id)
        if not event.remote:
            return
        self.premature_resets += 1
        # Rapid reset (CVE-2023-44487): each CONNECT starts work here (a connect to the app);
        # cancelling it at once and opening the next keeps that going past the stream limit.
        if (
            self.requests >= PREMATURE_RESET_MIN_STREAMS
            and self.premature_resets * 2 >= self.requests
        ):
            self._calm_down(
                f"{self.premature_resets} of {self.requests} streams reset by the peer before"
                " they were answered"
            )

    def accept(self, stream_id: int) -> HboneStreamEnd | None:
        self._unanswered.discard(stream_id)
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        try:
            self.codec.accept_tunnel(stream_id)
        except hbone.HboneError:
            return None
        self.flush()
        return stream

    def reject(self, stream_id: int, status: int) -> None:
        self._unanswered.discard(stream_id)
        stream = self.streams.pop(stream_id, None)
        try:
            self.codec.reject_tunnel(stream_id, status)
        except hbone.HboneError:
            pass
        if stream is not None:
            stream.finished = True
        self.flush()


async def connect(
    sock: socket.socket,
    *,
    context: ssl.SSLContext,
    expected: Collection[spiffe.SpiffeId],
    timeout: float,
    settings: hbone.HboneSettings | None = None,
    keepalive: tuple[float, float] | None = None,
) -> HboneClientProtocol:
    """TLS + HTTP/2 over an already connected socket; checks the server's SPIFFE identity.

    `keepalive` is (interval, timeout) for HTTP/2 PINGs on the connection, None for none."""
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_connection(
            lambda: HboneClientProtocol(settings),
            sock=sock,
            ssl=context,
            server_hostname="",  # HBONE clients send no SNI
            ssl_handshake_timeout=timeout,
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        raise HboneConnectError(f"TLS handshake failed: {exc}", FLAG_TLS_FAILURE) from exc
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        if not tls.alpn_ok(ssl_object):
            raise HboneConnectError("server did not negotiate ALPN h2", FLAG_TLS_FAILURE)
        proto.peer_identity = tls.check_server_identity(ssl_object, expected)
        if keepalive is not None:
            proto.start_keepalive(*keepalive)
    except HboneConnectError:
        transport.abort()
        raise
    except certs.IdentityError as exc:
        transport.abort()
        raise HboneConnectError(str(exc), FLAG_IDENTITY_ERROR) from exc
    return proto


async def accept(
    sock: socket.socket,
    *,
    context: ssl.SSLContext,
    trust_domain: str,
    on_request: RequestHandler,
    timeout: float,
    settings: hbone.HboneSettings | None = None,
) -> HboneServerProtocol:
    """TLS + HTTP/2 over a freshly accepted socket; raises `HboneConnectError` on a bad peer.

    The socket is handed to TLS before anything reads from it: accepting as plain TCP and
    upgrading later loses a ClientHello that arrives before the upgrade (uvloop starts reading
    an accepted connection even when `connection_made` pauses it).
    """
    loop = asyncio.get_running_loop()
    # Keep our own reference: with ssl=, uvloop returns its internal SSLProtocol instead.
    proto = HboneServerProtocol(trust_domain, on_request, settings)
    try:
        await loop.connect_accepted_socket(
            lambda: proto,
            sock,
            ssl=context,
            ssl_handshake_timeout=timeout,
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        sock.close()
        raise HboneConnectError(
            f"TLS handshake failed: {str(exc) or type(exc).__name__}", FLAG_TLS_FAILURE
        ) from exc
    except BaseException:
        sock.close()
        raise
    if proto.refusal is not None:
        raise proto.refusal
    return proto
