"""Sans-I/O HBONE: HTTP/2 CONNECT tunnels over one (already decrypted) byte stream, on `h2`.

One `HboneConnection` is one HTTP/2 connection; each proxied TCP connection is one CONNECT stream.
The caller feeds received bytes to `receive_data()`, acts on the returned events, and writes
`data_to_send()` to the socket. Nothing here touches sockets, clocks or tasks.

Invariants:
- Every stream the caller can name is in `_streams` until it is closed in HTTP/2 terms (both
  sides ended, or reset) *and* every byte delivered in `DataReceived` has been `consumed()`.
  A reset or a rejection credits the unconsumed bytes back to the connection window at once,
  so a forgotten stream never shrinks the window for the others.
- `_open` equals the number of tracked streams that are open in HTTP/2 terms, i.e. h2's own
  count, without h2's O(streams) scan.
- Received data is flow controlled by the application: the peer's window only reopens through
  `consumed()`, so data the application never consumes eventually stops the peer.
- No h2, hpack or hyperframe exception escapes: the peer's misbehaviour becomes
  `RemoteProtocolError` (with a GOAWAY queued), ours becomes `LocalProtocolError`.

The data path bypasses h2 (perf-baselines "Which optimizations mattered" #3: h2 parsing every
DATA frame costs 3x the CPU per GB). h2 still handles the preface, SETTINGS, HEADERS,
RST_STREAM, PING and GOAWAY; this module owns DATA, WINDOW_UPDATE and all flow control:
- Incoming bytes go through a frame splitter: DATA frames and WINDOW_UPDATE frames for streams
  we track are handled here (DATA payloads are delivered as they arrive, without waiting for
  the whole frame); every other frame is fed to h2 unchanged, in order. Before a DATA or
  WINDOW_UPDATE frame is looked at, h2 digests the frames before it, so the stream state it
  is judged by is current.
- h2 never sees a DATA payload, so its flow-control windows never move and cannot disagree
  with ours. h2's stream state still has to follow END_STREAM: an incoming END_STREAM is fed
  to h2 as an empty DATA frame, and ours is sent by h2 (`end_stream`). A DATA frame on a stream
  we do not deliver to (unknown, closed, or before the response) is fed to h2 as an empty DATA
  frame with the same stream and END_STREAM flag, so that h2 applies RFC 9113's stream-state
  rules (STREAM_CLOSED, PROTOCOL_ERROR on an idle stream); its bytes still count against the
  connection window and are credited back at once.
- Outgoing DATA is a 9-byte header plus payload in one bytes object (one TLS record batch);
  h2's own output is always moved into our queue before we append, so frames keep their order.
The h2 layer underneath (settings, h2's fixes for HBONE, per-stream state) is
`meshcore.wire.hbone_h2`; h2's events become ours in `meshcore.wire.hbone_h2events`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream

from meshcore.wire import hbone_frames, hbone_h2, hbone_h2events, hbone_headers
from meshcore.wire.hbone_events import ConnectionTerminated as ConnectionTerminated
from meshcore.wire.hbone_events import DataReceived as DataReceived
from meshcore.wire.hbone_events import Event as Event
from meshcore.wire.hbone_events import PingAcknowledged as PingAcknowledged
from meshcore.wire.hbone_events import RemoteSettingsChanged as RemoteSettingsChanged
from meshcore.wire.hbone_events import StreamEnded as StreamEnded
from meshcore.wire.hbone_events import StreamReset as StreamReset
from meshcore.wire.hbone_events import TunnelEstablished as TunnelEstablished
from meshcore.wire.hbone_events import TunnelRejected as TunnelRejected
from meshcore.wire.hbone_events import TunnelRequested as TunnelRequested
from meshcore.wire.hbone_events import WindowOpened as WindowOpened

# The settings and events are part of this module's public surface.
from meshcore.wire.hbone_h2 import HboneSettings as HboneSettings

# The errors and header helpers are part of this module's public surface.
from meshcore.wire.hbone_headers import HboneError as HboneError
from meshcore.wire.hbone_headers import InvalidAuthorityError as InvalidAuthorityError
from meshcore.wire.hbone_headers import InvalidHeaderError as InvalidHeaderError
from meshcore.wire.hbone_headers import InvalidSettingsError as InvalidSettingsError
from meshcore.wire.hbone_headers import LocalProtocolError as LocalProtocolError
from meshcore.wire.hbone_headers import RemoteProtocolError as RemoteProtocolError
from meshcore.wire.hbone_headers import StreamStateError as StreamStateError
from meshcore.wire.hbone_headers import TooManyStreamsError as TooManyStreamsError
from meshcore.wire.hbone_headers import UnknownStreamError as UnknownStreamError
from meshcore.wire.hbone_headers import baggage_header as baggage_header
from meshcore.wire.hbone_headers import format_authority as format_authority
from meshcore.wire.hbone_headers import forwarded_header as forwarded_header
from meshcore.wire.hbone_headers import is_valid_traceparent as is_valid_traceparent
from meshcore.wire.hbone_headers import new_traceparent as new_traceparent
from meshcore.wire.hbone_headers import parse_authority as parse_authority
from meshcore.wire.hbone_headers import parse_baggage as parse_baggage
from meshcore.wire.hbone_headers import parse_forwarded as parse_forwarded

Headers: TypeAlias = hbone_headers.Headers

# HTTP/2 error codes used here (RFC 9113 section 7), part of this module's public surface.
NO_ERROR: Final = hbone_h2.NO_ERROR
PROTOCOL_ERROR: Final = hbone_h2.PROTOCOL_ERROR
FLOW_CONTROL_ERROR: Final = hbone_h2.FLOW_CONTROL_ERROR
STREAM_CLOSED: Final = hbone_h2.STREAM_CLOSED
FRAME_SIZE_ERROR: Final = hbone_h2.FRAME_SIZE_ERROR
REFUSED_STREAM: Final = hbone_h2.REFUSED_STREAM
CANCEL: Final = hbone_h2.CANCEL

_MAX_STREAM_ID: Final = 2**31 - 1
_MAX_WINDOW: Final = 2**31 - 1
_DEFAULT_CONNECTION_WINDOW: Final = 65_535
_DEFAULT_STREAM_WINDOW: Final = hbone_h2.DEFAULT_STREAM_WINDOW
_PREFACE_LEN: Final = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# length (24 bits as 16 + 8), type, flags, stream id: one pack per outgoing DATA frame.
_HEADER: Final = struct.Struct(">HBBBI")
_DATA: Final = hbone_frames.DATA
_WINDOW_UPDATE: Final = hbone_frames.WINDOW_UPDATE
_HEADER_BLOCK_TYPES: Final = frozenset(
    (hbone_frames.HEADERS, hbone_frames.PUSH_PROMISE, hbone_frames.CONTINUATION)
)

# --- the connection --------------------------------------------------------------------------


class HboneConnection(hbone_h2events.H2EventTranslation):
    """One HTTP/2 connection carrying HBONE tunnels, client or server side."""

    def __init__(self, *, client_side: bool, settings: HboneSettings | None = None) -> None:
        self._client = client_side
        if settings is None:
            settings = HboneSettings() if client_side else HboneSettings.server()
        self._settings = settings
        self._h2 = hbone_h2.GracefulH2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        self._streams: dict[int, hbone_h2.StreamState] = {}
        self._open = 0
        self._initiated = False
        self._dead = False  # error GOAWAY sent/received or protocol error: nothing more flows
        self._goaway_sent: int | None = None  # last-stream-id of the GOAWAY we sent
        self._goaway_received: int | None = None  # last-stream-id of the GOAWAY we received
        self._last_processed = 0  # highest peer-opened stream delivered as TunnelRequested
        # Flow control (see the module docstring): h2's windows are not used.
        self._send_conn = _DEFAULT_CONNECTION_WINDOW  # what the peer lets us send, all streams
        self._recv_conn = settings.connection_window  # what we let the peer send
        self._recv_conn_credit = 0  # consumed, not yet announced in a WINDOW_UPDATE
        self._conn_update_at = settings.connection_window // 2
        # Until the peer ACKs our SETTINGS it may use the default stream window: accept either.
        self._stream_recv_initial = max(settings.stream_window, _DEFAULT_STREAM_WINDOW)
        self._stream_update_at = max(1, settings.stream_window // 2)
        self._out: list[bytes] = []  # frames queued for data_to_send(), h2's moved in first
        # Frame splitter state.
        self._rbuf = b""  # an incomplete frame header, WINDOW_UPDATE or padded DATA frame
        self._preface_left = 0 if client_side else _PREFACE_LEN  # for h2, before any frame
        self._to_h2: list[bytes] = []  # bytes for h2 not yet fed to it
        self._h2_left = 0  # payload bytes of the current frame that belong to h2
        self._data_left = 0  # payload bytes of the current unpadded DATA frame still to come
        self._data_sid = 0
        self._data_end = False  # the current DATA frame carries END_STREAM
        self._data_live = False  # ... and its stream takes the bytes (else they are dropped)
        self._in_header_block = False  # HEADERS without END_HEADERS: only CONTINUATION may follow
        self._dispatch: dict[type[h2.events.Event], Callable[[Any, list[Event]], None]] = {
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_remote_settings,
            h2.events.PingAckReceived: self._on_ping_ack,
            h2.events.ConnectionTerminated: self._on_goaway,
            h2.events.PushedStreamReceived: self._on_push,
        }

    # -- connection level --

    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection WINDOW_UPDATE."""
        if self._initiated:
            raise LocalProtocolError("initiate() was already called")
        self._initiated = True
        s = self._settings
        conn = self._h2
        conn.initiate_connection()
        codes = h2.settings.SettingCodes
        conn.update_settings(
            {
                codes.ENABLE_PUSH: 0,
                codes.INITIAL_WINDOW_SIZE: s.stream_window,
                codes.MAX_FRAME_SIZE: s.max_frame_size,
                codes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            }
        )
        # h2 raises its inbound frame limit when the peer ACKs our SETTINGS but copies it into
        # the frame buffer only when receive_data() starts: an ACK and a big DATA frame in one
        # read would trip FrameTooLargeError. Big frames before the ACK are harmless: allow now.
        conn.max_inbound_frame_size = conn.incoming_buffer.max_frame_size = s.max_frame_size
        if s.connection_window > _DEFAULT_CONNECTION_WINDOW:
            conn.increment_flow_control_window(s.connection_window - _DEFAULT_CONNECTION_WINDOW)

    def ping(self, opaque: bytes) -> None:
        self._check_live()
        if len(opaque) != 8:
            raise LocalProtocolError(f"PING payload must be 8 bytes, got {len(opaque)}")
        self._h2.ping(bytes(opaque))

    def close(self, error_code: int = NO_ERROR, last_stream_id: int | None = None) -> None:
        """Send GOAWAY. NO_ERROR drains: streams up to `last_stream_id` may finish, no new
        ones start. Any other code ends the connection now. A no-op once the connection died.
        """
        if not self._initiated:
            raise LocalProtocolError("call initiate() before close()")
        if self._dead:
            return
        if last_stream_id is None:
            last_stream_id = self._last_processed
        if not 0 <= last_stream_id <= _MAX_STREAM_ID:
            raise LocalProtocolError(f"last_stream_id {last_stream_id} is outside 0..2**31-1")
        if error_code == NO_ERROR:
            if self._goaway_sent is not None and last_stream_id > self._goaway_sent:
                raise LocalProtocolError(
                    f"last_stream_id {last_stream_id} may not exceed the previous GOAWAY's "
                    f"{self._goaway_sent} (RFC 9113 section 6.8)"
                )
            inbound_above = [
                sid
                for sid, stream in self._streams.items()
                if not stream.closed and not self._is_outbound(sid) and sid > last_stream_id
            ]
            if inbound_above:
                raise LocalProtocolError(
                    f"last_stream_id {last_stream_id} would abandon open streams {inbound_above}; "
                    "reset them first or pass a higher last_stream_id"
                )
        self._h2.close_connection(error_code=error_code, last_stream_id=last_stream_id)
        self._goaway_sent = last_stream_id
        if error_code != NO_ERROR:
            self._die()

    @property
    def open_streams(self) -> int:
        """Streams open in HTTP/2 terms (including half-closed ones)."""
        return self._open

    @property
    def is_closed(self) -> bool:
        """True once nothing more can happen: flush `data_to_send()` and close the socket."""
        if self._dead:
            return True
        goaway = self._goaway_sent is not None or self._goaway_received is not None
        return goaway and self._open == 0

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams  # unlimited until SETTINGS

    def data_to_send(self) -> bytes:
        self._take_h2_output()
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_h2_output(self) -> None:
        # h2 queues its frames in its own buffer; move them out before queueing one of ours.
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)

    # -- client side --

    def can_open_tunnel(self) -> bool:
        """True while a new tunnel fits: under both stream limits, no GOAWAY either way."""
        if not self._client or not self._initiated or self._dead:
            return False
        if self._goaway_sent is not None or self._goaway_received is not None:
            return False  # GOAWAY either way: no new streams on this connection
        limit = min(self._settings.max_concurrent_streams, self.peer_max_concurrent_streams)
        return self._open < limit and self._h2.highest_outbound_stream_id + 2 <= _MAX_STREAM_ID

    def open_tunnel(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send ``CONNECT authority`` with extra headers; returns the new stream id."""
        if not self._client:
            raise LocalProtocolError("only a client opens tunnels")
        self._check_live()
        if not self.can_open_tunnel():
            goaway = self._goaway_sent is not None or self._goaway_received is not None
            limit = min(self._settings.max_concurrent_streams, self.peer_max_concurrent_streams)
            raise TooManyStreamsError(f"no new tunnel: {self._open}/{limit} open, GOAWAY={goaway}")
        if not authority or any(c in authority for c in " \t\r\n\x00"):
            raise LocalProtocolError(f"invalid :authority {authority!r}")
        fields = [
            (":method", "CONNECT"),
            (":authority", authority),
            *hbone_h2.check_headers(headers),
        ]
        conn = self._h2
        stream_id = conn.get_next_available_stream_id()
        try:
            conn.send_headers(stream_id, fields)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"cannot open a tunnel to {authority!r}: {exc}") from exc
        self._streams[stream_id] = self._new_stream(conn.streams[stream_id])
        self._open += 1
        return stream_id

    # -- server side --

    def accept_tunnel(self, stream_id: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer ``:status 200``: the tunnel is established."""
        stream = self._transition(stream_id, hbone_h2.Op.ACCEPT)
        self._send_headers(stream_id, [(":status", "200"), *hbone_h2.check_headers(headers)], False)
        stream.phase = hbone_h2.Phase.ESTABLISHED

    def reject_tunnel(
        self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer a non-200 status with END_STREAM, then RST_STREAM(NO_ERROR) so that the
        client need not finish its side (RFC 9113 section 8.1). The stream is gone afterwards.
        """
        if not 100 <= status <= 999 or 200 <= status <= 299:
            raise LocalProtocolError(f"reject_tunnel status {status} must be a non-2xx status")
        self._transition(stream_id, hbone_h2.Op.REJECT)
        self._send_headers(
            stream_id, [(":status", str(status)), *hbone_h2.check_headers(headers)], True
        )
        self._discard(stream_id, reset_code=NO_ERROR)

    # -- both sides --

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control allows; returns how many bytes were taken.

        0 means the window is closed: wait for `WindowOpened`. Frames never exceed the peer's
        SETTINGS_MAX_FRAME_SIZE.
        """
        stream = self._transition(stream_id, hbone_h2.Op.SEND)
        size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        window = stream.send_window if stream.send_window < self._send_conn else self._send_conn
        taken = size if size < window else window
        if taken <= 0:
            return 0
        frame = self._h2.max_outbound_frame_size
        self._take_h2_output()
        pack = _HEADER.pack
        if taken == size and taken <= frame:
            # The common case: header and payload in one object, so one write, one TLS record.
            self._out.append(pack(taken >> 8, taken & 0xFF, _DATA, 0, stream_id) + data)
        else:
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            for offset in range(0, taken, frame):
                n = min(frame, taken - offset)
                header = pack(n >> 8, n & 0xFF, _DATA, 0, stream_id)
                self._out.append(header + view[offset : offset + n])
        stream.send_window -= taken
        self._send_conn -= taken
        return taken

    def send_window(self, stream_id: int) -> int:
        """How many bytes `send_data` would take now (0 if the stream cannot send)."""
        stream = self._find_live(stream_id)
        if stream.local_ended or stream.phase is not hbone_h2.Phase.ESTABLISHED:
            return 0
        return max(0, min(self._send_conn, stream.send_window))

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM): the TCP FIN of the tunnel."""
        stream = self._transition(stream_id, hbone_h2.Op.END)
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"stream {stream_id}: end_stream failed: {exc}") from exc
        stream.local_ended = True
        self._settle(stream_id, stream)

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """RST_STREAM (default CANCEL). A no-op for a stream that is already gone."""
        if not 0 <= error_code <= 0xFFFFFFFF:
            raise LocalProtocolError(f"reset_stream error code {error_code} is not a 32-bit value")
        if self._dead or self._find(stream_id) is None:
            return
        self._discard(stream_id, reset_code=error_code)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The application is done with `nbytes` of DataReceived.flow_controlled_length.

        Reopens the windows in batches: a WINDOW_UPDATE once half a window is consumed.
        A no-op for a stream already reset: its bytes were credited back then.
        """
        if nbytes < 0:
            raise LocalProtocolError(f"consumed({stream_id}, {nbytes}): negative byte count")
        if self._dead:
            return
        stream = self._find(stream_id)
        if stream is None or nbytes == 0:
            return
        if nbytes > stream.unconsumed:
            raise LocalProtocolError(
                f"consumed({stream_id}, {nbytes}) but only {stream.unconsumed} bytes are unconsumed"
            )
        stream.unconsumed -= nbytes
        self._credit(stream_id, stream, nbytes)
        if stream.closed and not stream.unconsumed:
            del self._streams[stream_id]

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Feed bytes read from the peer; returns the events they complete, in order."""
        if not self._initiated:
            raise LocalProtocolError("call initiate() before receive_data()")
        if self._dead:
            return []  # the connection is over; late bytes from the peer are irrelevant
        events: list[Event] = []
        try:
            self._split(data if isinstance(data, bytes) else bytes(data), events)
            if self._to_h2 and not self._dead:
                self._feed_h2(events)
        except hbone_h2.H2_ERRORS as exc:
            raise self._remote_error(exc) from exc
        return events

    def _feed_h2(self, events: list[Event]) -> bool:
        """Let h2 digest the frames queued for it and translate what they produced.

        False when that ended the connection."""
        pending = self._to_h2  # cleared in place: _split holds on to the list
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        h2_events = self._h2.receive_data(data)
        dispatch = self._dispatch
        for h2_event in h2_events:
            handler = dispatch.get(type(h2_event))
            if handler is not None:
                handler(h2_event, events)
                if self._dead:
                    return False
        return True

    def _split(self, data: bytes, events: list[Event]) -> None:
        """The frame splitter: DATA and WINDOW_UPDATE handled here, the rest queued for h2."""
        if self._rbuf:
            data = self._rbuf + data
            self._rbuf = b""
        offset = 0
        end = len(data)
        to_h2 = self._to_h2
        max_frame = self._settings.max_frame_size
        while offset < end:
            if self._dead:
                return
            if self._data_left:
                n = min(self._data_left, end - offset)
                # A view, not a slice: payloads are up to 256 KiB per read, and a copy of each
                # was a visible share of the CPU per GB; the view keeps `data` alive instead.
                chunk = data if n == end else memoryview(data)[offset : offset + n]
                offset += n
                self._data_left -= n
                self._deliver(chunk, n, events)
                continue
            if self._h2_left or self._preface_left:
                if self._preface_left:
                    n = min(self._preface_left, end - offset)
                    self._preface_left -= n
                else:
                    n = min(self._h2_left, end - offset)
                    self._h2_left -= n
                to_h2.append(data[offset : offset + n])
                offset += n
                continue
            if end - offset < hbone_frames.HEADER_LEN:
                break
            length = int.from_bytes(data[offset : offset + 3], "big")
            frame_type = data[offset + 3]
            flags = data[offset + 4]
            stream_id = int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            if length > max_frame:
                raise self._connection_error(
                    FRAME_SIZE_ERROR,
                    f"frame of type {frame_type} is {length} bytes, over SETTINGS_MAX_FRAME_SIZE "
                    f"{max_frame}",
                )
            if self._in_header_block or (frame_type != _DATA and frame_type != _WINDOW_UPDATE):
                if frame_type in _HEADER_BLOCK_TYPES:
                    self._in_header_block = not flags & hbone_frames.END_HEADERS
                to_h2.append(data[offset : offset + hbone_frames.HEADER_LEN])
                offset += hbone_frames.HEADER_LEN
                self._h2_left = length
                continue
            # The stream this frame names may have been opened or closed by earlier frames.
            if to_h2 and not self._feed_h2(events):
                return
            if frame_type == _DATA and not flags & hbone_frames.PADDED:
                offset += hbone_frames.HEADER_LEN
                self._begin_data(stream_id, length, flags, events)
                if not length:
                    self._finish_data(events)
                continue
            if end - offset < hbone_frames.HEADER_LEN + length:
                if frame_type == _WINDOW_UPDATE and length != 4:
                    raise self._window_update_size_error(length)
                break
            frame = data[offset : offset + hbone_frames.HEADER_LEN + length]
            offset += len(frame)
            if frame_type == _DATA:
                self._padded_data(stream_id, flags, frame, events)
            else:
                self._window_update(stream_id, frame, events)
        if offset < end:
            self._rbuf = data[offset:]

    # -- the data path (DATA and WINDOW_UPDATE, see the module docstring) --

    def _new_stream(self, h2_stream: h2.stream.H2Stream) -> hbone_h2.StreamState:
        # h2 sized the stream's send window from the peer's SETTINGS; nothing was sent yet.
        return hbone_h2.StreamState(
            h2_stream,
            hbone_h2.Phase.REQUESTED,
            send_window=h2_stream.outbound_flow_control_window,
            recv_window=self._stream_recv_initial,
        )

    def _receiving(self, stream_id: int) -> hbone_h2.StreamState | None:
        """The stream if it takes DATA now (a client only after the response headers)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended or stream.closed:
            return None
        if self._client and stream.phase is not hbone_h2.Phase.ESTABLISHED:
            return None
        return stream

    def _begin_data(self, stream_id: int, length: int, flags: int, events: list[Event]) -> bool:
        """Account a DATA frame's `length` against the windows; True if its bytes are delivered.

        Sets up the streaming of its payload (`_deliver`, `_finish_data`) either way; bytes
        that are not delivered are credited back as they arrive.
        """
        end_stream = bool(flags & hbone_frames.END_STREAM)
        self._data_sid = stream_id
        self._data_left = length
        self._data_end = False
        self._data_live = False
        if stream_id == 0:
            raise self._connection_error(PROTOCOL_ERROR, "DATA frame on stream 0")
        # Every DATA frame counts against the connection window (RFC 9113 section 6.9).
        self._recv_conn -= length
        if self._recv_conn < 0:
            raise self._connection_error(
                FLOW_CONTROL_ERROR,
                f"DATA on stream {stream_id} overran the connection window by {-self._recv_conn}",
            )
        stream = self._receiving(stream_id)
        if stream is None:
            # Not a stream we deliver to: h2 applies the stream-state rules to an empty copy of
            # the frame (it may raise, or queue RST_STREAM); `_deliver` credits the bytes back.
            self._to_h2.append(
                _HEADER.pack(0, 0, _DATA, flags & hbone_frames.END_STREAM, stream_id)
            )
            self._feed_h2(events)
            return False
        stream.recv_window -= length
        if stream.recv_window < 0:
            # A stream error (RFC 9113 section 6.9): reset this stream, the others go on.
            self._discard(stream_id, reset_code=FLOW_CONTROL_ERROR)
            events.append(StreamReset(stream_id, FLOW_CONTROL_ERROR, remote=False))
            return False
        self._data_end = end_stream
        self._data_live = True
        return True

    def _deliver(self, chunk: bytes | memoryview, length: int, events: list[Event]) -> None:
        """Part of the current DATA frame's payload arrived."""
        sid = self._data_sid
        stream = self._streams.get(sid) if self._data_live else None
        if stream is None or stream.closed:
            # Reset while the frame was arriving (or never delivered): free the window.
            self._data_live = False
            self._credit(sid, None, length)
        else:
            stream.unconsumed += length
            events.append(DataReceived(sid, chunk, length))
        if not self._data_left:
            self._finish_data(events)

    def _finish_data(self, events: list[Event]) -> None:
        """The current DATA frame is complete: pass its END_STREAM on to h2's stream state."""
        if self._data_end and self._data_live and self._data_sid in self._streams:
            self._end_remote(self._data_sid, events)
        self._data_end = self._data_live = False

    def _end_remote(self, stream_id: int, events: list[Event]) -> None:
        # h2 moves the stream to half-closed (remote) and reports StreamEnded.
        self._to_h2.append(_HEADER.pack(0, 0, _DATA, hbone_frames.END_STREAM, stream_id))
        self._feed_h2(events)

    def _padded_data(self, stream_id: int, flags: int, frame: bytes, events: list[Event]) -> None:
        length = len(frame) - hbone_frames.HEADER_LEN
        data = hbone_frames.split_padding(frame[hbone_frames.HEADER_LEN :])
        if data is None:
            raise self._connection_error(
                PROTOCOL_ERROR, f"DATA on stream {stream_id}: padding longer than the frame"
            )
        live = self._begin_data(stream_id, length, flags, events)
        self._data_left = 0
        stream = self._streams.get(stream_id)
        if live and stream is not None:
            if data:
                stream.unconsumed += length
                events.append(DataReceived(stream_id, data, length))
            else:
                # Padding alone: nothing for the application to consume, so credit it here.
                self._credit(stream_id, stream, length)
        else:
            self._credit(stream_id, None, length)
        self._finish_data(events)

    def _window_update_size_error(self, length: int) -> RemoteProtocolError:
        return self._connection_error(
            FRAME_SIZE_ERROR, f"WINDOW_UPDATE frame of {length} bytes (must be 4)"
        )

    def _window_update(self, stream_id: int, frame: bytes, events: list[Event]) -> None:
        if len(frame) != hbone_frames.HEADER_LEN + 4:
            raise self._window_update_size_error(len(frame) - hbone_frames.HEADER_LEN)
        increment = hbone_frames.parse_window_increment(frame[hbone_frames.HEADER_LEN :])
        if stream_id == 0:
            if increment == 0:
                raise self._connection_error(
                    PROTOCOL_ERROR, "connection WINDOW_UPDATE with increment 0"
                )
            self._send_conn += increment
            if self._send_conn > _MAX_WINDOW:
                raise self._connection_error(
                    FLOW_CONTROL_ERROR, f"connection send window grew to {self._send_conn}"
                )
            events.append(WindowOpened(None))
            return
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed:
            # h2 knows what to do on closed and idle streams (ignore, or PROTOCOL_ERROR).
            self._to_h2.append(frame)
            self._feed_h2(events)
            return
        if increment == 0 or stream.send_window + increment > _MAX_WINDOW:
            code = PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR
            self._discard(stream_id, reset_code=code)
            events.append(StreamReset(stream_id, code, remote=False))
            return
        stream.send_window += increment
        if not stream.local_ended and stream.phase is hbone_h2.Phase.ESTABLISHED:
            events.append(WindowOpened(stream_id))

    def _credit(self, stream_id: int, stream: hbone_h2.StreamState | None, nbytes: int) -> None:
        """`nbytes` of received DATA are done with: reopen the windows, in half-window batches
        (a WINDOW_UPDATE per read would cost a frame per frame)."""
        if nbytes <= 0:
            return
        self._recv_conn_credit += nbytes
        if self._recv_conn_credit >= self._conn_update_at:
            increment, self._recv_conn_credit = self._recv_conn_credit, 0
            self._recv_conn += increment
            self._take_h2_output()
            self._out.append(hbone_frames.build_window_update(0, increment))
        if stream is None or stream.remote_ended or stream.closed:
            return  # the peer sends nothing more on it: no stream window to reopen
        stream.recv_credit += nbytes
        if stream.recv_credit >= self._stream_update_at:
            increment, stream.recv_credit = stream.recv_credit, 0
            stream.recv_window += increment
            self._take_h2_output()
            self._out.append(hbone_frames.build_window_update(stream_id, increment))

    def _connection_error(self, code: int, message: str) -> RemoteProtocolError:
        """Queue GOAWAY(`code`), end the connection, return the error to raise."""
        self._h2.close_connection(error_code=code)
        self._die()
        return RemoteProtocolError(f"peer violated HTTP/2: {message}", error_code=code)

    # -- helpers --

    def _is_outbound(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client

    def _check_live(self) -> None:
        if not self._initiated:
            raise LocalProtocolError("call initiate() first")
        if self._dead:
            raise LocalProtocolError("the connection is closed")

    def _find(self, stream_id: int) -> hbone_h2.StreamState | None:
        """The stream, None if it existed and is gone; raises if it never existed."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        h2c = self._h2
        out = self._is_outbound(stream_id)
        highest = h2c.highest_outbound_stream_id if out else h2c.highest_inbound_stream_id
        if stream_id <= 0 or stream_id > highest:
            raise UnknownStreamError(stream_id)
        return None

    def _find_live(self, stream_id: int) -> hbone_h2.StreamState:
        self._check_live()
        stream = self._find(stream_id)
        if stream is None:
            raise StreamStateError(stream_id, "the stream was reset, rejected or closed")
        return stream

    def _transition(self, stream_id: int, op: hbone_h2.Op) -> hbone_h2.StreamState:
        stream = self._find_live(stream_id)
        next_phase = hbone_h2.TRANSITIONS.get((self._client, stream.phase, op))
        if next_phase is None:
            side = "client" if self._client else "server"
            phase = stream.phase.value
            raise StreamStateError(stream_id, f"{op.value} not allowed on a {side} stream {phase}")
        if op in (hbone_h2.Op.SEND, hbone_h2.Op.END) and stream.local_ended:
            raise StreamStateError(stream_id, f"{op.value} after end_stream")
        return stream

    def _send_headers(self, stream_id: int, fields: list[tuple[str, str]], end: bool) -> None:
        try:
            self._h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"stream {stream_id}: cannot send headers: {exc}") from exc

    def _settle(self, stream_id: int, stream: hbone_h2.StreamState) -> None:
        """Close the stream once both sides ended; drop it once all its data is consumed.

        Decided from the events translated so far, not from h2's stream state: h2 has already
        parsed the whole read, so its state may include a reset we have not translated yet.
        """
        if stream.closed or not (stream.local_ended and stream.remote_ended):
            return
        stream.closed = True
        self._open -= 1
        self._h2.forget_stream(stream_id)
        if not stream.unconsumed:
            del self._streams[stream_id]

    def _discard(self, stream_id: int, reset_code: int | None) -> None:
        """Forget a stream now; reset it first (with `reset_code`) if it is still open."""
        stream = self._streams.pop(stream_id)
        conn = self._h2
        if not stream.closed:
            self._open -= 1
            if reset_code is None:
                conn.forget_stream(stream_id)
            else:
                conn.drop_stream(stream_id, reset_code)
        if stream.unconsumed:
            # The application will never consume these now: give the connection window back.
            self._credit(stream_id, None, stream.unconsumed)

    def _die(self) -> None:
        self._dead = True
        self._h2.state_machine.state = h2.connection.ConnectionState.CLOSED
        self._streams.clear()
        self._open = 0

    def _remote_error(self, exc: BaseException) -> RemoteProtocolError:
        code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
        if not self._h2.terminated:
            # h2 queues a GOAWAY only for errors raised while parsing frames (not, say, for a
            # bad preface); make sure the peer always hears why.
            self._h2.close_connection(error_code=code)
        self._die()
        return RemoteProtocolError(f"peer violated HTTP/2: {exc}", error_code=code)
