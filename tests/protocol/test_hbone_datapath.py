"""HBONE's hand-rolled data path (DATA and WINDOW_UPDATE bypass h2): framing across reads,
flow control both ways, frame sizes, stream-state errors, padding, and interop with a stock
`h2` peer on the other end in both directions. No sockets."""

from __future__ import annotations

import dataclasses

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from meshcore.wire import hbone, hbone_frames
from tests.protocol.test_hbone import (
    AUTHORITY,
    DATA,
    GOAWAY,
    PREFACE,
    RST_STREAM,
    WINDOW_UPDATE,
    frames,
    of_type,
    received,
)

FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, PROTOCOL_ERROR = 0x3, 0x5, 0x6, 0x1


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return hbone_frames.build_frame_header(len(payload), ftype, flags, sid) + payload


def _window_update(sid: int, increment: int) -> bytes:
    return _frame(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))


def _merge(events: list[hbone.Event]) -> list[hbone.Event]:
    """Payloads are delivered as they arrive: merge DataReceived runs to compare two feeds."""
    out: list[hbone.Event] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, hbone.DataReceived)
            and isinstance(last, hbone.DataReceived)
            and last.stream_id == event.stream_id
        ):
            out[-1] = hbone.DataReceived(
                event.stream_id,
                bytes(last.data) + bytes(event.data),
                last.flow_controlled_length + event.flow_controlled_length,
            )
        else:
            out.append(event)
    return out


@dataclasses.dataclass
class StockPair:
    """Our HboneConnection against a stock `h2` connection (the other role)."""

    ours: hbone.HboneConnection
    theirs: h2.connection.H2Connection
    our_events: list[hbone.Event] = dataclasses.field(default_factory=list)
    their_events: list[h2.events.Event] = dataclasses.field(default_factory=list)
    consume: bool = True  # act as an application that consumes everything at once
    to_theirs: bytearray = dataclasses.field(default_factory=bytearray)  # everything we sent

    @classmethod
    def start(
        cls,
        *,
        our_side_client: bool,
        settings: hbone.HboneSettings | None = None,
        their_settings: dict[int, int] | None = None,
    ) -> StockPair:
        ours = hbone.HboneConnection(client_side=our_side_client, settings=settings)
        theirs = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=not our_side_client, header_encoding=None)
        )
        ours.initiate()
        theirs.initiate_connection()
        if their_settings:
            theirs.update_settings(their_settings)
            max_frame = their_settings.get(h2.settings.SettingCodes.MAX_FRAME_SIZE)
            if max_frame:
                theirs.max_inbound_frame_size = max_frame
        pair = cls(ours, theirs)
        pair.pump()
        return pair

    def pump(self) -> None:
        for _ in range(100_000):
            to_theirs = self.ours.data_to_send()
            to_ours = self.theirs.data_to_send()
            if not to_theirs and not to_ours:
                return
            if to_theirs:
                self.to_theirs += to_theirs
                for their_event in self.theirs.receive_data(to_theirs):
                    self.their_events.append(their_event)
                    if isinstance(their_event, h2.events.DataReceived) and self.consume:
                        self.theirs.acknowledge_received_data(
                            their_event.flow_controlled_length, their_event.stream_id
                        )
            if to_ours:
                events = self.ours.receive_data(to_ours)
                self.our_events.extend(events)
                if self.consume:
                    for event in events:
                        if isinstance(event, hbone.DataReceived):
                            self.ours.consumed(event.stream_id, event.flow_controlled_length)
        raise AssertionError("the pair never went quiet")

    def their_data(self, sid: int) -> bytes:
        return b"".join(
            e.data or b""
            for e in self.their_events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )

    def their_send_all(self, sid: int, data: bytes, *, pad: int | None = None) -> None:
        """Send `data` the way a careful h2 application does: within windows and frame size."""
        view = memoryview(data)
        while view:
            window = self.theirs.local_flow_control_window(sid)
            room = min(window, self.theirs.max_outbound_frame_size - (pad or 0) - 1)
            if room <= 0:
                self.pump()
                assert self.theirs.local_flow_control_window(sid) > 0, "window never reopened"
                continue
            n = min(room, len(view))
            self.theirs.send_data(sid, bytes(view[:n]), pad_length=pad)
            view = view[n:]
            self.pump()


def _pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


def _our_client_tunnel(pair: StockPair) -> int:
    sid = pair.ours.open_tunnel(AUTHORITY)
    pair.pump()
    assert any(isinstance(e, h2.events.RequestReceived) for e in pair.their_events)
    pair.theirs.send_headers(sid, [(":status", "200")])
    pair.pump()
    assert hbone.TunnelEstablished(sid, ()) in pair.our_events
    return sid


# --- interop with stock h2 ----------------------------------------------------------------------


def test_our_client_against_stock_h2_server_moves_data_both_ways() -> None:
    pair = StockPair.start(our_side_client=True)
    sid = _our_client_tunnel(pair)
    up, down = _pattern(1 << 20), _pattern(3 << 20)[::-1]
    view = memoryview(up)
    while view:
        taken = pair.ours.send_data(sid, view)
        assert taken > 0, "the stock server's WINDOW_UPDATEs must reopen our window"
        view = view[taken:]
        pair.pump()
    pair.ours.end_stream(sid)
    pair.pump()
    assert pair.their_data(sid) == up
    assert any(isinstance(e, h2.events.StreamEnded) for e in pair.their_events)
    # Stock h2 never accepts a DATA frame over its 16 KiB default SETTINGS_MAX_FRAME_SIZE.
    sizes = [len(p) for t, _f, _s, p in frames(bytes(pair.to_theirs)) if t == DATA]
    assert max(sizes) == 16_384
    pair.their_send_all(sid, down)
    pair.theirs.end_stream(sid)
    pair.pump()
    assert received(pair.our_events, sid) == down
    assert pair.our_events[-1] == hbone.StreamEnded(sid)
    assert pair.ours.open_streams == 0


def test_stock_h2_client_against_our_server_with_padding() -> None:
    pair = StockPair.start(
        our_side_client=False,
        settings=hbone.HboneSettings(stream_window=100_000, max_frame_size=1 << 14),
    )
    sid = pair.theirs.get_next_available_stream_id()
    pair.theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    pair.pump()
    assert of_type(pair.our_events, hbone.TunnelRequested)
    pair.ours.accept_tunnel(sid)
    pair.pump()
    up = _pattern(500_000)
    pair.their_send_all(sid, up[:250_000])
    pair.their_send_all(sid, up[250_000:], pad=17)  # padded frames must be accepted too
    pair.theirs.end_stream(sid)
    pair.pump()
    assert received(pair.our_events, sid) == up
    assert pair.our_events[-1] == hbone.StreamEnded(sid)
    # Flow-controlled lengths include the padding (and its length byte).
    flow = sum(e.flow_controlled_length for e in of_type(pair.our_events, hbone.DataReceived))
    assert flow > len(up)
    down = _pattern(2 << 20)
    view = memoryview(down)
    while view:
        taken = pair.ours.send_data(sid, view)
        assert taken > 0
        view = view[taken:]
        pair.pump()
    pair.ours.end_stream(sid)
    pair.pump()
    assert pair.their_data(sid) == down
    assert pair.ours.open_streams == 0


# --- flow control -------------------------------------------------------------------------------


def test_send_stops_exactly_at_the_peers_stream_window_and_settings_move_it() -> None:
    pair = StockPair.start(our_side_client=True)
    pair.consume = False
    pair.theirs.increment_flow_control_window(1 << 20)  # only the stream window will bind
    sid = _our_client_tunnel(pair)
    assert pair.ours.send_window(sid) == 65_535
    assert pair.ours.send_data(sid, b"a" * 100_000) == 65_535
    pair.pump()
    assert pair.ours.send_data(sid, b"b") == 0
    assert pair.ours.send_window(sid) == 0
    # The peer raises SETTINGS_INITIAL_WINDOW_SIZE: every stream's window grows by the delta.
    pair.theirs.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535 + 1000})
    pair.pump()
    assert hbone.WindowOpened(None) in pair.our_events
    assert pair.ours.send_window(sid) == 1000
    assert pair.ours.send_data(sid, b"c" * 5000) == 1000
    pair.theirs.acknowledge_received_data(66_535, sid)
    pair.pump()
    assert pair.ours.send_window(sid) > 0
    assert len(pair.their_data(sid)) == 66_535


def test_window_updates_are_sent_as_the_application_consumes() -> None:
    pair = StockPair.start(
        our_side_client=False, settings=hbone.HboneSettings(stream_window=65_535)
    )
    pair.consume = False
    sid = pair.theirs.get_next_available_stream_id()
    pair.theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    pair.theirs.send_data(sid, b"x" * 16_384)
    pair.theirs.send_data(sid, b"x" * 16_384)
    pair.pump()
    flow = [e.flow_controlled_length for e in of_type(pair.our_events, hbone.DataReceived)]
    assert sum(flow) == 32_768
    assert pair.theirs.local_flow_control_window(sid) == 65_535 - 32_768
    assert not pair.ours.data_to_send()  # nothing consumed: no WINDOW_UPDATE
    pair.ours.consumed(sid, 30_000)
    assert not pair.ours.data_to_send()  # under half the stream window: batched
    pair.ours.consumed(sid, 2_768)
    updates = [
        (s, int.from_bytes(p, "big"))
        for t, _f, s, p in frames(pair.ours.data_to_send())
        if t == WINDOW_UPDATE
    ]
    assert updates == [(sid, 32_768)]


def test_stream_window_overrun_resets_only_that_stream() -> None:
    pair = StockPair.start(
        our_side_client=False, settings=hbone.HboneSettings(stream_window=65_535)
    )
    sid = pair.theirs.get_next_available_stream_id()
    pair.theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    pair.pump()
    pair.our_events.clear()
    hostile = b"".join(_frame(DATA, 0, sid, b"z" * 16_384) for _ in range(5))  # 81,920 > 65,535
    events = pair.ours.receive_data(hostile)
    assert hbone.StreamReset(sid, FLOW_CONTROL_ERROR, remote=False) in events
    assert sum(len(e.data) for e in of_type(events, hbone.DataReceived)) == 65_535 - 65_535 % 16_384
    out = list(frames(pair.ours.data_to_send()))
    assert (RST_STREAM, 0, sid, FLOW_CONTROL_ERROR.to_bytes(4, "big")) in out
    assert not pair.ours.is_closed


def test_connection_window_overrun_is_a_connection_error() -> None:
    ours = hbone.HboneConnection(
        client_side=False, settings=hbone.HboneSettings(connection_window=65_535)
    )
    ours.initiate()
    ours.data_to_send()
    ours.receive_data(_stock_client_open(1, 3))
    with pytest.raises(hbone.RemoteProtocolError) as err:
        ours.receive_data(_frame(DATA, 0, 1, b"a" * 40_000) + _frame(DATA, 0, 3, b"b" * 40_000))
    assert err.value.error_code == FLOW_CONTROL_ERROR
    assert GOAWAY in [t for t, *_ in frames(ours.data_to_send())]
    assert ours.is_closed


def _stock_client_open(*sids: int) -> bytes:
    """What a stock h2 client sends to open CONNECT streams `sids`, preface included."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for sid in sids:
        client.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    return client.data_to_send()


@pytest.mark.parametrize(
    ("sid", "increment", "code"),
    [(1, 0, PROTOCOL_ERROR), (1, 2**31 - 1, FLOW_CONTROL_ERROR)],
    ids=["stream-zero-increment", "stream-overflow"],
)
def test_bad_stream_window_update_resets_the_stream(sid: int, increment: int, code: int) -> None:
    ours = _server_with_stream()
    events = ours.receive_data(_window_update(sid, increment))
    assert events == [hbone.StreamReset(sid, code, remote=False)]
    assert (RST_STREAM, 0, sid, code.to_bytes(4, "big")) in list(frames(ours.data_to_send()))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_window_update(0, 0), PROTOCOL_ERROR),
        (_window_update(0, 2**31 - 1), FLOW_CONTROL_ERROR),
        (_frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x01"), FRAME_SIZE_ERROR),
        (_frame(DATA, 0x8, 1, b"\x05abc"), PROTOCOL_ERROR),  # padding longer than the frame
        (_frame(DATA, 0, 0, b"abc"), PROTOCOL_ERROR),  # DATA on stream 0
        (_frame(DATA, 0, 5, b"abc"), PROTOCOL_ERROR),  # DATA on an idle stream
        (hbone_frames.build_frame_header(1 << 14 | 1, DATA, 0, 1), FRAME_SIZE_ERROR),
        (
            _frame(0x1, 0, 3, b"") + _frame(DATA, 0, 1, b"x"),
            PROTOCOL_ERROR,
        ),  # inside a header block
    ],
    ids=[
        "conn-zero-increment",
        "conn-overflow",
        "window-update-size",
        "bad-padding",
        "data-stream-0",
        "data-idle-stream",
        "over-max-frame-size",
        "data-inside-header-block",
    ],
)
def test_connection_errors_on_the_data_path(frame: bytes, code: int) -> None:
    ours = _server_with_stream(max_frame_size=1 << 14)
    with pytest.raises(hbone.RemoteProtocolError) as err:
        ours.receive_data(frame)
    assert err.value.error_code == code
    goaways = [p for t, _f, _s, p in frames(ours.data_to_send()) if t == GOAWAY]
    assert [int.from_bytes(p[4:8], "big") for p in goaways] == [code]
    assert ours.is_closed


def _server_with_stream(max_frame_size: int = 1 << 20) -> hbone.HboneConnection:
    ours = hbone.HboneConnection(
        client_side=False, settings=hbone.HboneSettings(max_frame_size=max_frame_size)
    )
    ours.initiate()
    ours.data_to_send()
    events = ours.receive_data(_stock_client_open(1))
    assert of_type(events, hbone.TunnelRequested)
    ours.accept_tunnel(1)
    ours.data_to_send()
    return ours


# --- stream states ------------------------------------------------------------------------------


def test_data_on_a_closed_stream_is_a_stream_error_and_credits_the_connection() -> None:
    ours = hbone.HboneConnection(
        client_side=False, settings=hbone.HboneSettings(connection_window=65_535)
    )
    ours.initiate()
    ours.data_to_send()
    ours.receive_data(_stock_client_open(1))
    ours.accept_tunnel(1)
    events = ours.receive_data(_frame(DATA, 0x1, 1, b"bye"))
    assert events == [hbone.DataReceived(1, b"bye", 3), hbone.StreamEnded(1)]
    ours.consumed(1, 3)
    ours.end_stream(1)
    ours.data_to_send()
    assert ours.open_streams == 0
    # The stream is closed: more DATA on it is a stream error, not delivered...
    assert ours.receive_data(_frame(DATA, 0, 1, b"x" * 40_000)) == []
    out = list(frames(ours.data_to_send()))
    assert (RST_STREAM, 0, 1, STREAM_CLOSED.to_bytes(4, "big")) in out
    # ... and its bytes still reopen the connection window.
    assert (WINDOW_UPDATE, 0, 0, (40_003).to_bytes(4, "big")) in out
    assert not ours.is_closed


def test_a_stream_reset_while_its_frame_arrives_drops_the_rest_and_credits_it() -> None:
    ours = _server_with_stream()
    header = hbone_frames.build_data_header(100_000, 1)
    events = ours.receive_data(header + b"a" * 30_000)
    assert events == [hbone.DataReceived(1, b"a" * 30_000, 30_000)]
    ours.reset_stream(1)
    assert ours.receive_data(b"b" * 70_000) == []
    out = list(frames(ours.data_to_send()))
    assert (RST_STREAM, 0, 1, (0x8).to_bytes(4, "big")) in out
    # The next frame is parsed normally again.
    assert ours.receive_data(_window_update(0, 1)) == [hbone.WindowOpened(None)]


def test_client_rejects_data_before_the_response() -> None:
    pair = StockPair.start(our_side_client=True)
    sid = pair.ours.open_tunnel(AUTHORITY)
    pair.pump()
    with pytest.raises(hbone.RemoteProtocolError):
        pair.ours.receive_data(_frame(DATA, 0, sid, b"early"))


# --- framing across reads -----------------------------------------------------------------------


def _stock_client_transcript() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    client.send_data(1, b"first")
    client.send_data(1, b"padded", pad_length=3)
    client.send_data(1, b"", pad_length=4)  # padding only
    client.send_headers(3, [(":method", "CONNECT"), (":authority", AUTHORITY)])
    client.increment_flow_control_window(1000)
    client.increment_flow_control_window(7, stream_id=1)
    client.send_data(3, b"other stream")
    client.ping(b"12345678")
    client.send_data(1, b"last", end_stream=True)
    client.end_stream(3)
    return client.data_to_send()


TRANSCRIPT = _stock_client_transcript()


def _feed_transcript(pieces: list[bytes]) -> list[hbone.Event]:
    ours = hbone.HboneConnection(client_side=False)
    ours.initiate()
    events: list[hbone.Event] = []
    for piece in pieces:
        events += ours.receive_data(piece)
    assert ours.data_to_send()
    return _merge(events)


WHOLE = _feed_transcript([TRANSCRIPT])


def test_the_transcript_exercises_every_frame_kind() -> None:
    assert received(WHOLE, 1) == b"firstpaddedlast"
    assert received(WHOLE, 3) == b"other stream"
    assert of_type(WHOLE, hbone.StreamEnded) == [hbone.StreamEnded(1), hbone.StreamEnded(3)]
    assert hbone.WindowOpened(None) in WHOLE
    assert {t for t, *_ in frames(TRANSCRIPT)} >= {DATA, WINDOW_UPDATE, 0x1, 0x4, 0x6}


@pytest.mark.parametrize("cut", range(1, len(TRANSCRIPT)))
def test_a_split_at_every_byte_gives_the_same_events(cut: int) -> None:
    assert _feed_transcript([TRANSCRIPT[:cut], TRANSCRIPT[cut:]]) == WHOLE


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    pieces = [TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))]
    assert _feed_transcript(pieces) == WHOLE
    assert TRANSCRIPT[: len(PREFACE)] == PREFACE
