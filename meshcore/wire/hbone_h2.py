"""The h2 layer under the HBONE codec (`meshcore.wire.hbone`): the settings we advertise, h2
with the changes HBONE needs, and the per-stream state and its transition table.

Deviations from plain h2 (each one a documented h2 behaviour that breaks HBONE), all confined
to `GracefulH2Connection`:
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
from collections.abc import Sequence
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hpack.exceptions
import hyperframe.exceptions
import hyperframe.frame

from meshcore.wire import hbone_headers

# HTTP/2 error codes (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = hbone_headers.PROTOCOL_ERROR
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_CONNECTION_WINDOW: Final = 65_535
DEFAULT_STREAM_WINDOW: Final = 65_535

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
            "stream_window": (1, MAX_WINDOW),
            "connection_window": (DEFAULT_CONNECTION_WINDOW, MAX_WINDOW),
            "max_frame_size": (1 << 14, (1 << 24) - 1),
            "max_concurrent_streams": (1, 2**32 - 1),
            "max_header_list_size": (1, 2**32 - 1),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise hbone_headers.InvalidSettingsError(
                    f"HboneSettings.{name}={value} is outside {low}..{high}"
                )

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


class GracefulH2Connection(h2.connection.H2Connection):
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
H2_ERRORS = (
    h2.exceptions.H2Error,
    hpack.exceptions.HPACKError,
    hyperframe.exceptions.HyperframeError,
)


# --- per-stream state ------------------------------------------------------------------------


class Phase(enum.Enum):
    REQUESTED = "requested"  # CONNECT sent (client) or received (server), no response yet
    ESTABLISHED = "established"  # 2xx sent or received: bytes flow


class Op(enum.Enum):
    ACCEPT = "accept_tunnel"
    REJECT = "reject_tunnel"
    SEND = "send_data"
    END = "end_stream"


# The one transition table: which local operations each (side, phase) allows, and the phase
# they lead to. Rejection, resets and full closure remove the stream instead of moving it.
TRANSITIONS: Final[dict[tuple[bool, Phase, Op], Phase]] = {
    # (client_side, phase, op) -> next phase
    (True, Phase.ESTABLISHED, Op.SEND): Phase.ESTABLISHED,
    (True, Phase.ESTABLISHED, Op.END): Phase.ESTABLISHED,
    (False, Phase.REQUESTED, Op.ACCEPT): Phase.ESTABLISHED,
    (False, Phase.REQUESTED, Op.REJECT): Phase.REQUESTED,
    (False, Phase.ESTABLISHED, Op.SEND): Phase.ESTABLISHED,
    (False, Phase.ESTABLISHED, Op.END): Phase.ESTABLISHED,
}


@dataclasses.dataclass(slots=True, eq=False)
class StreamState:
    h2_stream: h2.stream.H2Stream
    phase: Phase
    local_ended: bool = False
    remote_ended: bool = False
    closed: bool = False  # closed in HTTP/2 terms; kept only until unconsumed reaches 0
    unconsumed: int = 0  # flow-controlled bytes delivered in DataReceived, not yet consumed()
    send_window: int = 0  # what the peer lets us send on this stream (may go negative)
    recv_window: int = 0  # what we let the peer send; below 0 is a flow-control violation
    recv_credit: int = 0  # consumed, not yet announced in a WINDOW_UPDATE


def check_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    for name, value in headers:
        problem = hbone_headers.find_field_problem(name, value)
        if problem is not None:
            raise hbone_headers.LocalProtocolError(f"header {name!r}: {value!r}: {problem}")
    return list(headers)
