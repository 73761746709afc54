"""Sans-I/O HBONE: HTTP/2 CONNECT tunnels over one (already decrypted) byte stream.

One `HboneConnection` is one HTTP/2 connection; each proxied TCP connection is one CONNECT stream.
The caller feeds received bytes to `receive_data()`, acts on the returned events, and writes
`data_to_send()` to the socket. Nothing here touches sockets, clocks or tasks.

The HTTP/2 layer is our own, for the subset HBONE uses (RFC 9113 without push or priorities),
with `hpack` for header compression (`meshcore.wire.hbone_hpack`). A general HTTP/2 library
cost a third of ztunnel's CPU per new connection and most of its per-frame CPU; HBONE needs
one request and one response per stream, then bytes.

Invariants:
- Every stream the caller can name is in `_streams` until it is closed in HTTP/2 terms (both
  sides ended, or reset) *and* every byte delivered in `DataReceived` has been `consumed()`.
  A reset or a rejection credits the unconsumed bytes back to the connection window at once,
  so a forgotten stream never shrinks the window for the others.
- `_open` is the number of tracked streams that are open in HTTP/2 terms.
- Per-stream memory ends with the stream, except the ids of the last `MAX_RESET_MEMORY` streams
  we reset, so that frames already in flight on them are dropped silently (RFC 9113 section
  5.1) instead of being answered.
- Received data is flow controlled by the application: the peer's window only reopens through
  `consumed()`, so data the application never consumes eventually stops the peer.
- Nothing but `RemoteProtocolError` (with a GOAWAY queued) escapes `receive_data()`; misuse by
  the caller raises `LocalProtocolError`.

A client may send DATA (and END_STREAM) before the response: optimistic data, so that a client's
first bytes travel right behind its CONNECT instead of one round trip later. A server delivers
them as usual; the application holds them until it accepts, and a rejection drops them.

Receiving: DATA payloads are delivered as they arrive, without waiting for the whole frame
(reads are up to 256 KiB, frames up to 1 MiB); every other frame is handled once it is whole.
Sending: a DATA frame is its 9-byte header and payload in one bytes object (one TLS record).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeAlias

from meshcore.wire import hbone_control, hbone_headers, hbone_hpack, hbone_state
from meshcore.wire import hbone_frames as frames
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

# The settings and events are part of this module's public surface.
from meshcore.wire.hbone_state import HboneSettings as HboneSettings

Headers: TypeAlias = hbone_headers.Headers

# HTTP/2 error codes used here (RFC 9113 section 7), part of this module's public surface.
NO_ERROR: Final = hbone_state.NO_ERROR
PROTOCOL_ERROR: Final = hbone_state.PROTOCOL_ERROR
FLOW_CONTROL_ERROR: Final = hbone_state.FLOW_CONTROL_ERROR
STREAM_CLOSED: Final = hbone_state.STREAM_CLOSED
FRAME_SIZE_ERROR: Final = hbone_state.FRAME_SIZE_ERROR
REFUSED_STREAM: Final = hbone_state.REFUSED_STREAM
CANCEL: Final = hbone_state.CANCEL
COMPRESSION_ERROR: Final = hbone_state.COMPRESSION_ERROR
ENHANCE_YOUR_CALM: Final = hbone_state.ENHANCE_YOUR_CALM

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_RESET_MEMORY: Final = 1024
_MAX_STREAM_ID: Final = 2**31 - 1
_MAX_WINDOW: Final = hbone_state.MAX_WINDOW
_DEFAULT_CONNECTION_WINDOW: Final = hbone_state.DEFAULT_CONNECTION_WINDOW
_DEFAULT_STREAM_WINDOW: Final = hbone_state.DEFAULT_STREAM_WINDOW
_UNLIMITED_STREAMS: Final = 2**32 - 1
# One pack per outgoing DATA frame, one unpack per incoming frame.
_HEADER: Final = frames.HEADER
_unpack_header: Final = frames.HEADER.unpack_from
_DATA: Final = frames.DATA
_HEADERS: Final = frames.HEADERS
_CONTINUATION: Final = frames.CONTINUATION
_WINDOW_UPDATE: Final = frames.WINDOW_UPDATE
_HLEN: Final = frames.HEADER_LEN
# Frames of a fixed payload length (RFC 9113 section 6), checked before the payload arrives.
_FIXED_LENGTH: Final = {frames.PRIORITY: 5, frames.RST_STREAM: 4, frames.PING: 8, _WINDOW_UPDATE: 4}
_Phase = hbone_state.Phase
_ESTABLISHED: Final = _Phase.ESTABLISHED
_Op = hbone_state.Op
_StreamState = hbone_state.StreamState

# --- the connection --------------------------------------------------------------------------


class HboneConnection(hbone_control.ControlFrames):
    """One HTTP/2 connection carrying HBONE tunnels, client or server side."""

    def __init__(self, *, client_side: bool, settings: HboneSettings | None = None) -> None:
        self._client = client_side
        if settings is None:
            settings = HboneSettings() if client_side else HboneSettings.server()
        self._settings = settings
        self._streams: dict[int, hbone_state.StreamState] = {}
        self._open = 0
        self._initiated = False
        self._dead = False  # error GOAWAY sent/received or protocol error: nothing more flows
        self._goaway_sent: int | None = None  # last-stream-id of the GOAWAY we sent
        self._goaway_received: int | None = None  # last-stream-id of the GOAWAY we received
        self._last_processed = 0  # highest peer-opened stream delivered as TunnelRequested
        self._next_id = 1  # the next stream id we open (clients only)
        self._highest_out = 0  # highest stream id we opened
        self._highest_in = 0  # highest stream id the peer opened
        self._reset_by_us: dict[int, None] = {}  # recent resets, oldest first (bounded)
        # The peer's settings (defaults until its SETTINGS frame arrives).
        self._settings_seen = False
        self._peer_max_frame = hbone_state.DEFAULT_MAX_FRAME_SIZE
        self._peer_initial_window = _DEFAULT_STREAM_WINDOW
        self._peer_max_streams = _UNLIMITED_STREAMS
        self._decoder = hbone_hpack.BlockDecoder(settings.max_header_list_size)
        # Flow control.
        self._send_conn = _DEFAULT_CONNECTION_WINDOW  # what the peer lets us send, all streams
        self._recv_conn = settings.connection_window  # what we let the peer send
        self._recv_conn_credit = 0  # consumed, not yet announced in a WINDOW_UPDATE
        self._conn_update_at = settings.connection_window // 2
        # Until the peer ACKs our SETTINGS it may use the default stream window: accept either.
        self._stream_recv_initial = max(settings.stream_window, _DEFAULT_STREAM_WINDOW)
        self._stream_update_at = max(1, settings.stream_window // 2)
        self._out: list[bytes] = []  # frames queued for data_to_send()
        self.acks_queued = 0  # PING and SETTINGS ACKs the peer's frames made us queue, ever
        # Frame reader state.
        self._rbuf = bytearray()  # the start of a frame that is not whole yet
        self._need = 0  # bytes `_rbuf` must reach before parsing can go on
        self._preface_left = 0 if client_side else len(PREFACE)
        self._data_left = 0  # payload bytes of the current unpadded DATA frame still to come
        self._data_sid = 0
        self._data_end = False  # the current DATA frame carries END_STREAM
        self._data_live = False  # ... and its stream takes the bytes (else they are dropped)
        # A header block waiting for CONTINUATION: (stream id, END_STREAM, fragments).
        self._block: tuple[int, bool, list[bytes]] | None = None
        self._block_size = 0

    # -- connection level --

    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection WINDOW_UPDATE."""
        if self._initiated:
            raise LocalProtocolError("initiate() was already called")
        self._initiated = True
        s = self._settings
        if self._client:
            self._out.append(PREFACE)
        self._out.append(
            frames.build_settings(
                [
                    (frames.SETTINGS_ENABLE_PUSH, 0),
                    (frames.SETTINGS_INITIAL_WINDOW_SIZE, s.stream_window),
                    (frames.SETTINGS_MAX_FRAME_SIZE, s.max_frame_size),
                    (frames.SETTINGS_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                    (frames.SETTINGS_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
                ]
            )
        )
        if s.connection_window > _DEFAULT_CONNECTION_WINDOW:
            increment = s.connection_window - _DEFAULT_CONNECTION_WINDOW
            self._out.append(frames.build_window_update(0, increment))

    def ping(self, opaque: bytes) -> None:
        self._check_live()
        if len(opaque) != 8:
            raise LocalProtocolError(f"PING payload must be 8 bytes, got {len(opaque)}")
        self._out.append(frames.build_ping(bytes(opaque)))

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
        if not 0 <= error_code <= 0xFFFFFFFF:
            raise LocalProtocolError(f"GOAWAY error code {error_code} is not a 32-bit value")
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
        self._out.append(frames.build_goaway(last_stream_id, error_code))
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
        return self._peer_max_streams  # unlimited until SETTINGS

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    # -- client side --

    def can_open_tunnel(self) -> bool:
        """True while a new tunnel fits: under both stream limits, no GOAWAY either way."""
        if not self._client or not self._initiated or self._dead:
            return False
        if self._goaway_sent is not None or self._goaway_received is not None:
            return False  # GOAWAY either way: no new streams on this connection
        limit = min(self._settings.max_concurrent_streams, self._peer_max_streams)
        return self._open < limit and self._next_id <= _MAX_STREAM_ID

    def open_tunnel(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send ``CONNECT authority`` with extra headers; returns the new stream id."""
        if not self._client:
            raise LocalProtocolError("only a client opens tunnels")
        self._check_live()
        if not self.can_open_tunnel():
            goaway = self._goaway_sent is not None or self._goaway_received is not None
            limit = min(self._settings.max_concurrent_streams, self._peer_max_streams)
            raise TooManyStreamsError(f"no new tunnel: {self._open}/{limit} open, GOAWAY={goaway}")
        if not authority or any(c in authority for c in " \t\r\n\x00"):
            raise LocalProtocolError(f"invalid :authority {authority!r}")
        block = hbone_hpack.encode_request(authority, hbone_state.check_headers(headers))
        stream_id = self._next_id
        self._next_id += 2
        self._highest_out = stream_id
        self._queue_headers(stream_id, block, end_stream=False)
        self._streams[stream_id] = self._new_stream()
        self._open += 1
        return stream_id

    # -- server side --

    def accept_tunnel(self, stream_id: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer ``:status 200``: the tunnel is established."""
        stream = self._transition(stream_id, _Op.ACCEPT)
        block = hbone_hpack.encode_response(200, hbone_state.check_headers(headers))
        self._queue_headers(stream_id, block, end_stream=False)
        stream.phase = _Phase.ESTABLISHED

    def reject_tunnel(
        self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer a non-200 status with END_STREAM, then RST_STREAM(NO_ERROR) so that the
        client need not finish its side (RFC 9113 section 8.1). The stream is gone afterwards.
        """
        if not 100 <= status <= 999 or 200 <= status <= 299:
            raise LocalProtocolError(f"reject_tunnel status {status} must be a non-2xx status")
        stream = self._transition(stream_id, _Op.REJECT)
        block = hbone_hpack.encode_response(status, hbone_state.check_headers(headers))
        self._queue_headers(stream_id, block, end_stream=True)
        stream.local_ended = True
        # Both sides ended: closed without a reset. Otherwise tell the client to stop.
        self._discard(stream_id, reset_code=None if stream.remote_ended else NO_ERROR)

    # -- both sides --

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control allows; returns how many bytes were taken.

        0 means the window is closed: wait for `WindowOpened`. Frames never exceed the peer's
        SETTINGS_MAX_FRAME_SIZE.
        """
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or stream.phase is not _ESTABLISHED
            or stream.local_ended
            or stream.closed
            or self._dead
        ):
            # Not the everyday case: let the transition table name what is wrong.
            stream = self._transition(stream_id, _Op.SEND)
        size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        window = stream.send_window if stream.send_window < self._send_conn else self._send_conn
        taken = size if size < window else window
        if taken <= 0:
            return 0
        frame = self._peer_max_frame
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
        if stream.local_ended or (stream.phase is not _ESTABLISHED and not self._client):
            return 0
        return max(0, min(self._send_conn, stream.send_window))

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM): the TCP FIN of the tunnel."""
        stream = self._transition(stream_id, _Op.END)
        self._out.append(_HEADER.pack(0, 0, _DATA, frames.END_STREAM, stream_id))
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
        stream = self._streams.get(stream_id) or self._find(stream_id)
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

    # -- receiving --

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Feed bytes read from the peer; returns the events they complete, in order."""
        if not self._initiated:
            raise LocalProtocolError("call initiate() before receive_data()")
        if self._dead:
            return []  # the connection is over; late bytes from the peer are irrelevant
        events: list[Event] = []
        self._read(data if isinstance(data, bytes) else bytes(data), events)
        return events

    def _read(self, data: bytes, events: list[Event]) -> None:
        """The frame reader: DATA payloads stream through, other frames are handled whole."""
        if self._rbuf:
            self._rbuf += data
            if len(self._rbuf) < self._need:
                return
            data = bytes(self._rbuf)
            self._rbuf = bytearray()
        offset = 0
        end = len(data)
        if self._preface_left:
            offset = self._check_preface(data)
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
            if end - offset < _HLEN:
                self._need = _HLEN
                break
            high, low, frame_type, flags, stream_id = _unpack_header(data, offset)
            length = high << 8 | low
            stream_id &= 0x7FFFFFFF
            if (
                frame_type != _DATA
                or length > max_frame
                or self._block is not None
                or not self._settings_seen
            ):
                self._check_frame_header(length, frame_type, flags, max_frame)
            if frame_type == _DATA and not flags & frames.PADDED:
                offset += _HLEN
                self._begin_data(stream_id, length, flags, events)
                if not length:
                    self._finish_data(events)
                continue
            if end - offset < _HLEN + length:
                self._need = _HLEN + length
                break
            payload = data[offset + _HLEN : offset + _HLEN + length]
            offset += _HLEN + length
            self._frame(frame_type, flags, stream_id, payload, events)
        if offset < end:
            self._rbuf = bytearray(data[offset:])

    def _check_preface(self, data: bytes) -> int:
        """Match the client preface (server side); returns how many bytes of `data` it took."""
        done = len(PREFACE) - self._preface_left
        n = min(self._preface_left, len(data))
        if data[:n] != PREFACE[done : done + n]:
            raise self._connection_error(PROTOCOL_ERROR, "invalid HTTP/2 client preface")
        self._preface_left -= n
        return n

    def _check_frame_header(self, length: int, frame_type: int, flags: int, max_frame: int) -> None:
        if length > max_frame:
            raise self._connection_error(
                FRAME_SIZE_ERROR,
                f"frame of type {frame_type} is {length} bytes, over SETTINGS_MAX_FRAME_SIZE "
                f"{max_frame}",
            )
        if not self._settings_seen and frame_type != frames.SETTINGS:
            raise self._connection_error(
                PROTOCOL_ERROR, f"the first frame is of type {frame_type}, not SETTINGS"
            )
        if self._block is not None and frame_type != _CONTINUATION:
            raise self._connection_error(
                PROTOCOL_ERROR, f"frame of type {frame_type} inside a header block"
            )
        fixed = _FIXED_LENGTH.get(frame_type)
        if fixed is not None and length != fixed:
            raise self._connection_error(
                FRAME_SIZE_ERROR, f"frame of type {frame_type} has {length} bytes, not {fixed}"
            )
        if frame_type == frames.SETTINGS and (length % 6 or (flags & frames.ACK and length)):
            raise self._connection_error(FRAME_SIZE_ERROR, f"SETTINGS frame of {length} bytes")
        if frame_type == frames.GOAWAY and length < 8:
            raise self._connection_error(FRAME_SIZE_ERROR, f"GOAWAY frame of {length} bytes")

    def _frame(
        self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        """One whole frame other than an unpadded DATA frame."""
        if frame_type == _HEADERS:
            self._on_headers(stream_id, flags, payload, events)
        elif frame_type == _CONTINUATION:
            self._on_continuation(stream_id, flags, payload, events)
        elif frame_type == _WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif frame_type == _DATA:
            self._padded_data(stream_id, flags, payload, events)
        elif frame_type == frames.RST_STREAM:
            self._on_rst_stream(stream_id, payload, events)
        elif frame_type == frames.SETTINGS:
            self._on_settings(stream_id, flags, payload, events)
        elif frame_type == frames.PING:
            self._on_ping(stream_id, flags, payload, events)
        elif frame_type == frames.GOAWAY:
            self._on_goaway(stream_id, payload, events)
        elif frame_type == frames.PRIORITY:
            if not stream_id:
                raise self._connection_error(PROTOCOL_ERROR, "PRIORITY frame on stream 0")
        elif frame_type == frames.PUSH_PROMISE:
            # We advertise ENABLE_PUSH 0 and a client never pushes (RFC 9113 section 8.4).
            raise self._connection_error(PROTOCOL_ERROR, "PUSH_PROMISE received")
        # Frames of unknown types are ignored (RFC 9113 section 4.1).

    # -- the data path (DATA and WINDOW_UPDATE) --

    def _new_stream(self) -> hbone_state.StreamState:
        return _StreamState(
            _Phase.REQUESTED,
            send_window=self._peer_initial_window,
            recv_window=self._stream_recv_initial,
        )

    def _begin_data(self, stream_id: int, length: int, flags: int, events: list[Event]) -> bool:
        """Account a DATA frame's `length` against the windows; True if its bytes are delivered.

        Sets up the streaming of its payload (`_deliver`, `_finish_data`) either way; bytes
        that are not delivered are credited back as they arrive.
        """
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
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended or stream.closed:
            if self._is_idle(stream_id):
                raise self._connection_error(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self._closed_stream_frame(stream_id, stream, events)
            return False  # `_deliver` credits the bytes back
        if self._client and stream.phase is not _Phase.ESTABLISHED:
            raise self._connection_error(
                PROTOCOL_ERROR, f"DATA on stream {stream_id} before its response"
            )
        stream.recv_window -= length
        if stream.recv_window < 0:
            # A stream error (RFC 9113 section 6.9): reset this stream, the others go on.
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return False
        self._data_end = bool(flags & frames.END_STREAM)
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
        """The current DATA frame is complete: act on its END_STREAM."""
        if self._data_end and self._data_live and self._data_sid in self._streams:
            self._end_remote(self._data_sid, events)
        self._data_end = self._data_live = False

    def _end_remote(self, stream_id: int, events: list[Event]) -> None:
        stream = self._streams[stream_id]
        stream.remote_ended = True
        events.append(StreamEnded(stream_id))
        self._settle(stream_id, stream)

    def _padded_data(self, stream_id: int, flags: int, payload: bytes, events: list[Event]) -> None:
        length = len(payload)
        data = frames.split_padding(payload)
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

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        increment = frames.parse_window_increment(payload)
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
            if self._is_idle(stream_id):
                raise self._connection_error(
                    PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}"
                )
            return  # a closed stream: may cross our END_STREAM or RST_STREAM, ignored
        if increment == 0 or stream.send_window + increment > _MAX_WINDOW:
            self._stream_error(
                stream_id, PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR, events
            )
            return
        stream.send_window += increment
        if not stream.local_ended and (stream.phase is _ESTABLISHED or self._client):
            events.append(WindowOpened(stream_id))

    def _credit(self, stream_id: int, stream: hbone_state.StreamState | None, nbytes: int) -> None:
        """`nbytes` of received DATA are done with: reopen the windows, in half-window batches
        (a WINDOW_UPDATE per read would cost a frame per frame)."""
        if nbytes <= 0:
            return
        self._recv_conn_credit += nbytes
        if self._recv_conn_credit >= self._conn_update_at:
            increment, self._recv_conn_credit = self._recv_conn_credit, 0
            self._recv_conn += increment
            self._out.append(frames.build_window_update(0, increment))
        if stream is None or stream.remote_ended or stream.closed:
            return  # the peer sends nothing more on it: no stream window to reopen
        stream.recv_credit += nbytes
        if stream.recv_credit >= self._stream_update_at:
            increment, stream.recv_credit = stream.recv_credit, 0
            stream.recv_window += increment
            self._out.append(frames.build_window_update(stream_id, increment))

    # -- errors --

    def _connection_error(self, code: int, message: str) -> RemoteProtocolError:
        """Queue GOAWAY(`code`), end the connection, return the error to raise."""
        debug = message.encode("utf-8", "replace")[:256]
        self._out.append(frames.build_goaway(self._highest_in, code, debug))
        self._die()
        return RemoteProtocolError(f"peer violated HTTP/2: {message}", error_code=code)

    def _stream_error(self, stream_id: int, code: int, events: list[Event]) -> None:
        """Reset a stream we track because the peer broke a rule on it; the others go on."""
        self._discard(stream_id, reset_code=code)
        events.append(StreamReset(stream_id, code, remote=False))

    def _send_reset(self, stream_id: int, code: int) -> None:
        self._out.append(frames.build_rst_stream(stream_id, code))
        memory = self._reset_by_us
        memory[stream_id] = None
        if len(memory) > MAX_RESET_MEMORY:
            del memory[next(iter(memory))]

    # -- helpers --

    def _is_outbound(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client

    def _is_idle(self, stream_id: int) -> bool:
        """Never opened by either side yet (RFC 9113 section 5.1)."""
        if self._is_outbound(stream_id):
            return stream_id > self._highest_out
        return stream_id > self._highest_in

    def _check_live(self) -> None:
        if not self._initiated:
            raise LocalProtocolError("call initiate() first")
        if self._dead:
            raise LocalProtocolError("the connection is closed")

    def _find(self, stream_id: int) -> hbone_state.StreamState | None:
        """The stream, None if it existed and is gone; raises if it never existed."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_id <= 0 or self._is_idle(stream_id):
            raise UnknownStreamError(stream_id)
        return None

    def _find_live(self, stream_id: int) -> hbone_state.StreamState:
        self._check_live()
        stream = self._find(stream_id)
        if stream is None:
            raise StreamStateError(stream_id, "the stream was reset, rejected or closed")
        return stream

    def _transition(self, stream_id: int, op: hbone_state.Op) -> hbone_state.StreamState:
        stream = self._find_live(stream_id)
        next_phase = hbone_state.TRANSITIONS.get((self._client, stream.phase, op))
        if next_phase is None:
            side = "client" if self._client else "server"
            phase = stream.phase.value
            raise StreamStateError(stream_id, f"{op.value} not allowed on a {side} stream {phase}")
        if stream.closed:
            raise StreamStateError(stream_id, f"{op.value} on a closed stream")
        if op in (_Op.SEND, _Op.END) and stream.local_ended:
            raise StreamStateError(stream_id, f"{op.value} after end_stream")
        return stream

    def _queue_headers(self, stream_id: int, block: bytes, *, end_stream: bool) -> None:
        self._out.append(
            frames.build_headers(
                stream_id, block, end_stream=end_stream, max_frame=self._peer_max_frame
            )
        )

    def _settle(self, stream_id: int, stream: hbone_state.StreamState) -> None:
        """Close the stream once both sides ended; drop it once all its data is consumed."""
        if stream.closed or not (stream.local_ended and stream.remote_ended):
            return
        stream.closed = True
        self._open -= 1
        if not stream.unconsumed:
            del self._streams[stream_id]

    def _discard(self, stream_id: int, reset_code: int | None) -> None:
        """Forget a stream now; reset it first (with `reset_code`) if it is still open."""
        stream = self._streams.pop(stream_id)
        if not stream.closed:
            self._open -= 1
            if reset_code is not None:
                self._send_reset(stream_id, reset_code)
        if stream.unconsumed:
            # The application will never consume these now: give the connection window back.
            self._credit(stream_id, None, stream.unconsumed)

    def _die(self) -> None:
        self._dead = True
        self._streams.clear()
        self._open = 0
        self._block = None
        self._rbuf = bytearray()
