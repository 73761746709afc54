"""Receiving every HTTP/2 frame but DATA and WINDOW_UPDATE: SETTINGS, PING, GOAWAY, RST_STREAM,
PRIORITY and header blocks (HEADERS and CONTINUATION, the CONNECT requests and responses).

A mixin of `meshcore.wire.hbone.HboneConnection`, whose state its methods read and change
(typed through the `_Codec` protocol); the connection's frame reader calls them with whole
frames whose header it has already checked (size, stream 0, order).
"""

from __future__ import annotations

from typing import Protocol

from meshcore.wire import hbone_events as ev
from meshcore.wire import hbone_frames as frames
from meshcore.wire import hbone_headers, hbone_hpack
from meshcore.wire import hbone_state as _s

Events = list[ev.Event]


class _Codec(Protocol):
    """The `HboneConnection` state and helpers these handlers use."""

    _client: bool
    _settings: _s.HboneSettings
    _streams: dict[int, _s.StreamState]
    _open: int
    _out: list[bytes]
    acks_queued: int
    _goaway_sent: int | None
    _goaway_received: int | None
    _last_processed: int
    _highest_in: int
    _reset_by_us: dict[int, None]
    _settings_seen: bool
    _peer_max_frame: int
    _peer_initial_window: int
    _peer_max_streams: int
    _decoder: hbone_hpack.BlockDecoder
    _block: tuple[int, bool, list[bytes]] | None
    _block_size: int

    def _connection_error(self, code: int, message: str) -> hbone_headers.RemoteProtocolError: ...
    def _stream_error(self, stream_id: int, code: int, events: Events) -> None: ...
    def _send_reset(self, stream_id: int, code: int) -> None: ...
    def _discard(self, stream_id: int, reset_code: int | None) -> None: ...
    def _die(self) -> None: ...
    def _is_outbound(self, stream_id: int) -> bool: ...
    def _is_idle(self, stream_id: int) -> bool: ...
    def _new_stream(self) -> _s.StreamState: ...
    def _end_remote(self, stream_id: int, events: Events) -> None: ...
    def _on_header_block(
        self, stream_id: int, end_stream: bool, block: bytes, events: Events
    ) -> None: ...
    def _on_request(
        self, stream_id: int, end_stream: bool, fields: hbone_hpack.RawHeaders, events: Events
    ) -> None: ...
    def _on_response(
        self,
        stream_id: int,
        stream: _s.StreamState,
        end_stream: bool,
        fields: hbone_hpack.RawHeaders,
        events: Events,
    ) -> None: ...
    def _closed_stream_frame(
        self, stream_id: int, stream: _s.StreamState | None, events: Events
    ) -> None: ...


class ControlFrames:
    """Handlers named `_on_<frame>`, one per frame type the reader hands over whole."""

    # Declared here as well as in HboneConnection.__init__, so that both agree on the types.
    _goaway_received: int | None
    _block: tuple[int, bool, list[bytes]] | None

    def _on_settings(
        self: _Codec, stream_id: int, flags: int, payload: bytes, events: Events
    ) -> None:
        if stream_id:
            raise self._connection_error(_s.PROTOCOL_ERROR, f"SETTINGS frame on stream {stream_id}")
        if flags & frames.ACK:
            if not self._settings_seen:
                raise self._connection_error(_s.PROTOCOL_ERROR, "SETTINGS ACK before SETTINGS")
            return  # ours are in force; we honoured them from the start
        self._settings_seen = True
        max_streams: int | None = None
        window_delta = 0
        for code, value in frames.parse_settings(payload):
            if (
                code == frames.SETTINGS_ENABLE_PUSH
                or code == frames.SETTINGS_ENABLE_CONNECT_PROTOCOL
            ):
                if value > 1:
                    raise self._connection_error(
                        _s.PROTOCOL_ERROR, f"SETTINGS parameter {code} is {value}, not 0 or 1"
                    )
            elif code == frames.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > _s.MAX_WINDOW:
                    raise self._connection_error(
                        _s.FLOW_CONTROL_ERROR,
                        f"SETTINGS_INITIAL_WINDOW_SIZE {value} is over 2**31-1",
                    )
                window_delta += value - self._peer_initial_window
                self._peer_initial_window = value
            elif code == frames.SETTINGS_MAX_FRAME_SIZE:
                if not _s.DEFAULT_MAX_FRAME_SIZE <= value <= _s.MAX_FRAME_SIZE:
                    raise self._connection_error(
                        _s.PROTOCOL_ERROR,
                        f"SETTINGS_MAX_FRAME_SIZE {value} is outside 2**14..2**24-1",
                    )
                self._peer_max_frame = value
            elif code == frames.SETTINGS_MAX_CONCURRENT_STREAMS:
                max_streams = self._peer_max_streams = value
            # HEADER_TABLE_SIZE needs nothing: our encoder never uses the dynamic table.
            # MAX_HEADER_LIST_SIZE is advisory, and our blocks are small.
        self._out.append(frames.build_settings_ack())
        self.acks_queued += 1
        events.append(ev.RemoteSettingsChanged(max_streams))
        if window_delta:
            # Every stream's send window moves by the difference (RFC 9113 section 6.9.2).
            for stream in self._streams.values():
                stream.send_window += window_delta
                if stream.send_window > _s.MAX_WINDOW:
                    raise self._connection_error(
                        _s.FLOW_CONTROL_ERROR,
                        f"SETTINGS_INITIAL_WINDOW_SIZE {self._peer_initial_window} overflows the "
                        "send window of a stream",
                    )
            if window_delta > 0:
                events.append(ev.WindowOpened(None))

    def _on_ping(self: _Codec, stream_id: int, flags: int, payload: bytes, events: Events) -> None:
        if stream_id:
            raise self._connection_error(_s.PROTOCOL_ERROR, f"PING frame on stream {stream_id}")
        if flags & frames.ACK:
            events.append(ev.PingAcknowledged(payload))
        else:
            self._out.append(frames.build_ping(payload, ack=True))
            self.acks_queued += 1

    def _on_goaway(self: _Codec, stream_id: int, payload: bytes, events: Events) -> None:
        if stream_id:
            raise self._connection_error(_s.PROTOCOL_ERROR, f"GOAWAY frame on stream {stream_id}")
        last, code, debug = frames.parse_goaway(payload)
        events.append(ev.ConnectionTerminated(code, last, debug))
        if code != _s.NO_ERROR:
            self._die()
            return
        if self._goaway_received is None or last < self._goaway_received:
            self._goaway_received = last
        # Our streams above the peer's last-stream-id were never processed: refused, retryable.
        refused = [sid for sid in self._streams if self._is_outbound(sid) and sid > last]
        for sid in sorted(refused):
            self._discard(sid, reset_code=_s.CANCEL)
            events.append(ev.StreamReset(sid, _s.REFUSED_STREAM, remote=True))

    def _on_rst_stream(self: _Codec, stream_id: int, payload: bytes, events: Events) -> None:
        if not stream_id:
            raise self._connection_error(_s.PROTOCOL_ERROR, "RST_STREAM frame on stream 0")
        if self._is_idle(stream_id):
            raise self._connection_error(
                _s.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}"
            )
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed:
            return  # crossed our END_STREAM or RST_STREAM on the wire: nothing to do
        self._discard(stream_id, reset_code=None)
        events.append(ev.StreamReset(stream_id, int.from_bytes(payload, "big"), remote=True))

    # -- header blocks --

    def _on_headers(
        self: _Codec, stream_id: int, flags: int, payload: bytes, events: Events
    ) -> None:
        if not stream_id:
            raise self._connection_error(_s.PROTOCOL_ERROR, "HEADERS frame on stream 0")
        if flags & frames.PADDED:
            if not payload or payload[0] >= len(payload):
                raise self._connection_error(
                    _s.PROTOCOL_ERROR,
                    f"HEADERS on stream {stream_id}: padding longer than the frame",
                )
            payload = payload[1 : len(payload) - payload[0]]
        if flags & frames.PRIORITY_FLAG:
            if len(payload) < 5:
                raise self._connection_error(
                    _s.FRAME_SIZE_ERROR, f"HEADERS on stream {stream_id} too short for its priority"
                )
            payload = payload[5:]  # priorities are deprecated (RFC 9113 section 5.3.2)
        end_stream = bool(flags & frames.END_STREAM)
        if flags & frames.END_HEADERS:
            self._on_header_block(stream_id, end_stream, payload, events)
        else:
            self._block = (stream_id, end_stream, [payload])
            self._block_size = len(payload)

    def _on_continuation(
        self: _Codec, stream_id: int, flags: int, payload: bytes, events: Events
    ) -> None:
        block = self._block
        if block is None or block[0] != stream_id:
            raise self._connection_error(
                _s.PROTOCOL_ERROR, f"CONTINUATION on stream {stream_id} without a header block"
            )
        block[2].append(payload)
        self._block_size += len(payload)
        if self._block_size >= 2 * self._settings.max_header_list_size:
            raise self._connection_error(
                _s.PROTOCOL_ERROR,
                f"header block on stream {stream_id} reached {self._block_size} bytes (the limit "
                "is twice our SETTINGS_MAX_HEADER_LIST_SIZE)",
            )
        if flags & frames.END_HEADERS:
            self._block = None
            self._on_header_block(stream_id, block[1], b"".join(block[2]), events)

    def _on_header_block(
        self: _Codec, stream_id: int, end_stream: bool, block: bytes, events: Events
    ) -> None:
        try:
            fields = self._decoder.decode(block)
        except hbone_hpack.HPACK_ERRORS as exc:
            raise self._connection_error(
                _s.COMPRESSION_ERROR, f"bad header block on stream {stream_id}: {exc}"
            ) from exc
        if not self._is_outbound(stream_id) and stream_id > self._highest_in:
            if self._client:
                raise self._connection_error(
                    _s.PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} from a server"
                )
            self._on_request(stream_id, end_stream, fields, events)
            return
        if self._is_idle(stream_id):
            raise self._connection_error(_s.PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed or stream.remote_ended:
            self._closed_stream_frame(stream_id, stream, events)
        elif self._client and stream.phase is _s.Phase.REQUESTED:
            self._on_response(stream_id, stream, end_stream, fields, events)
        elif not end_stream:
            self._stream_error(stream_id, _s.PROTOCOL_ERROR, events)  # trailers must end the stream
        elif hbone_hpack.trailers_problem(fields) is not None:
            self._stream_error(stream_id, _s.PROTOCOL_ERROR, events)
        else:
            self._end_remote(stream_id, events)  # trailers carry nothing HBONE uses

    def _on_request(
        self: _Codec,
        stream_id: int,
        end_stream: bool,
        fields: hbone_hpack.RawHeaders,
        events: Events,
    ) -> None:
        self._highest_in = stream_id
        if self._goaway_sent is not None and stream_id > self._goaway_sent:
            # Opened after our GOAWAY and above its last-stream-id: refused, the client may retry.
            self._send_reset(stream_id, _s.REFUSED_STREAM)
            return
        if self._open >= self._settings.max_concurrent_streams:
            self._send_reset(stream_id, _s.REFUSED_STREAM)  # RFC 9113 section 5.1.2
            return
        if hbone_hpack.request_problem(fields) is not None:
            self._send_reset(stream_id, _s.PROTOCOL_ERROR)  # malformed: a stream error
            return
        pseudo, headers = hbone_headers.split_header_block(fields)
        stream = self._new_stream()
        self._streams[stream_id] = stream
        self._open += 1
        self._last_processed = stream_id
        events.append(
            ev.TunnelRequested(
                stream_id, pseudo.get(":method", ""), pseudo.get(":authority", ""), headers
            )
        )
        if end_stream:
            stream.remote_ended = True
            events.append(ev.StreamEnded(stream_id))

    def _on_response(
        self: _Codec,
        stream_id: int,
        stream: _s.StreamState,
        end_stream: bool,
        fields: hbone_hpack.RawHeaders,
        events: Events,
    ) -> None:
        status, problem = hbone_hpack.response_status(fields)
        if problem is not None or status == 101 or (status < 200 and end_stream):
            # A malformed response is a stream error (RFC 9113 section 8.1.1).
            self._stream_error(stream_id, _s.PROTOCOL_ERROR, events)
            return
        if status < 200:
            return  # informational: the final response is still to come
        _pseudo, headers = hbone_headers.split_header_block(fields)
        if status <= 299:
            stream.phase = _s.Phase.ESTABLISHED
            events.append(ev.TunnelEstablished(stream_id, headers))
            if end_stream:
                self._end_remote(stream_id, events)
        else:
            # Terminal for the caller. Reset unless the peer's frames already ended the stream.
            self._discard(stream_id, reset_code=_s.CANCEL)
            events.append(ev.TunnelRejected(stream_id, status, headers))

    def _closed_stream_frame(
        self: _Codec, stream_id: int, stream: _s.StreamState | None, events: Events
    ) -> None:
        """DATA or HEADERS on a stream the peer ended or that is gone (RFC 9113 section 5.1)."""
        if stream is not None and not stream.closed:
            self._stream_error(stream_id, _s.STREAM_CLOSED, events)  # half-closed (remote)
        elif stream_id not in self._reset_by_us:
            self._send_reset(stream_id, _s.STREAM_CLOSED)
        # else: we reset it and this frame crossed our RST_STREAM: drop it silently.
