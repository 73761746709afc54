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

Deviations from plain h2 (each one a documented h2 behaviour that breaks HBONE), all confined
to `_H2Connection`:
- h2 moves the whole connection to CLOSED on sending or receiving any GOAWAY, and clears the
  unsent output on receiving one (python-hyper/h2#1181). HBONE drains gracefully: after
  GOAWAY(NO_ERROR) streams up to its last-stream-id run to completion, so GOAWAY only stops new
  streams here; an error GOAWAY still kills the connection.
- h2 drops closed streams as a side effect of counting open ones, possibly in the middle of a
  read whose events still name them; we drop each one ourselves once its events are handled.
- h2 remembers 65,536 closed streams; per-stream memory must not grow with the tunnels carried.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack.exceptions
import hyperframe.exceptions
import hyperframe.frame

from meshcore.wire import hbone_headers
from meshcore.wire.hbone_events import ConnectionTerminated as ConnectionTerminated
from meshcore.wire.hbone_events import DataReceived as DataReceived
from meshcore.wire.hbone_events import Event as Event
from meshcore.wire.hbone_events import PingAcknowledged as PingAcknowledged
from meshcore.wire.hbone_events import RemoteSettingsChanged as RemoteSettingsChanged
from meshcore.wire.hbone_events import StreamEnded as StreamEnded
from meshcore.wire.hbone_events import StreamReset as StreamReset
from meshcore.wire.hbone_events import TunnelEstablished as TunnelEstablished
from meshcore.wire.hbone_events import TunnelRejected as TunnelRejected

# The events are part of this module's public surface.
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

Headers: TypeAlias = hbone_headers.Headers

# HTTP/2 error codes used here (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = hbone_headers.PROTOCOL_ERROR
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8

_MAX_STREAM_ID: Final = 2**31 - 1
_MAX_WINDOW: Final = 2**31 - 1
_DEFAULT_CONNECTION_WINDOW: Final = 65_535

# --- settings --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HboneSettings:
    """What we advertise to the peer (and, for a client, our own stream cap).

    Defaults are ztunnel's client settings; `server()` gives its server settings (the
    default for a server-side connection).
    """

    stream_window: int = 4 << 20  # initial stream receive window we advertise
    connection_window: int = 16 << 20  # connection receive window we advertise
    max_frame_size: int = 1 << 20  # SETTINGS_MAX_FRAME_SIZE we advertise
    max_concurrent_streams: int = 100  # client: our cap on streams we open; server: advertised
    max_header_list_size: int = 16 << 10  # client 16 KiB, server 64 KiB

    def __post_init__(self) -> None:
        limits = {
            "stream_window": (1, _MAX_WINDOW),
            "connection_window": (_DEFAULT_CONNECTION_WINDOW, _MAX_WINDOW),
            "max_frame_size": (1 << 14, (1 << 24) - 1),
            "max_concurrent_streams": (1, 2**32 - 1),
            "max_header_list_size": (1, 2**32 - 1),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidSettingsError(f"HboneSettings.{name}={value} is outside {low}..{high}")

    @classmethod
    def server(cls) -> HboneSettings:
        return cls(max_concurrent_streams=200, max_header_list_size=64 << 10)


# --- h2 with graceful GOAWAY -----------------------------------------------------------------

_CS = h2.connection.ConnectionState
_CI = h2.connection.ConnectionInputs


# h2's transitions, except that GOAWAY leaves an open connection open. HboneConnection enforces
# what GOAWAY means and forces CLOSED itself after an error GOAWAY or a protocol error.
_GRACEFUL_TRANSITIONS = {
    **h2.connection.H2ConnectionStateMachine._transitions,
    **{
        (state, goaway): (None, state)
        for state in (_CS.IDLE, _CS.CLIENT_OPEN, _CS.SERVER_OPEN)
        for goaway in (_CI.SEND_GOAWAY, _CI.RECV_GOAWAY)
    },
}


class _H2Connection(h2.connection.H2Connection):
    """`h2.H2Connection` with the fixes listed in the module docstring."""

    # Closed streams remembered so that late frames on them are handled as stream errors.
    # Frames in flight refer to streams closed within about one round trip; 1024 stream
    # closures per round trip is far beyond what one connection carries.
    MAX_CLOSED_STREAMS = 1024

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.state_machine._transitions = _GRACEFUL_TRANSITIONS
        self.terminated = False  # h2 queued a GOAWAY for a protocol error

    def _terminate_connection(self, error_code: h2.errors.ErrorCodes) -> None:
        self.terminated = True
        super()._terminate_connection(error_code)

    def _open_streams(self, remainder: int) -> int:
        # Count only; h2 also deletes closed streams here (see the module docstring).
        return sum(1 for sid, s in self.streams.items() if sid % 2 == remainder and s.open)

    def forget_stream(self, stream_id: int) -> None:
        """Drop a closed stream (h2 would keep it until its next O(streams) scan)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._closed_streams[stream_id] = stream.closed_by

    def drop_stream(self, stream_id: int, error_code: int) -> None:
        """Reset a stream unless a frame later in this read already closed it, and forget it."""
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.reset_stream(stream_id, error_code)
        self.forget_stream(stream_id)

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        events = self.state_machine.process_input(_CI.RECV_GOAWAY)
        terminated = h2.events.ConnectionTerminated()
        terminated.error_code = frame.error_code
        terminated.last_stream_id = frame.last_stream_id
        terminated.additional_data = frame.additional_data or None
        return [], [*events, terminated]


# Everything the h2 stack raises while parsing hostile input.
_H2_ERRORS = (
    h2.exceptions.H2Error,
    hpack.exceptions.HPACKError,
    hyperframe.exceptions.HyperframeError,
)


# --- per-stream state ------------------------------------------------------------------------


class _Phase(enum.Enum):
    REQUESTED = "requested"  # CONNECT sent (client) or received (server), no response yet
    ESTABLISHED = "established"  # 2xx sent or received: bytes flow


class _Op(enum.Enum):
    ACCEPT = "accept_tunnel"
    REJECT = "reject_tunnel"
    SEND = "send_data"
    END = "end_stream"


# The one transition table: which local operations each (side, phase) allows, and the phase
# they lead to. Rejection, resets and full closure remove the stream instead of moving it.
_TRANSITIONS: Final[dict[tuple[bool, _Phase, _Op], _Phase]] = {
    # (client_side, phase, op) -> next phase
    (True, _Phase.ESTABLISHED, _Op.SEND): _Phase.ESTABLISHED,
    (True, _Phase.ESTABLISHED, _Op.END): _Phase.ESTABLISHED,
    (False, _Phase.REQUESTED, _Op.ACCEPT): _Phase.ESTABLISHED,
    (False, _Phase.REQUESTED, _Op.REJECT): _Phase.REQUESTED,
    (False, _Phase.ESTABLISHED, _Op.SEND): _Phase.ESTABLISHED,
    (False, _Phase.ESTABLISHED, _Op.END): _Phase.ESTABLISHED,
}


@dataclasses.dataclass(slots=True, eq=False)
class _Stream:
    h2_stream: h2.stream.H2Stream
    phase: _Phase
    local_ended: bool = False
    remote_ended: bool = False
    closed: bool = False  # closed in HTTP/2 terms; kept only until unconsumed reaches 0
    unconsumed: int = 0  # flow-controlled bytes delivered in DataReceived, not yet consumed()


def _check_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    for name, value in headers:
        problem = hbone_headers.find_field_problem(name, value)
        if problem is not None:
            raise LocalProtocolError(f"header {name!r}: {value!r}: {problem}")
    return list(headers)


# --- the connection --------------------------------------------------------------------------


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels, client or server side."""

    def __init__(self, *, client_side: bool, settings: HboneSettings | None = None) -> None:
        self._client = client_side
        if settings is None:
            settings = HboneSettings() if client_side else HboneSettings.server()
        self._settings = settings
        self._h2 = _H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        self._streams: dict[int, _Stream] = {}
        self._open = 0
        self._initiated = False
        self._dead = False  # error GOAWAY sent/received or protocol error: nothing more flows
        self._goaway_sent: int | None = None  # last-stream-id of the GOAWAY we sent
        self._goaway_received: int | None = None  # last-stream-id of the GOAWAY we received
        self._last_processed = 0  # highest peer-opened stream delivered as TunnelRequested
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
        return self._h2.data_to_send()

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
        fields = [(":method", "CONNECT"), (":authority", authority), *_check_headers(headers)]
        conn = self._h2
        stream_id = conn.get_next_available_stream_id()
        try:
            conn.send_headers(stream_id, fields)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"cannot open a tunnel to {authority!r}: {exc}") from exc
        self._streams[stream_id] = _Stream(conn.streams[stream_id], _Phase.REQUESTED)
        self._open += 1
        return stream_id

    # -- server side --

    def accept_tunnel(self, stream_id: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer ``:status 200``: the tunnel is established."""
        stream = self._transition(stream_id, _Op.ACCEPT)
        self._send_headers(stream_id, [(":status", "200"), *_check_headers(headers)], False)
        stream.phase = _Phase.ESTABLISHED

    def reject_tunnel(
        self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer a non-200 status with END_STREAM, then RST_STREAM(NO_ERROR) so that the
        client need not finish its side (RFC 9113 section 8.1). The stream is gone afterwards.
        """
        if not 100 <= status <= 999 or 200 <= status <= 299:
            raise LocalProtocolError(f"reject_tunnel status {status} must be a non-2xx status")
        self._transition(stream_id, _Op.REJECT)
        self._send_headers(stream_id, [(":status", str(status)), *_check_headers(headers)], True)
        self._discard(stream_id, reset_code=NO_ERROR)

    # -- both sides --

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control allows; returns how many bytes were taken.

        0 means the window is closed: wait for `WindowOpened`. Frames never exceed the peer's
        SETTINGS_MAX_FRAME_SIZE.
        """
        stream = self._transition(stream_id, _Op.SEND)
        conn = self._h2
        size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        window = stream.h2_stream.outbound_flow_control_window
        taken = min(size, conn.outbound_flow_control_window, window)
        if taken <= 0:
            return 0
        frame = conn.max_outbound_frame_size
        try:
            if taken == size and taken <= frame and isinstance(data, bytes):
                conn.send_data(stream_id, data)  # the common case: no slicing at all
            else:
                view = memoryview(data)
                if view.ndim != 1 or view.itemsize != 1:
                    view = view.cast("B")
                for offset in range(0, taken, frame):
                    conn.send_data(stream_id, view[offset : min(offset + frame, taken)])
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"stream {stream_id}: send failed: {exc}") from exc
        return taken

    def send_window(self, stream_id: int) -> int:
        """How many bytes `send_data` would take now (0 if the stream cannot send)."""
        stream = self._find_live(stream_id)
        if stream.local_ended or stream.phase is not _Phase.ESTABLISHED:
            return 0
        window = stream.h2_stream.outbound_flow_control_window
        return max(0, min(self._h2.outbound_flow_control_window, window))

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM): the TCP FIN of the tunnel."""
        stream = self._transition(stream_id, _Op.END)
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

        Reopens the windows in batches (h2 sends WINDOW_UPDATE once half a window is consumed).
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
        self._h2.acknowledge_received_data(nbytes, stream_id)
        if stream.closed and not stream.unconsumed:
            del self._streams[stream_id]

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Feed bytes read from the peer; returns the events they complete, in order."""
        if not self._initiated:
            raise LocalProtocolError("call initiate() before receive_data()")
        if self._dead:
            return []  # the connection is over; late bytes from the peer are irrelevant
        try:
            h2_events = self._h2.receive_data(data)
        except _H2_ERRORS as exc:
            raise self._remote_error(exc) from exc
        return self._translate(h2_events)

    def _translate(self, h2_events: list[h2.events.Event]) -> list[Event]:
        events: list[Event] = []
        dispatch = self._dispatch
        for h2_event in h2_events:
            handler = dispatch.get(type(h2_event))
            if handler is not None:
                handler(h2_event, events)
                if self._dead:
                    break
        return events

    # -- event translation (h2 event -> our events) --

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        if self._goaway_sent is not None and sid > self._goaway_sent:
            # Opened after our GOAWAY and above its last-stream-id: refuse, the client may retry.
            self._h2.drop_stream(sid, REFUSED_STREAM)
            return
        pseudo, headers = hbone_headers.split_header_block(ev.headers)
        self._streams[sid] = _Stream(self._h2.streams[sid], _Phase.REQUESTED)
        self._open += 1
        self._last_processed = sid
        out.append(
            TunnelRequested(sid, pseudo.get(":method", ""), pseudo.get(":authority", ""), headers)
        )

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            return
        pseudo, headers = hbone_headers.split_header_block(ev.headers)
        status_text = pseudo.get(":status", "")
        if len(status_text) != 3 or not status_text.isdigit():
            # A malformed response is a stream error (RFC 9113 section 8.1.1).
            self._discard(sid, reset_code=PROTOCOL_ERROR)
            out.append(StreamReset(sid, PROTOCOL_ERROR, remote=False))
            return
        status = int(status_text)
        if 200 <= status <= 299:
            stream.phase = _Phase.ESTABLISHED
            out.append(TunnelEstablished(sid, headers))
        else:
            # Terminal for the caller. Reset unless the peer's frames already closed the stream.
            self._discard(sid, reset_code=CANCEL)
            out.append(TunnelRejected(sid, status, headers))

    def _on_data(self, ev: h2.events.DataReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        data = ev.data
        flow = ev.flow_controlled_length
        stream = self._streams.get(sid)
        if stream is None:
            # A stream we already dropped (rejected, refused): credit the connection window.
            if flow:
                self._h2.acknowledge_received_data(flow, sid)
            return
        if data:
            stream.unconsumed += flow
            out.append(DataReceived(sid, data, flow))
        elif flow:
            # Padding alone: nothing for the application to consume, so credit it right here.
            self._h2.acknowledge_received_data(flow, sid)

    def _on_stream_ended(self, ev: h2.events.StreamEnded, out: list[Event]) -> None:
        stream = self._streams.get(ev.stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        out.append(StreamEnded(ev.stream_id))
        self._settle(ev.stream_id, stream)

    def _on_stream_reset(self, ev: h2.events.StreamReset, out: list[Event]) -> None:
        sid = ev.stream_id
        if sid not in self._streams:
            return
        self._discard(sid, reset_code=None)
        out.append(StreamReset(sid, int(ev.error_code), remote=ev.remote_reset))

    def _on_window_updated(self, ev: h2.events.WindowUpdated, out: list[Event]) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if not sid or (stream and not stream.local_ended and stream.phase is _Phase.ESTABLISHED):
            out.append(WindowOpened(sid or None))

    def _on_remote_settings(self, ev: h2.events.RemoteSettingsChanged, out: list[Event]) -> None:
        changed = ev.changed_settings
        codes = h2.settings.SettingCodes
        streams = changed.get(codes.MAX_CONCURRENT_STREAMS)
        out.append(RemoteSettingsChanged(streams.new_value if streams is not None else None))
        window = changed.get(codes.INITIAL_WINDOW_SIZE)
        if window is not None and window.new_value > (window.original_value or 0):
            # Every stream's send window grew by the difference.
            out.append(WindowOpened(None))

    def _on_ping_ack(self, ev: h2.events.PingAckReceived, out: list[Event]) -> None:
        out.append(PingAcknowledged(bytes(ev.ping_data)))

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        code = int(ev.error_code or 0)
        last = ev.last_stream_id or 0
        out.append(ConnectionTerminated(code, last, ev.additional_data or b""))
        if code != NO_ERROR:
            self._die()
            return
        if self._goaway_received is None or last < self._goaway_received:
            self._goaway_received = last
        # Our streams above the peer's last-stream-id were never processed: refused, retryable.
        refused = [sid for sid in self._streams if self._is_outbound(sid) and sid > last]
        for sid in sorted(refused):
            self._discard(sid, reset_code=CANCEL)
            out.append(StreamReset(sid, REFUSED_STREAM, remote=True))

    def _on_push(self, ev: h2.events.PushedStreamReceived, out: list[Event]) -> None:
        # Only possible before the peer has seen ENABLE_PUSH=0; HBONE never pushes.
        if ev.pushed_stream_id is not None:
            self._h2.drop_stream(ev.pushed_stream_id, REFUSED_STREAM)

    # -- helpers --

    def _is_outbound(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client

    def _check_live(self) -> None:
        if not self._initiated:
            raise LocalProtocolError("call initiate() first")
        if self._dead:
            raise LocalProtocolError("the connection is closed")

    def _find(self, stream_id: int) -> _Stream | None:
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

    def _find_live(self, stream_id: int) -> _Stream:
        self._check_live()
        stream = self._find(stream_id)
        if stream is None:
            raise StreamStateError(stream_id, "the stream was reset, rejected or closed")
        return stream

    def _transition(self, stream_id: int, op: _Op) -> _Stream:
        stream = self._find_live(stream_id)
        next_phase = _TRANSITIONS.get((self._client, stream.phase, op))
        if next_phase is None:
            side = "client" if self._client else "server"
            phase = stream.phase.value
            raise StreamStateError(stream_id, f"{op.value} not allowed on a {side} stream {phase}")
        if op in (_Op.SEND, _Op.END) and stream.local_ended:
            raise StreamStateError(stream_id, f"{op.value} after end_stream")
        return stream

    def _send_headers(self, stream_id: int, fields: list[tuple[str, str]], end: bool) -> None:
        try:
            self._h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.H2Error as exc:
            raise LocalProtocolError(f"stream {stream_id}: cannot send headers: {exc}") from exc

    def _settle(self, stream_id: int, stream: _Stream) -> None:
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
            conn.acknowledge_received_data(stream.unconsumed, stream_id)

    def _die(self) -> None:
        self._dead = True
        self._h2.state_machine.state = _CS.CLOSED
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
