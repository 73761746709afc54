"""HTTP/2 from clients: h2c with prior knowledge, as an application speaks it inside a mesh
tunnel (the tunnel is already mutual TLS). Each request stream runs as its own `Exchange`, all
of them concurrently on one connection; upstream they are HTTP/1.1 as any other request.

Responses go back as HEADERS and DATA under the client's flow control: body bytes the window
does not admit wait in the stream's responder until a WINDOW_UPDATE. Request bodies are
acknowledged (the client's window reopened) as they are handed on.

`SniffingProtocol` is what a listener puts on a connection: the HTTP/2 connection preface in
the first bytes selects this side, anything else the HTTP/1.1 one.
"""

from __future__ import annotations

import asyncio
import logging
import typing

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from meshcore import digits, log
from waypoint import downstream, exchange, http1
from waypoint import engine as engine_mod

logger = logging.getLogger("waypoint.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = 100
_PSEUDO = (":method", ":path", ":authority", ":scheme")


class H2DownstreamProtocol(asyncio.Protocol):
    def __init__(
        self, engine: engine_mod.Engine, port: int, caller: engine_mod.Caller | None = None
    ) -> None:
        self._engine = engine
        self._port = port
        self._caller = caller
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.transport: asyncio.Transport | None = None
        self._streams: dict[int, tuple[exchange.Exchange, H2Responder]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        if self._caller is None:
            self._caller = downstream.caller_of(transport, self._port)
        self.conn.initiate_connection()
        self.conn.update_settings(
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS}
        )
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.info("HTTP/2 client broke the protocol", extra=log.fields(error=str(exc)))
            self.flush()  # h2 queued the GOAWAY
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._handle(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks.values():
            task.cancel()

    def pause_writing(self) -> None:
        for ex, _ in self._streams.values():
            ex.set_upstream_reading(False)

    def resume_writing(self) -> None:
        for ex, _ in self._streams.values():
            ex.set_upstream_reading(True)

    # -- h2 events --

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            found = self._streams.get(event.stream_id)
            if found is not None:
                found[0].request_body(event.data)
            # Reopen the window as the bytes are handed on (the exchange buffers or sends).
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            found = self._streams.get(event.stream_id)
            if found is not None:
                found[0].request_end()
        elif isinstance(event, h2.events.StreamReset):
            task = self._tasks.get(event.stream_id)
            if task is not None:
                task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for _, responder in list(self._streams.values()):
                responder.pump()
        elif isinstance(event, h2.events.ConnectionTerminated) and self.transport is not None:
            self.transport.close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        fields = [(str(n), str(v)) for n, v in event.headers or ()]
        pseudo = {n: v for n, v in fields if n in _PSEUDO}
        headers = [(n.lower(), v) for n, v in fields if not n.startswith(":") and n != "host"]
        length_text = next((v for n, v in headers if n == "content-length"), None)
        length = (
            int(length_text) if length_text is not None and digits.is_digits(length_text) else None
        )
        ended = event.stream_ended is not None
        head = http1.RequestHead(
            method=pseudo.get(":method", "GET"),
            target=pseudo.get(":path", "/"),
            version="2",
            headers=[("host", pseudo.get(":authority", "")), *headers],
            keep_alive=True,
            content_length=length if length is not None else (0 if ended else None),
            is_chunked=length is None and not ended,
        )
        responder = H2Responder(self, sid)
        assert self._caller is not None
        ex = exchange.Exchange(head, responder, self._caller.address[0])
        self._streams[sid] = (ex, responder)
        plan = downstream.build_plan(self._engine, self._caller, ex, self._port)
        task = asyncio.get_running_loop().create_task(
            downstream.serve(self._engine, self._caller, ex, plan)
        )
        self._tasks[sid] = task
        task.add_done_callback(lambda _: self._done(sid))

    def _done(self, sid: int) -> None:
        self._tasks.pop(sid, None)
        found = self._streams.get(sid)
        if found is not None and found[1].is_finished:
            del self._streams[sid]

    # -- for responders --

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def forget(self, sid: int) -> None:
        if sid not in self._tasks:
            self._streams.pop(sid, None)


class H2Responder:
    """One response as HEADERS and DATA on its stream, within the client's flow control."""

    def __init__(self, protocol: H2DownstreamProtocol, sid: int) -> None:
        self._protocol = protocol
        self._conn = protocol.conn
        self._sid = sid
        self._pending: list[bytes] = []
        self._end_requested = False
        self.is_finished = False

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
        fields = [(":status", str(status))]
        fields += [(n, v) for n, v in headers if n not in http1.HOP_BY_HOP and n != "host"]
        if length is not None:
            fields.append(("content-length", str(length)))
        try:
            self._conn.send_headers(self._sid, fields, end_stream=no_body)
        except h2.exceptions.H2Error:
            self.is_finished = True  # the client reset the stream meanwhile
        if no_body:
            self.is_finished = True
        self._protocol.flush()
        return False  # other streams go on: the connection stays

    def send_body(self, data: bytes) -> None:
        if data and not self.is_finished:
            self._pending.append(data)
            self.pump()

    def send_end(self) -> None:
        self._end_requested = True
        self.pump()

    def pump(self) -> None:
        """Send what the windows admit; end the stream once everything has gone."""
        if self.is_finished:
            return
        conn = self._conn
        try:
            while self._pending:
                window = min(
                    conn.local_flow_control_window(self._sid), conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = self._pending[0]
                conn.send_data(self._sid, chunk[:window])
                if len(chunk) > window:
                    self._pending[0] = chunk[window:]
                else:
                    del self._pending[0]
            if not self._pending and self._end_requested:
                conn.end_stream(self._sid)
                self.is_finished = True
                self._protocol.forget(self._sid)
        except h2.exceptions.H2Error:
            self.is_finished = True  # reset by the client: nothing more to send
            self._pending.clear()
        self._protocol.flush()

    def set_upstream_paused(self, paused: bool) -> None:
        pass  # HTTP/2 request bodies are flow-controlled by the windows, not by reading

    def check_buffers(self) -> None:
        pass


class SniffingProtocol(asyncio.Protocol):
    """Picks HTTP/2 (prior knowledge) or HTTP/1.1 from the first bytes, then steps aside."""

    def __init__(
        self, engine: engine_mod.Engine, port: int, caller: engine_mod.Caller | None = None
    ) -> None:
        self._engine = engine
        self._port = port
        self._caller = caller
        self._transport: asyncio.BaseTransport | None = None
        self._buffer = b""
        self._chosen: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._chosen is not None:
            self._chosen.data_received(data)
            return
        self._buffer += data
        if len(self._buffer) < len(PREFACE) and PREFACE.startswith(self._buffer):
            return  # could still be the preface
        chosen: asyncio.Protocol
        if self._buffer.startswith(PREFACE):
            chosen = H2DownstreamProtocol(self._engine, self._port, self._caller)
        else:
            chosen = downstream.DownstreamProtocol(self._engine, self._port, self._caller)
        self._chosen = chosen
        assert self._transport is not None
        chosen.connection_made(self._transport)
        buffered, self._buffer = self._buffer, b""
        chosen.data_received(buffered)

    def eof_received(self) -> bool | None:
        return self._chosen.eof_received() if self._chosen is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._chosen is not None:
            self._chosen.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._chosen is not None:
            self._chosen.pause_writing()

    def resume_writing(self) -> None:
        if self._chosen is not None:
            self._chosen.resume_writing()
