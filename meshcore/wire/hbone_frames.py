"""Hand-rolled HTTP/2 DATA and WINDOW_UPDATE frames for HBONE's data path (RFC 9113 section 4).

Pure functions on bytes. `meshcore.wire.hbone` uses them to carry tunnel bytes without `h2`'s
per-frame state machine (perf-baselines: 3x the CPU per GB otherwise); every other frame type
still goes through `h2`.
"""

from __future__ import annotations

import dataclasses
from typing import Final

HEADER_LEN: Final = 9

# Frame types (RFC 9113 section 6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PUSH_PROMISE: Final = 0x5
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
END_STREAM: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8

MAX_WINDOW_INCREMENT: Final = 2**31 - 1
_STREAM_MASK: Final = 0x7FFFFFFF


@dataclasses.dataclass(frozen=True, slots=True)
class FrameHeader:
    length: int
    type: int
    flags: int
    stream_id: int


def parse_frame_header(buf: bytes | bytearray, offset: int = 0) -> FrameHeader:
    """The 9-byte header at `offset`; the reserved stream-id bit is ignored, as RFC 9113 says."""
    if len(buf) - offset < HEADER_LEN:
        raise ValueError(f"a frame header needs {HEADER_LEN} bytes, got {len(buf) - offset}")
    return FrameHeader(
        int.from_bytes(buf[offset : offset + 3], "big"),
        buf[offset + 3],
        buf[offset + 4],
        int.from_bytes(buf[offset + 5 : offset + 9], "big") & _STREAM_MASK,
    )


def build_frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return (
        length.to_bytes(3, "big")
        + bytes((frame_type, flags))
        + (stream_id & _STREAM_MASK).to_bytes(4, "big")
    )


def build_data_header(length: int, stream_id: int, *, end_stream: bool = False) -> bytes:
    """The header of an unpadded DATA frame carrying `length` bytes."""
    return build_frame_header(length, DATA, END_STREAM if end_stream else 0, stream_id)


def build_window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (stream 0 is the connection window)."""
    if not 1 <= increment <= MAX_WINDOW_INCREMENT:
        raise ValueError(f"WINDOW_UPDATE increment {increment} is outside 1..2**31-1")
    return build_frame_header(4, WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def parse_window_increment(payload: bytes | bytearray) -> int:
    """The increment of a WINDOW_UPDATE payload (reserved bit ignored); the payload is 4 bytes."""
    if len(payload) != 4:
        raise ValueError(f"WINDOW_UPDATE payload must be 4 bytes, got {len(payload)}")
    return int.from_bytes(payload, "big") & _STREAM_MASK


def split_padding(payload: bytes) -> bytes | None:
    """The data of a PADDED DATA payload; None when the padding is longer than the payload."""
    if not payload:
        return None
    pad = payload[0]
    if pad >= len(payload):
        return None
    return payload[1 : len(payload) - pad]
