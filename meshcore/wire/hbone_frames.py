"""HTTP/2 frames for HBONE (RFC 9113 section 4 and 6): constants, builders and small parsers.

Pure functions on bytes; `meshcore.wire.hbone` builds every frame it sends with them and parses
every frame it receives with the parsers here. Builders trust their caller (the codec checks
stream states and values first) except where a value would not fit its field.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from typing import Final

HEADER_LEN: Final = 9

# Frame types (RFC 9113 section 6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
END_STREAM: Final = 0x1
ACK: Final = 0x1  # SETTINGS and PING
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# SETTINGS parameters (RFC 9113 section 6.5.2, RFC 8441).
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL: Final = 0x8

MAX_WINDOW_INCREMENT: Final = 2**31 - 1
_STREAM_MASK: Final = 0x7FFFFFFF
# The 9-byte frame header: length as 16 + 8 bits, type, flags, stream id (reserved bit included).
HEADER: Final = struct.Struct(">HBBBI")
_SETTING: Final = struct.Struct(">HI")
_TWO_WORDS: Final = struct.Struct(">II")


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
    high, low, frame_type, flags, stream_id = HEADER.unpack_from(buf, offset)
    return FrameHeader(high << 8 | low, frame_type, flags, stream_id & _STREAM_MASK)


def build_frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    if not 0 <= length < 1 << 24:
        raise ValueError(f"frame length {length} does not fit 24 bits")
    return HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id & _STREAM_MASK)


def build_data_header(length: int, stream_id: int, *, end_stream: bool = False) -> bytes:
    """The header of an unpadded DATA frame carrying `length` bytes."""
    return build_frame_header(length, DATA, END_STREAM if end_stream else 0, stream_id)


def build_window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (stream 0 is the connection window)."""
    if not 1 <= increment <= MAX_WINDOW_INCREMENT:
        raise ValueError(f"WINDOW_UPDATE increment {increment} is outside 1..2**31-1")
    return build_frame_header(4, WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def build_settings(values: Iterable[tuple[int, int]]) -> bytes:
    payload = b"".join(_SETTING.pack(code, value) for code, value in values)
    return build_frame_header(len(payload), SETTINGS, 0, 0) + payload


def build_settings_ack() -> bytes:
    return build_frame_header(0, SETTINGS, ACK, 0)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """(code, value) pairs in order; the payload length is a multiple of 6 (checked by caller)."""
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def build_ping(opaque: bytes, *, ack: bool = False) -> bytes:
    return build_frame_header(8, PING, ACK if ack else 0, 0) + opaque


def build_goaway(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    payload = _TWO_WORDS.pack(last_stream_id & _STREAM_MASK, error_code) + debug
    return build_frame_header(len(payload), GOAWAY, 0, 0) + payload


def parse_goaway(payload: bytes) -> tuple[int, int, bytes]:
    """(last stream id, error code, debug data) of a GOAWAY payload of at least 8 bytes."""
    last, code = _TWO_WORDS.unpack_from(payload)
    return last & _STREAM_MASK, code, payload[8:]


def build_rst_stream(stream_id: int, error_code: int) -> bytes:
    return build_frame_header(4, RST_STREAM, 0, stream_id) + error_code.to_bytes(4, "big")


def build_headers(stream_id: int, block: bytes, *, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS carrying `block`, followed by CONTINUATION frames when it exceeds `max_frame`."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return build_frame_header(len(block), HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [build_frame_header(len(parts[0]), HEADERS, flags, stream_id), parts[0]]
    for i, part in enumerate(parts[1:], start=2):
        last = END_HEADERS if i == len(parts) else 0
        out += [build_frame_header(len(part), CONTINUATION, last, stream_id), part]
    return b"".join(out)


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
