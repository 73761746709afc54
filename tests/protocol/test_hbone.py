"""HBONE codec: a client and a server HboneConnection piped together, no sockets."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hyperframe.frame
import pytest

from meshcore.wire import hbone

E = TypeVar("E")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
AUTHORITY = "10.0.0.7:8080"

# Frame type codes (RFC 9113 section 6).
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x7, 0x8


@dataclasses.dataclass
class HbonePair:
    """Two connections and the events each side received, like h11's ConnectionPair.

    `pump()` shuttles `data_to_send()` of each side into the other's `receive_data()` until
    neither has anything left, optionally `chunk` bytes at a time. `on_event` lets a test act
    as the application (consume data, answer requests) while the bytes flow.
    """

    client: hbone.HboneConnection
    server: hbone.HboneConnection
    chunk: int | None = None
    client_events: list[hbone.Event] = dataclasses.field(default_factory=list)
    server_events: list[hbone.Event] = dataclasses.field(default_factory=list)
    on_event: Callable[[hbone.HboneConnection, hbone.Event], None] | None = None

    @classmethod
    def start(
        cls,
        client_settings: hbone.HboneSettings | None = None,
        server_settings: hbone.HboneSettings | None = None,
        chunk: int | None = None,
    ) -> HbonePair:
        pair = cls(
            hbone.HboneConnection(client_side=True, settings=client_settings),
            hbone.HboneConnection(client_side=False, settings=server_settings),
            chunk=chunk,
        )
        pair.client.initiate()
        pair.server.initiate()
        pair.pump()
        pair.clear()
        return pair

    def clear(self) -> None:
        self.client_events.clear()
        self.server_events.clear()

    def _feed(self, conn: hbone.HboneConnection, data: bytes) -> None:
        sink = self.client_events if conn is self.client else self.server_events
        pieces = (
            [data]
            if self.chunk is None
            else [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]
        )
        # The application acts only once the whole read has been fed, so that how the read
        # was chunked cannot change what the application does (and so what h2 sends back).
        events = [event for piece in pieces for event in conn.receive_data(piece)]
        sink.extend(events)
        if self.on_event is not None:
            for event in events:
                self.on_event(conn, event)

    def pump(self) -> None:
        for _ in range(10_000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self._feed(self.server, to_server)
            if to_client:
                self._feed(self.client, to_client)
        raise AssertionError("the pair never went quiet")

    def open(self, authority: str = AUTHORITY, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Open a tunnel and have the server accept it."""
        sid = self.client.open_tunnel(authority, headers)
        self.pump()
        self.server.accept_tunnel(sid)
        self.pump()
        return sid

    def close_stream(self, sid: int) -> None:
        self.client.end_stream(sid)
        self.server.end_stream(sid)
        self.pump()


def frames(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in `data`, skipping a client preface."""
    data = data.removeprefix(PREFACE)
    while data:
        length = int.from_bytes(data[:3], "big")
        ftype, flags = data[3], data[4]
        (sid,) = struct.unpack(">I", data[5:9])
        yield ftype, flags, sid & 0x7FFF_FFFF, data[9 : 9 + length]
        data = data[9 + length :]


def of_type(events: Sequence[hbone.Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def received(events: Sequence[hbone.Event], sid: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, hbone.DataReceived) and e.stream_id == sid
    )


# --- handshake and request ----------------------------------------------------------------------


def test_client_first_bytes_are_preface_settings_and_window_update() -> None:
    client = hbone.HboneConnection(client_side=True)
    client.initiate()
    out = client.data_to_send()
    assert out.startswith(PREFACE)
    parsed = list(frames(out))
    assert parsed[0][0] == SETTINGS  # the preface is followed by a SETTINGS frame
    advertised: dict[int, int] = {}
    for ftype, _flags, _sid, payload in parsed:
        if ftype == SETTINGS:
            for i in range(0, len(payload), 6):
                code, value = struct.unpack(">HI", payload[i : i + 6])
                advertised[code] = value  # later frames override earlier ones
    assert advertised[0x2] == 0  # ENABLE_PUSH
    assert advertised[0x4] == 4 << 20  # INITIAL_WINDOW_SIZE
    assert advertised[0x5] == 1 << 20  # MAX_FRAME_SIZE
    assert advertised[0x3] == 100  # MAX_CONCURRENT_STREAMS
    assert advertised[0x6] == 16 << 10  # MAX_HEADER_LIST_SIZE
    updates = [p for t, _f, sid, p in parsed if t == WINDOW_UPDATE and sid == 0]
    assert [int.from_bytes(p, "big") for p in updates] == [(16 << 20) - 65_535]


def test_server_first_bytes_are_settings_with_server_limits() -> None:
    server = hbone.HboneConnection(client_side=False)
    server.initiate()
    out = server.data_to_send()
    assert not out.startswith(PREFACE)
    parsed = list(frames(out))
    assert parsed[0][0] == SETTINGS
    advertised = {}
    for ftype, _f, _s, payload in parsed:
        if ftype == SETTINGS:
            for i in range(0, len(payload), 6):
                code, value = struct.unpack(">HI", payload[i : i + 6])
                advertised[code] = value
    assert advertised[0x3] == 200
    assert advertised[0x6] == 64 << 10


def test_connect_request_has_exactly_method_and_authority_then_extra_headers() -> None:
    pair = HbonePair.start()
    extra = [("forwarded", 'for="10.0.0.1:3333"'), ("baggage", "k8s.cluster.name=c1")]
    sid = pair.client.open_tunnel(AUTHORITY, extra)
    wire = pair.client.data_to_send()
    blocks = [p for t, _f, s, p in frames(wire) if t == HEADERS and s == sid]
    assert len(blocks) == 1
    decoded = [(str(name), str(value)) for name, value in hpack.Decoder().decode(blocks[0])]
    assert decoded == [(":method", "CONNECT"), (":authority", AUTHORITY), *extra]
    pair._feed(pair.server, wire)
    assert pair.server_events == [
        hbone.TunnelRequested(sid, "CONNECT", AUTHORITY, tuple(extra)),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Upper", "v"),
        (":path", "/"),
        ("connection", "close"),
        ("name\n", "v"),
        ("inject", "v\r\nx: y"),
        ("padded", " v"),
        ("", "v"),
    ],
    ids=["uppercase", "pseudo", "connection-specific", "newline-name", "crlf-value", "ws", "empty"],
)
def test_bad_header_fields_are_refused_before_anything_is_sent(name: str, value: str) -> None:
    pair = HbonePair.start()
    with pytest.raises(hbone.LocalProtocolError, match=re.escape(repr(name))):
        pair.client.open_tunnel(AUTHORITY, [(name, value)])
    assert pair.client.data_to_send() == b""
    assert pair.client.open_streams == 0
    sid = pair.client.open_tunnel(AUTHORITY)
    pair.pump()
    with pytest.raises(hbone.LocalProtocolError):
        pair.server.accept_tunnel(sid, [(name, value)])
    pair.server.accept_tunnel(sid)  # still answerable after the refused attempt
    pair.pump()
    assert pair.client_events == [hbone.TunnelEstablished(sid, ())]


@pytest.mark.parametrize(
    "authority", ["", "1.2.3.4:80\r\n", "a b:80"], ids=["empty", "crlf", "space"]
)
def test_bad_authority_is_refused(authority: str) -> None:
    pair = HbonePair.start()
    with pytest.raises(hbone.LocalProtocolError, match=":authority"):
        pair.client.open_tunnel(authority)
    assert pair.client.data_to_send() == b""


def test_accept_gives_tunnel_established_with_headers() -> None:
    pair = HbonePair.start()
    sid = pair.client.open_tunnel(AUTHORITY)
    pair.pump()
    pair.server.accept_tunnel(sid, [("baggage", "service.name=web")])
    pair.pump()
    assert pair.client_events == [hbone.TunnelEstablished(sid, (("baggage", "service.name=web"),))]
    assert pair.client.open_streams == pair.server.open_streams == 1


def test_optimistic_data_arrives_before_the_server_answers() -> None:
    pair = HbonePair.start()
    sid = pair.client.open_tunnel(AUTHORITY)
    assert pair.client.send_window(sid) == 4 << 20  # the server's stream window, not 0
    assert pair.client.send_data(sid, b"GET / HTTP/1.1\r\n\r\n") == 18
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.server_events == [
        hbone.TunnelRequested(sid, "CONNECT", AUTHORITY, ()),
        hbone.DataReceived(sid, b"GET / HTTP/1.1\r\n\r\n", 18),
        hbone.StreamEnded(sid),
    ]
    pair.server.accept_tunnel(sid)
    pair.server.send_data(sid, b"HTTP/1.1 200 OK\r\n\r\n")
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.client_events[0] == hbone.TunnelEstablished(sid, ())
    assert received(pair.client_events, sid) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_optimistic_data_to_a_rejected_tunnel_is_dropped_and_credited() -> None:
    settings = hbone.HboneSettings(connection_window=65_535)
    pair = HbonePair.start(server_settings=settings)
    sid = pair.client.open_tunnel(AUTHORITY)
    assert pair.client.send_data(sid, b"x" * 60_000) == 60_000
    pair.pump()
    pair.server.reject_tunnel(sid, 401)
    pair.pump()
    assert hbone.TunnelRejected(sid, 401, ()) in pair.client_events
    assert pair.client.open_streams == pair.server.open_streams == 0
    # The dropped bytes went back to the connection window: the next stream may send again.
    assert pair.client.send_window(pair.client.open_tunnel(AUTHORITY)) == 65_535


@pytest.mark.parametrize("status", [401, 503], ids=["rbac-deny", "upstream-failed"])
def test_reject_gives_tunnel_rejected_and_frees_the_stream(status: int) -> None:
    pair = HbonePair.start(client_settings=hbone.HboneSettings(max_concurrent_streams=1))
    sid = pair.client.open_tunnel(AUTHORITY)
    pair.pump()
    assert not pair.client.can_open_tunnel()
    pair.server.reject_tunnel(sid, status)
    pair.pump()
    assert pair.client_events == [hbone.TunnelRejected(sid, status, ())]
    assert pair.client.open_streams == pair.server.open_streams == 0
    assert pair.client.can_open_tunnel()
    with pytest.raises(hbone.StreamStateError):
        pair.client.send_data(sid, b"x")


def test_non_connect_method_arrives_as_tunnel_requested() -> None:
    server = hbone.HboneConnection(client_side=False)
    server.initiate()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", AUTHORITY)],
        end_stream=True,
    )
    events = server.receive_data(raw.data_to_send())
    requested = of_type(events, hbone.TunnelRequested)
    assert requested == [hbone.TunnelRequested(1, "GET", AUTHORITY, ())]
    assert hbone.StreamEnded(1) in events
    server.reject_tunnel(1, 400)
    answers = raw.receive_data(server.data_to_send())
    responses = [e for e in answers if isinstance(e, h2.events.ResponseReceived)]
    assert responses[0].headers[0] == (b":status", b"400")
    assert server.open_streams == 0


# --- data, flow control ------------------------------------------------------------------------


def test_ten_megabytes_each_way_through_small_windows() -> None:
    small = hbone.HboneSettings(
        stream_window=256 << 10, connection_window=512 << 10, max_frame_size=1 << 14
    )
    pair = HbonePair.start(client_settings=small, server_settings=small)
    sid = pair.open()
    pair.clear()
    size = 10 * 1024 * 1024
    payload = {
        pair.client: bytes(range(256)) * (size // 256),
        pair.server: hashlib.sha256(b"seed").digest() * (size // 32),
    }
    offset = {pair.client: 0, pair.server: 0}
    zero_returns = {pair.client: 0, pair.server: 0}
    opened = {pair.client: 0, pair.server: 0}
    digests = {pair.client: hashlib.sha256(), pair.server: hashlib.sha256()}
    ended = {pair.client: False, pair.server: False}

    def app(conn: hbone.HboneConnection, event: hbone.Event) -> None:
        if isinstance(event, hbone.DataReceived):
            digests[conn].update(event.data)
            conn.consumed(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, hbone.WindowOpened):
            opened[conn] += 1
        elif isinstance(event, hbone.StreamEnded):
            ended[conn] = True

    pair.on_event = app
    for _ in range(100_000):
        for conn in (pair.client, pair.server):
            view = memoryview(payload[conn])
            while offset[conn] < size:
                taken = conn.send_data(sid, view[offset[conn] : offset[conn] + 300_000])
                if taken == 0:
                    zero_returns[conn] += 1
                    break
                offset[conn] += taken
        if all(offset[c] == size for c in offset):
            break
        pair.pump()
    pair.client.end_stream(sid)
    pair.server.end_stream(sid)
    pair.pump()
    assert ended == {pair.client: True, pair.server: True}
    assert digests[pair.server].digest() == hashlib.sha256(payload[pair.client]).digest()
    assert digests[pair.client].digest() == hashlib.sha256(payload[pair.server]).digest()
    # The windows really were the limit, and consuming really reopened them.
    assert min(zero_returns.values()) > 0
    assert min(opened.values()) > 0
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_unconsumed_data_stops_the_sender_and_consuming_reopens_it() -> None:
    settings = hbone.HboneSettings(stream_window=64 << 10, connection_window=1 << 20)
    pair = HbonePair.start(server_settings=settings)
    sid = pair.open()
    pair.clear()
    sent = 0
    while (taken := pair.client.send_data(sid, b"a" * 50_000)) > 0:
        sent += taken
        pair.pump()
    assert sent == 64 << 10  # exactly the stream window the server advertised
    assert pair.client.send_window(sid) == 0
    pair.pump()
    assert not of_type(pair.client_events, hbone.WindowOpened)
    data_events = of_type(pair.server_events, hbone.DataReceived)
    assert sum(len(e.data) for e in data_events) == sent
    # Consuming a little does not yet send a WINDOW_UPDATE (batched) ...
    pair.server.consumed(sid, 1000)
    assert pair.server.data_to_send() == b""
    # ... consuming everything does, and the client hears about it.
    pair.server.consumed(sid, sent - 1000)
    pair.pump()
    assert hbone.WindowOpened(sid) in pair.client_events
    assert pair.client.send_window(sid) == 64 << 10
    assert pair.client.send_data(sid, b"b" * 10) == 10


def test_consumed_more_than_received_is_a_local_error() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.client.send_data(sid, b"hello")
    pair.pump()
    with pytest.raises(hbone.LocalProtocolError, match="only 5 bytes"):
        pair.server.consumed(sid, 6)


def test_big_frames_are_used_when_both_sides_advertise_one_mebibyte() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    assert pair.client.send_data(sid, b"z" * (1 << 20)) == 1 << 20
    parsed = [(t, len(p)) for t, _f, s, p in frames(pair.client.data_to_send()) if s == sid]
    assert parsed == [(DATA, 1 << 20)]


def test_data_is_split_at_the_peer_max_frame_size() -> None:
    pair = HbonePair.start(server_settings=hbone.HboneSettings(max_frame_size=1 << 14))
    sid = pair.open()
    assert pair.client.send_data(sid, memoryview(bytearray(40_000))) == 40_000
    lengths = [len(p) for t, _f, s, p in frames(pair.client.data_to_send()) if t == DATA]
    assert lengths == [16_384, 16_384, 7_232]


def test_settings_ack_and_big_data_in_one_read_do_not_trip_frame_size() -> None:
    # The server learns the client's 1 MiB frame limit, ACKs it and answers with a 1 MiB DATA
    # frame; the client receives ACK and DATA in a single receive_data() call.
    client = hbone.HboneConnection(client_side=True)
    server = hbone.HboneConnection(client_side=False)
    client.initiate()
    server.initiate()
    sid = client.open_tunnel(AUTHORITY)
    server.receive_data(client.data_to_send())
    server.accept_tunnel(sid)
    assert server.send_data(sid, b"q" * (1 << 20)) == 1 << 20
    wire = server.data_to_send()
    kinds = [(t, f, len(p)) for t, f, _s, p in frames(wire)]
    assert (SETTINGS, 0x1, 0) in kinds  # the ACK of the client's SETTINGS ...
    assert (DATA, 0, 1 << 20) in kinds  # ... and the big frame travel together
    events = client.receive_data(wire)
    assert received(events, sid) == b"q" * (1 << 20)


# --- half-close and reset ----------------------------------------------------------------------


def test_client_half_close_leaves_the_other_direction_open() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.server_events[-1] == hbone.StreamEnded(sid)
    assert received(pair.server_events, sid) == b"request"
    with pytest.raises(hbone.StreamStateError, match="after end_stream"):
        pair.client.send_data(sid, b"more")
    pair.server.send_data(sid, b"response")
    pair.pump()
    assert received(pair.client_events, sid) == b"response"
    assert pair.client.open_streams == pair.server.open_streams == 1
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.client_events[-1] == hbone.StreamEnded(sid)
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_server_half_close_leaves_the_other_direction_open() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.server.send_data(sid, b"banner")
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.client_events[-1] == hbone.StreamEnded(sid)
    pair.client.send_data(sid, b"late upload")
    pair.pump()
    assert received(pair.server_events, sid) == b"late upload"
    assert pair.server.open_streams == 1
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.server_events[-1] == hbone.StreamEnded(sid)
    assert pair.client.open_streams == pair.server.open_streams == 0


@pytest.mark.parametrize("resetter", ["client", "server"])
def test_reset_from_either_side(resetter: str) -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.clear()
    local, remote = (
        (pair.client, pair.server) if resetter == "client" else (pair.server, pair.client)
    )
    local.reset_stream(sid, 0x2)
    pair.pump()
    remote_events = pair.server_events if resetter == "client" else pair.client_events
    assert remote_events == [hbone.StreamReset(sid, 0x2, remote=True)]
    assert pair.client.open_streams == pair.server.open_streams == 0
    local.reset_stream(sid)  # already gone: a no-op
    with pytest.raises(hbone.StreamStateError):
        remote.send_data(sid, b"x")
    with pytest.raises(hbone.UnknownStreamError):
        local.reset_stream(sid + 2)


def test_late_reset_for_a_closed_stream_is_ignored_without_reply() -> None:
    # RFC 9113 section 5.1: a RST_STREAM may cross our END_STREAM or RST_STREAM on the wire.
    # It must neither kill the connection nor be answered (two h2 peers would bounce forever).
    pair = HbonePair.start()
    ended, reset = pair.open(), pair.open()
    pair.close_stream(ended)
    pair.client.reset_stream(reset)
    pair.pump()
    pair.open()  # a newer stream, so h2 would have cleaned the old ones up anyway
    pair.clear()
    late = b"".join(
        hyperframe.frame.RstStreamFrame(sid, error_code=0x8).serialize() for sid in (ended, reset)
    )
    assert pair.client.receive_data(late) == []
    assert pair.client.data_to_send() == b""
    assert pair.server.receive_data(late) == []
    assert pair.server.data_to_send() == b""


def test_data_in_flight_to_a_reset_stream_is_harmless() -> None:
    pair = HbonePair.start(server_settings=hbone.HboneSettings(connection_window=65_535))
    sid = pair.open()
    pair.server.reset_stream(sid)  # the client does not know yet ...
    assert pair.client.send_data(sid, b"x" * 60_000) == 60_000  # ... and keeps sending
    pair.clear()
    pair.pump()
    assert hbone.StreamReset(sid, 0x8, remote=True) in pair.client_events
    assert not pair.server_events
    # The server credited the dropped bytes to the connection window: a new stream can send.
    second = pair.open()
    assert pair.client.send_window(second) == 65_535


def test_reset_credits_unconsumed_bytes_back_to_the_connection() -> None:
    # Connection window barely above one stream's worth: if a reset stream kept its unconsumed
    # bytes, the next stream could not send at all.
    settings = hbone.HboneSettings(stream_window=60_000, connection_window=65_535)
    pair = HbonePair.start(server_settings=settings)
    first = pair.open()
    while pair.client.send_data(first, b"x" * 10_000):
        pair.pump()
    pair.pump()
    second = pair.open()
    assert pair.client.send_window(second) < 10_000
    pair.server.reset_stream(first)
    pair.pump()
    assert pair.client.send_window(second) == 60_000


# --- stream limits, GOAWAY, ping ---------------------------------------------------------------


def test_can_open_tunnel_is_false_at_our_limit_and_true_after_a_stream_closes() -> None:
    pair = HbonePair.start(client_settings=hbone.HboneSettings(max_concurrent_streams=3))
    sids = [pair.open() for _ in range(3)]
    assert not pair.client.can_open_tunnel()
    with pytest.raises(hbone.TooManyStreamsError):
        pair.client.open_tunnel(AUTHORITY)
    pair.client.end_stream(sids[0])
    pair.pump()
    assert not pair.client.can_open_tunnel()  # half-closed still counts
    pair.server.end_stream(sids[0])
    pair.pump()
    assert pair.client.can_open_tunnel()
    assert pair.client.open_streams == 2


def test_peer_max_concurrent_streams_of_one_is_respected() -> None:
    pair = HbonePair.start(server_settings=hbone.HboneSettings(max_concurrent_streams=1))
    assert pair.client.peer_max_concurrent_streams == 1
    sid = pair.open()
    assert not pair.client.can_open_tunnel()
    with pytest.raises(hbone.TooManyStreamsError):
        pair.client.open_tunnel(AUTHORITY)
    pair.client.reset_stream(sid)
    pair.pump()
    assert pair.client.can_open_tunnel()


def test_lowered_peer_limit_is_reported() -> None:
    client = hbone.HboneConnection(client_side=True)
    client.initiate()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    raw.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    events = client.receive_data(raw.data_to_send())
    assert hbone.RemoteSettingsChanged(7) in events
    assert client.peer_max_concurrent_streams == 7


def test_goaway_stops_new_tunnels_but_running_ones_finish() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.clear()
    assert pair.client.send_data(sid, b"queued;") == 7  # not yet written when GOAWAY arrives
    pair.server.close()
    pair._feed(pair.client, pair.server.data_to_send())
    pair.pump()
    assert pair.client_events == [hbone.ConnectionTerminated(0, sid, b"")]
    assert not pair.client.can_open_tunnel()
    with pytest.raises(hbone.TooManyStreamsError, match="GOAWAY"):
        pair.client.open_tunnel(AUTHORITY)
    assert (pair.client.is_closed, pair.server.is_closed) == (False, False)
    # The tunnel that was already running carries data both ways and closes normally.
    pair.client.send_data(sid, b"up")
    pair.server.send_data(sid, b"down")
    pair.close_stream(sid)
    assert received(pair.server_events, sid) == b"queued;up"
    assert received(pair.client_events, sid) == b"down"
    assert (pair.client.is_closed, pair.server.is_closed) == (True, True)


def test_streams_above_the_goaway_last_stream_id_are_refused() -> None:
    pair = HbonePair.start()
    first = pair.open()
    late = pair.client.open_tunnel(AUTHORITY)  # in flight while the server says GOAWAY
    pair.server.close()
    pair.clear()
    pair.pump()
    assert not of_type(pair.server_events, hbone.TunnelRequested)
    assert pair.client_events == [
        hbone.ConnectionTerminated(0, first, b""),
        hbone.StreamReset(late, 0x7, remote=True),
    ]
    assert pair.client.open_streams == pair.server.open_streams == 1


def test_graceful_close_refuses_to_abandon_open_streams_or_raise_last_stream_id() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    with pytest.raises(hbone.LocalProtocolError, match="abandon open streams"):
        pair.server.close(last_stream_id=sid - 1)
    pair.server.close(last_stream_id=2**31 - 1)  # phase one of a two-step drain
    pair.server.close(last_stream_id=sid)  # phase two
    with pytest.raises(hbone.LocalProtocolError, match="may not exceed"):
        pair.server.close(last_stream_id=sid + 2)
    pair.pump()
    terminated = of_type(pair.client_events, hbone.ConnectionTerminated)
    assert [e.last_stream_id for e in terminated] == [2**31 - 1, sid]


def test_stream_misuse_raises_documented_errors() -> None:
    pair = HbonePair.start()
    sid = pair.client.open_tunnel(AUTHORITY)
    with pytest.raises(hbone.UnknownStreamError):
        pair.client.send_data(sid + 2, b"x")
    with pytest.raises(hbone.UnknownStreamError):
        pair.client.consumed(sid + 2, 1)
    with pytest.raises(hbone.LocalProtocolError):
        pair.client.accept_tunnel(sid)  # a client cannot accept
    with pytest.raises(hbone.LocalProtocolError):
        pair.server.open_tunnel(AUTHORITY)  # a server cannot open
    pair.pump()
    pair.server.accept_tunnel(sid)
    with pytest.raises(hbone.StreamStateError):
        pair.server.accept_tunnel(sid)  # answered twice
    pair.server.send_data(sid, b"data")
    pair.pump()
    pair.client.reset_stream(sid)
    pair.client.consumed(sid, 4)  # after a reset: a no-op, the bytes were credited back
    assert pair.client.open_streams == 0


def test_error_goaway_ends_everything() -> None:
    pair = HbonePair.start()
    sid = pair.open()
    pair.server.close(error_code=0x2, last_stream_id=0)
    assert pair.server.is_closed
    pair.clear()
    pair.pump()
    assert pair.client_events == [hbone.ConnectionTerminated(0x2, 0, b"")]
    assert pair.client.is_closed
    assert not pair.client.can_open_tunnel()
    with pytest.raises(hbone.LocalProtocolError):
        pair.client.send_data(sid, b"x")


def test_ping_is_acknowledged() -> None:
    pair = HbonePair.start()
    pair.client.ping(b"12345678")
    pair.pump()
    assert pair.client_events == [hbone.PingAcknowledged(b"12345678")]
    with pytest.raises(hbone.LocalProtocolError):
        pair.client.ping(b"short")


def test_remote_protocol_error_queues_a_goaway() -> None:
    server = hbone.HboneConnection(client_side=False)
    server.initiate()
    server.data_to_send()
    with pytest.raises(hbone.RemoteProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert [t for t, *_ in frames(server.data_to_send())] == [GOAWAY]
    assert server.is_closed
    assert server.receive_data(b"more garbage") == []


# --- byte-at-a-time, many tunnels --------------------------------------------------------------


def _scripted_exchange(chunk: int | None) -> tuple[list[hbone.Event], list[hbone.Event], int]:
    pair = HbonePair(
        hbone.HboneConnection(client_side=True),
        hbone.HboneConnection(
            client_side=False,
            settings=hbone.HboneSettings(stream_window=70_000, max_frame_size=1 << 14),
        ),
        chunk=chunk,
    )

    def app(conn: hbone.HboneConnection, event: hbone.Event) -> None:
        if isinstance(event, hbone.TunnelRequested):
            if event.authority == AUTHORITY:
                conn.accept_tunnel(event.stream_id)
            else:
                conn.reject_tunnel(event.stream_id, 503)
        elif isinstance(event, hbone.DataReceived):
            conn.consumed(event.stream_id, event.flow_controlled_length)

    pair.on_event = app
    pair.client.initiate()
    pair.server.initiate()
    pair.pump()
    sid = pair.client.open_tunnel(AUTHORITY, [("baggage", "a=b")])
    refused = pair.client.open_tunnel("10.9.9.9:1")
    pair.pump()
    accepted = pair.client.send_data(sid, b"x" * 100_000)
    pair.pump()
    accepted += pair.client.send_data(sid, b"y" * 50_000)
    pair.server.send_data(sid, b"pong")
    pair.client.end_stream(sid)
    pair.pump()
    # Alone in its round trip: h2 answers PINGs while parsing, the application after it.
    pair.client.ping(b"pingpong")
    pair.pump()
    pair.server.end_stream(sid)
    pair.server.close()
    pair.pump()
    assert refused != sid
    return pair.client_events, pair.server_events, accepted


def _merge_data(events: list[hbone.Event]) -> list[hbone.Event]:
    """DATA payloads are delivered as they arrive, so a frame split across reads comes out as
    several DataReceived, and WINDOW_UPDATEs follow consumption: merge runs of both."""
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
        elif not (isinstance(event, hbone.WindowOpened) and event == last):
            out.append(event)
    return out


def _without_data(events: list[hbone.Event]) -> list[hbone.Event]:
    return [e for e in events if not isinstance(e, hbone.DataReceived)]


def test_byte_at_a_time_feeding_gives_the_same_events() -> None:
    whole = _scripted_exchange(chunk=None)
    bytewise = _scripted_exchange(chunk=1)
    # The same events in the same order; only how the payload is cut (and so when windows
    # reopen, and how much the client got to send) depends on the read sizes.
    assert _merge_data(bytewise[0]) == _merge_data(whole[0])
    assert _without_data(_merge_data(bytewise[1])) == _without_data(_merge_data(whole[1]))
    for _client_events, server_events, accepted in (whole, bytewise):
        assert 70_000 < accepted < 150_000
        assert sum(len(e.data) for e in of_type(server_events, hbone.DataReceived)) == accepted
    client_events, server_events, accepted = whole
    assert of_type(client_events, hbone.TunnelRejected)
    assert of_type(client_events, hbone.PingAcknowledged)
    assert of_type(client_events, hbone.ConnectionTerminated)
    assert 70_000 < accepted < 150_000  # the 70,000-byte stream window was in play
    assert sum(len(e.data) for e in of_type(server_events, hbone.DataReceived)) == accepted


def _run_tunnels(pair: HbonePair, count: int) -> None:
    client, server = pair.client, pair.server
    for _ in range(count):
        sid = client.open_tunnel(AUTHORITY)
        pair.pump()
        server.accept_tunnel(sid)
        server.send_data(sid, b"pong")
        server.end_stream(sid)
        pair.pump()
        client.consumed(sid, 4)
        client.send_data(sid, b"ping")
        client.end_stream(sid)
        pair.pump()
        server.consumed(sid, 4)
        pair.clear()


def test_ten_thousand_sequential_tunnels_leave_no_per_stream_state() -> None:
    pair = HbonePair.start()
    _run_tunnels(pair, 1_100)  # warm up
    gc.collect()
    objects_before = len(gc.get_objects())
    _run_tunnels(pair, 10_000)
    gc.collect()
    growth = len(gc.get_objects()) - objects_before
    # Any per-tunnel leftover (a stream record, an h2 stream, an event) would be >= 10,000.
    assert growth < 100, f"{growth} more live objects after 10,000 tunnels"
    for conn in (pair.client, pair.server):
        assert conn.open_streams == 0
        # White-box, because dict entries of ints are invisible to gc: nothing per stream
        # remains except the memory of recent resets, which is capped.
        assert conn._streams == {}
        assert len(conn._reset_by_us) <= hbone.MAX_RESET_MEMORY == 1024
    assert pair.client.can_open_tunnel()
