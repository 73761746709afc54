"""The h2 events the HBONE codec lets h2 produce (HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY),
translated into HBONE events: a mixin of `meshcore.wire.hbone.HboneConnection`, whose state its
methods read and change (typed through the `_Codec` protocol)."""

from __future__ import annotations

from typing import Protocol

import h2.events
import h2.settings
import h2.stream

from meshcore.wire import hbone_events, hbone_h2, hbone_headers

Events = list[hbone_events.Event]


class _Codec(Protocol):
    """The `HboneConnection` state and helpers these handlers use."""

    _h2: hbone_h2.GracefulH2Connection
    _streams: dict[int, hbone_h2.StreamState]
    _open: int
    _goaway_sent: int | None
    _goaway_received: int | None
    _last_processed: int

    def _new_stream(self, h2_stream: h2.stream.H2Stream) -> hbone_h2.StreamState: ...
    def _settle(self, stream_id: int, stream: hbone_h2.StreamState) -> None: ...
    def _discard(self, stream_id: int, reset_code: int | None) -> None: ...
    def _die(self) -> None: ...
    def _is_outbound(self, stream_id: int) -> bool: ...
    def _connection_error(self, code: int, message: str) -> hbone_headers.RemoteProtocolError: ...


class H2EventTranslation:
    """Handlers named `_on_<event>`, one per h2 event type the codec dispatches."""

    # Set here as well as in HboneConnection.__init__: declared so both agree on the type.
    _goaway_received: int | None
    _last_processed: int

    def _on_request(self: _Codec, ev: h2.events.RequestReceived, out: Events) -> None:
        sid = ev.stream_id
        if self._goaway_sent is not None and sid > self._goaway_sent:
            # Opened after our GOAWAY and above its last-stream-id: refuse, the client may retry.
            self._h2.drop_stream(sid, hbone_h2.REFUSED_STREAM)
            return
        pseudo, headers = hbone_headers.split_header_block(ev.headers)
        self._streams[sid] = self._new_stream(self._h2.streams[sid])
        self._open += 1
        self._last_processed = sid
        out.append(
            hbone_events.TunnelRequested(
                sid, pseudo.get(":method", ""), pseudo.get(":authority", ""), headers
            )
        )

    def _on_response(self: _Codec, ev: h2.events.ResponseReceived, out: Events) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            return
        pseudo, headers = hbone_headers.split_header_block(ev.headers)
        status_text = pseudo.get(":status", "")
        if len(status_text) != 3 or not status_text.isdigit():
            # A malformed response is a stream error (RFC 9113 section 8.1.1).
            self._discard(sid, reset_code=hbone_h2.PROTOCOL_ERROR)
            out.append(hbone_events.StreamReset(sid, hbone_h2.PROTOCOL_ERROR, remote=False))
            return
        status = int(status_text)
        if 200 <= status <= 299:
            stream.phase = hbone_h2.Phase.ESTABLISHED
            out.append(hbone_events.TunnelEstablished(sid, headers))
        else:
            # Terminal for the caller. Reset unless the peer's frames already closed the stream.
            self._discard(sid, reset_code=hbone_h2.CANCEL)
            out.append(hbone_events.TunnelRejected(sid, status, headers))

    def _on_data(self: _Codec, ev: h2.events.DataReceived, out: Events) -> None:
        # h2 only ever sees the empty DATA frames the splitter hands it (module docstring).
        pass

    def _on_stream_ended(self: _Codec, ev: h2.events.StreamEnded, out: Events) -> None:
        stream = self._streams.get(ev.stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        out.append(hbone_events.StreamEnded(ev.stream_id))
        self._settle(ev.stream_id, stream)

    def _on_stream_reset(self: _Codec, ev: h2.events.StreamReset, out: Events) -> None:
        sid = ev.stream_id
        if sid not in self._streams:
            return
        self._discard(sid, reset_code=None)
        out.append(hbone_events.StreamReset(sid, int(ev.error_code), remote=ev.remote_reset))

    def _on_window_updated(self: _Codec, ev: h2.events.WindowUpdated, out: Events) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if not sid or (
            stream and not stream.local_ended and stream.phase is hbone_h2.Phase.ESTABLISHED
        ):
            out.append(hbone_events.WindowOpened(sid or None))

    def _on_remote_settings(
        self: _Codec,
        ev: h2.events.RemoteSettingsChanged,
        out: Events,
    ) -> None:
        changed = ev.changed_settings
        codes = h2.settings.SettingCodes
        streams = changed.get(codes.MAX_CONCURRENT_STREAMS)
        out.append(
            hbone_events.RemoteSettingsChanged(streams.new_value if streams is not None else None)
        )
        window = changed.get(codes.INITIAL_WINDOW_SIZE)
        if window is not None:
            # Every stream's send window moves by the difference (RFC 9113 section 6.9.2).
            old = window.original_value
            delta = window.new_value - (hbone_h2.DEFAULT_STREAM_WINDOW if old is None else old)
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > hbone_h2.MAX_WINDOW:
                    raise self._connection_error(
                        hbone_h2.FLOW_CONTROL_ERROR,
                        f"SETTINGS_INITIAL_WINDOW_SIZE {window.new_value} overflows the send "
                        "window of a stream",
                    )
            if delta > 0:
                out.append(hbone_events.WindowOpened(None))

    def _on_ping_ack(self: _Codec, ev: h2.events.PingAckReceived, out: Events) -> None:
        out.append(hbone_events.PingAcknowledged(bytes(ev.ping_data)))

    def _on_goaway(
        self: _Codec,
        ev: h2.events.ConnectionTerminated,
        out: Events,
    ) -> None:
        code = int(ev.error_code or 0)
        last = ev.last_stream_id or 0
        out.append(hbone_events.ConnectionTerminated(code, last, ev.additional_data or b""))
        if code != hbone_h2.NO_ERROR:
            self._die()
            return
        if self._goaway_received is None or last < self._goaway_received:
            self._goaway_received = last
        # Our streams above the peer's last-stream-id were never processed: refused, retryable.
        refused = [sid for sid in self._streams if self._is_outbound(sid) and sid > last]
        for sid in sorted(refused):
            self._discard(sid, reset_code=hbone_h2.CANCEL)
            out.append(hbone_events.StreamReset(sid, hbone_h2.REFUSED_STREAM, remote=True))

    def _on_push(
        self: _Codec,
        ev: h2.events.PushedStreamReceived,
        out: Events,
    ) -> None:
        # Only possible before the peer has seen ENABLE_PUSH=0; HBONE never pushes.
        if ev.pushed_stream_id is not None:
            self._h2.drop_stream(ev.pushed_stream_id, hbone_h2.REFUSED_STREAM)
