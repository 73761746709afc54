"""State of the HBONE codec (`meshcore.wire.hbone`): the settings we advertise, HTTP/2 error
codes, and the per-stream state with its transition table."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Final

from meshcore.wire import hbone_headers

# HTTP/2 error codes (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = hbone_headers.PROTOCOL_ERROR
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_CONNECTION_WINDOW: Final = 65_535
DEFAULT_STREAM_WINDOW: Final = 65_535
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 14  # also the least a peer may advertise
MAX_FRAME_SIZE: Final = (1 << 24) - 1

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
            "max_frame_size": (DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
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
    # A client may send before the response (optimistic data): the server holds the bytes
    # until it has connected upstream and accepted, and drops them if it rejects.
    (True, Phase.REQUESTED, Op.SEND): Phase.REQUESTED,
    (True, Phase.REQUESTED, Op.END): Phase.REQUESTED,
    (True, Phase.ESTABLISHED, Op.SEND): Phase.ESTABLISHED,
    (True, Phase.ESTABLISHED, Op.END): Phase.ESTABLISHED,
    (False, Phase.REQUESTED, Op.ACCEPT): Phase.ESTABLISHED,
    (False, Phase.REQUESTED, Op.REJECT): Phase.REQUESTED,
    (False, Phase.ESTABLISHED, Op.SEND): Phase.ESTABLISHED,
    (False, Phase.ESTABLISHED, Op.END): Phase.ESTABLISHED,
}


@dataclasses.dataclass(slots=True, eq=False)
class StreamState:
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
