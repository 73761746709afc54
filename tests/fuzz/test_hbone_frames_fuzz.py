"""Hypothesis on HBONE's frame reader (DATA and WINDOW_UPDATE streamed through): hostile
frames on an open tunnel only raise RemoteProtocolError, and how the bytes are cut into reads
never changes what the application sees."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from meshcore.wire import hbone, hbone_frames
from tests.fuzz.test_hbone_fuzz import FUZZ, _feed_hostile, _split
from tests.protocol.test_hbone_datapath import _merge, _stock_client_open

_OPEN = _stock_client_open(1)  # preface, SETTINGS, HEADERS(CONNECT) on stream 1


def _server() -> hbone.HboneConnection:
    conn = hbone.HboneConnection(
        client_side=False,
        settings=hbone.HboneSettings(stream_window=70_000, max_frame_size=1 << 14),
    )
    conn.initiate()
    conn.data_to_send()
    return conn


_data_path_frame = st.tuples(
    st.sampled_from([0x0, 0x0, 0x0, 0x8, 0x8, 0x1, 0x3, 0x4, 0x9]),  # mostly DATA, WINDOW_UPDATE
    st.integers(0, 255),
    st.sampled_from([0, 1, 1, 1, 3, 0x8000_0001]),
    st.binary(max_size=300),
    st.integers(-2, 2),  # a length that may lie about the payload
)


@FUZZ
@given(
    parts=st.lists(_data_path_frame, max_size=16), cuts=st.lists(st.integers(0, 8000), max_size=6)
)
def test_hostile_data_path_frames_only_raise_remote_protocol_error(
    parts: list[tuple[int, int, int, bytes, int]], cuts: list[int]
) -> None:
    body = b"".join(
        max(0, len(payload) + skew).to_bytes(3, "big")
        + bytes([ftype, flags])
        + struct.pack(">I", sid)
        + payload
        for ftype, flags, sid, payload, skew in parts
    )
    _feed_hostile(_server(), _split(_OPEN + body, cuts))


_valid_frame = st.one_of(
    st.tuples(st.just("data"), st.binary(max_size=2000), st.none() | st.integers(0, 255)),
    st.tuples(st.just("update"), st.just(b""), st.integers(1, 1 << 20)),
)


@FUZZ
@given(
    parts=st.lists(_valid_frame, max_size=20),
    end=st.booleans(),
    cuts=st.lists(st.integers(0, 60_000), max_size=10),
)
def test_read_boundaries_never_change_the_events(
    parts: list[tuple[str, bytes, int | None]], end: bool, cuts: list[int]
) -> None:
    body = bytearray()
    sent = bytearray()
    for kind, payload, extra in parts:
        if kind == "update":
            assert extra is not None
            body += hbone_frames.build_window_update(1, extra)
        elif extra is None:
            body += hbone_frames.build_data_header(len(payload), 1) + payload
            sent += payload
        else:
            framed = bytes([extra]) + payload + bytes(extra)
            body += hbone_frames.build_frame_header(len(framed), 0x0, 0x8, 1) + framed
            sent += payload
    if end:
        body += hbone_frames.build_data_header(0, 1, end_stream=True)
    wire = _OPEN + bytes(body)

    def feed(pieces: list[bytes]) -> list[hbone.Event]:
        conn = _server()
        events: list[hbone.Event] = []
        for piece in pieces:
            events += conn.receive_data(piece)
        return _merge(events)

    whole = feed([wire])
    assert feed(_split(wire, cuts)) == whole
    got = b"".join(e.data for e in whole if isinstance(e, hbone.DataReceived))
    assert got == bytes(sent)
    assert (hbone.StreamEnded(1) in whole) == end


@given(
    length=st.integers(0, (1 << 24) - 1),
    ftype=st.integers(0, 255),
    flags=st.integers(0, 255),
    sid=st.integers(0, 2**31 - 1),
)
def test_frame_header_round_trips(length: int, ftype: int, flags: int, sid: int) -> None:
    header = hbone_frames.build_frame_header(length, ftype, flags, sid)
    assert len(header) == hbone_frames.HEADER_LEN
    parsed = hbone_frames.parse_frame_header(b"junk" + header, 4)
    assert parsed == hbone_frames.FrameHeader(length, ftype, flags, sid)
