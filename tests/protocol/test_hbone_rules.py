"""The HTTP/2 rules HBONE's own frame layer enforces beyond the data path (RFC 9113, RFC 7541):
the preface, SETTINGS first, header blocks across CONTINUATION frames, malformed requests and
responses, HPACK errors, refused streams, push. Peers are stock `h2` or hand-built frames."""

from __future__ import annotations

import dataclasses

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from meshcore.wire import hbone, hbone_frames
from tests.protocol.test_hbone import AUTHORITY, GOAWAY, PREFACE, RST_STREAM, frames, of_type
from tests.protocol.test_hbone_datapath import StockPair

PROTOCOL_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x1, 0x7, 0x9
HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS = 0x1, 0x9, 0x5, 0x4


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return hbone_frames.build_frame_header(len(payload), ftype, flags, sid) + payload


def _server(**settings: int) -> hbone.HboneConnection:
    """Our server after the client preface and an empty SETTINGS frame."""
    base = hbone.HboneSettings.server()
    ours = hbone.HboneConnection(client_side=False, settings=dataclasses.replace(base, **settings))
    ours.initiate()
    ours.data_to_send()
    assert ours.receive_data(PREFACE + _frame(SETTINGS, 0, 0, b"")) == [
        hbone.RemoteSettingsChanged(None)
    ]
    ours.data_to_send()
    return ours


def _goaway_code(conn: hbone.HboneConnection) -> int:
    payloads = [p for t, _f, _s, p in frames(conn.data_to_send()) if t == GOAWAY]
    assert len(payloads) == 1
    return int.from_bytes(payloads[0][4:8], "big")


def _rst_codes(data: bytes) -> dict[int, int]:
    return {s: int.from_bytes(p, "big") for t, _f, s, p in frames(data) if t == RST_STREAM}


def _block(fields: list[tuple[bytes, bytes]]) -> bytes:
    import hpack

    return bytes(hpack.Encoder().encode(fields))


def _connect_block(authority: bytes = AUTHORITY.encode()) -> bytes:
    return _block([(b":method", b"CONNECT"), (b":authority", authority)])


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n", PROTOCOL_ERROR),
        (PREFACE + _frame(0x6, 0, 0, b"12345678"), PROTOCOL_ERROR),  # PING before SETTINGS
        (PREFACE + _frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), 0x3),  # window > 2**31-1
        (PREFACE + _frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x10\x00"), PROTOCOL_ERROR),  # 4 KiB
        (PREFACE + _frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), PROTOCOL_ERROR),  # push 2
        (PREFACE + _frame(SETTINGS, 0, 0, b"\x00\x02\x00"), 0x6),  # not a multiple of 6
        (PREFACE + _frame(SETTINGS, 0x1, 0, b""), PROTOCOL_ERROR),  # ACK before SETTINGS
    ],
    ids=[
        "bad-preface",
        "ping-first",
        "window-too-big",
        "frame-too-small",
        "push-2",
        "settings-size",
        "ack-first",
    ],
)
def test_preface_and_settings_errors_end_the_connection(data: bytes, code: int) -> None:
    ours = hbone.HboneConnection(client_side=False)
    ours.initiate()
    ours.data_to_send()
    with pytest.raises(hbone.RemoteProtocolError) as err:
        ours.receive_data(data)
    assert err.value.error_code == code
    assert _goaway_code(ours) == code
    assert ours.is_closed


def test_a_request_split_over_continuation_frames_arrives_whole() -> None:
    ours = _server()
    block = _block(
        [(b":method", b"CONNECT"), (b":authority", AUTHORITY.encode()), (b"baggage", b"k=v" * 9000)]
    )
    third = len(block) // 3
    pieces = [block[:third], block[third : 2 * third], block[2 * third :]]
    wire = (
        _frame(HEADERS, 0, 1, pieces[0])
        + _frame(CONTINUATION, 0, 1, pieces[1])
        + _frame(CONTINUATION, 0x4, 1, pieces[2])
    )
    events = [e for i in range(0, len(wire), 1000) for e in ours.receive_data(wire[i : i + 1000])]
    assert events == [hbone.TunnelRequested(1, "CONNECT", AUTHORITY, (("baggage", "k=v" * 9000),))]


def test_our_big_header_block_is_split_at_the_peers_frame_size() -> None:
    pair = StockPair.start(our_side_client=True)
    sid = pair.ours.open_tunnel(AUTHORITY, [("baggage", "x" * 40_000)])
    wire = pair.ours.data_to_send()
    types = [t for t, *_ in frames(wire) if t in (HEADERS, CONTINUATION)]
    assert types == [HEADERS, CONTINUATION, CONTINUATION]
    requests = [
        e for e in pair.theirs.receive_data(wire) if isinstance(e, h2.events.RequestReceived)
    ]
    assert requests[0].stream_id == sid
    assert (b"baggage", b"x" * 40_000) in requests[0].headers


@pytest.mark.parametrize(
    "wire",
    [
        _frame(HEADERS, 0, 1, _connect_block()) + _frame(0x6, 0, 0, b"12345678"),
        _frame(CONTINUATION, 0x4, 1, b""),
        _frame(HEADERS, 0, 1, b"") + _frame(CONTINUATION, 0x4, 3, b""),
        _frame(PUSH_PROMISE, 0x4, 1, b"\x00\x00\x00\x02"),
        _frame(HEADERS, 0x4, 2, _connect_block()),  # a server never receives even streams
    ],
    ids=["ping-inside-block", "stray-continuation", "continuation-other-stream", "push", "even"],
)
def test_header_block_framing_errors_end_the_connection(wire: bytes) -> None:
    ours = _server()
    with pytest.raises(hbone.RemoteProtocolError) as err:
        ours.receive_data(wire)
    assert err.value.error_code == PROTOCOL_ERROR
    assert _goaway_code(ours) == PROTOCOL_ERROR


def test_an_endless_continuation_is_cut_off() -> None:
    ours = _server(max_header_list_size=1000, max_frame_size=1 << 14)
    ours.receive_data(_frame(HEADERS, 0, 1, b"\x00" * 1000))
    ours.receive_data(_frame(CONTINUATION, 0, 1, b"\x00" * 900))  # 1,900: still allowed
    with pytest.raises(
        hbone.RemoteProtocolError, match="header block on stream 1 reached 2000 bytes"
    ):
        ours.receive_data(_frame(CONTINUATION, 0, 1, b"\x00" * 100))
    assert _goaway_code(ours) == PROTOCOL_ERROR


def test_an_hpack_error_is_a_compression_error() -> None:
    ours = _server()
    with pytest.raises(hbone.RemoteProtocolError) as err:
        ours.receive_data(_frame(HEADERS, 0x4, 1, b"\xff\xff\xff\xff\x0f"))  # index far out
    assert err.value.error_code == COMPRESSION_ERROR
    assert _goaway_code(ours) == COMPRESSION_ERROR


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"CONNECT")],  # no authority
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
        [(b":authority", b"a:1")],  # no method
        [(b":method", b"CONNECT"), (b"x", b"1"), (b":authority", b"a:1")],  # pseudo after regular
        [(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", b"a:1")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":status", b"200")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"Upper", b"1")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"connection", b"close")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"te", b"gzip")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x", b"a\nb")],
        [(b":method", b"GET"), (b":authority", b"a:1"), (b":scheme", b"https")],  # no path
    ],
    ids=[
        "no-authority",
        "connect-with-path",
        "no-method",
        "pseudo-after-regular",
        "duplicate-pseudo",
        "response-pseudo",
        "uppercase",
        "connection-specific",
        "te",
        "newline",
        "get-without-path",
    ],
)
def test_a_malformed_request_is_refused_alone(fields: list[tuple[bytes, bytes]]) -> None:
    ours = _server()
    assert ours.receive_data(_frame(HEADERS, 0x4, 1, _block(fields))) == []
    assert _rst_codes(ours.data_to_send()) == {1: PROTOCOL_ERROR}
    # The connection goes on: the next, well-formed request is delivered.
    events = ours.receive_data(_frame(HEADERS, 0x4, 3, _connect_block()))
    assert events == [hbone.TunnelRequested(3, "CONNECT", AUTHORITY, ())]
    assert ours.open_streams == 1


def test_requests_over_our_stream_limit_are_refused_and_retryable() -> None:
    ours = _server(max_concurrent_streams=2)
    wire = b"".join(_frame(HEADERS, 0x4, sid, _connect_block()) for sid in (1, 3, 5))
    events = ours.receive_data(wire)
    assert [e.stream_id for e in of_type(events, hbone.TunnelRequested)] == [1, 3]
    assert _rst_codes(ours.data_to_send()) == {5: REFUSED_STREAM}
    # Data the client sent before it saw the refusal is dropped without another reply.
    assert ours.receive_data(_frame(0x0, 0, 5, b"late")) == []
    assert _rst_codes(ours.data_to_send()) == {}


@pytest.mark.parametrize(
    ("fields", "end_stream"),
    [
        ([(b":status", b"2000")], False),
        ([(b":status", b"200"), (b":method", b"GET")], False),
        ([(b":status", b"101")], False),
        ([(b":status", b"103")], True),
    ],
    ids=["four-digits", "request-pseudo", "switching-protocols", "informational-end"],
)
def test_a_malformed_response_resets_only_its_stream(
    fields: list[tuple[bytes, bytes]], end_stream: bool
) -> None:
    pair = StockPair.start(our_side_client=True)
    bad, good = pair.ours.open_tunnel(AUTHORITY), pair.ours.open_tunnel(AUTHORITY)
    pair.pump()
    flags = 0x4 | (0x1 if end_stream else 0)
    events = pair.ours.receive_data(_frame(HEADERS, flags, bad, _block(fields)))
    assert events == [hbone.StreamReset(bad, PROTOCOL_ERROR, remote=False)]
    assert _rst_codes(pair.ours.data_to_send()) == {bad: PROTOCOL_ERROR}
    events = pair.ours.receive_data(
        _frame(HEADERS, 0x4, good, _block([(b":status", b"103")]))
        + _frame(HEADERS, 0x4, good, _block([(b":status", b"200")]))
    )
    assert events == [hbone.TunnelEstablished(good, ())]  # the informational answer is skipped


def test_trailers_end_the_stream_and_must_carry_end_stream() -> None:
    pair = StockPair.start(our_side_client=True)
    ended, broken = pair.ours.open_tunnel(AUTHORITY), pair.ours.open_tunnel(AUTHORITY)
    pair.pump()
    for sid in (ended, broken):
        pair.theirs.send_headers(sid, [(":status", "200")])
    pair.pump()
    pair.our_events.clear()
    trailers = _block([(b"x-done", b"1")])
    events = pair.ours.receive_data(
        _frame(HEADERS, 0x5, ended, trailers) + _frame(HEADERS, 0x4, broken, trailers)
    )
    assert events == [
        hbone.StreamEnded(ended),
        hbone.StreamReset(broken, PROTOCOL_ERROR, remote=False),
    ]


def test_a_pushed_stream_without_promise_ends_the_connection() -> None:
    pair = StockPair.start(our_side_client=True)
    with pytest.raises(hbone.RemoteProtocolError, match="from a server"):
        pair.ours.receive_data(_frame(HEADERS, 0x4, 2, _block([(b":status", b"200")])))


def test_stock_h2_sees_our_settings_applied_and_acknowledged() -> None:
    pair = StockPair.start(our_side_client=True)
    acks = [e for e in pair.their_events if isinstance(e, h2.events.SettingsAcknowledged)]
    assert acks, "the stock peer must see its SETTINGS acknowledged"
    assert pair.theirs.remote_settings.initial_window_size == 4 << 20
    assert pair.theirs.remote_settings.max_frame_size == 1 << 20
    assert pair.theirs.remote_settings[h2.settings.SettingCodes.ENABLE_PUSH] == 0


def test_a_stock_h2_server_takes_our_optimistic_data() -> None:
    pair = StockPair.start(our_side_client=True)
    sid = pair.ours.open_tunnel(AUTHORITY)
    pair.ours.send_data(sid, b"hello")
    pair.pump()
    kinds = [type(e) for e in pair.their_events if e.__class__.__module__ == "h2.events"]
    assert kinds.index(h2.events.RequestReceived) < kinds.index(h2.events.DataReceived)
    assert pair.their_data(sid) == b"hello"
    pair.theirs.send_headers(sid, [(":status", "200")])
    pair.pump()
    assert hbone.TunnelEstablished(sid, ()) in pair.our_events
