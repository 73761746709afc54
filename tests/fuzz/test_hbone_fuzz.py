"""Hypothesis on the HBONE codec: hostile bytes only ever raise RemoteProtocolError, and any
interleaving of application calls on a connected pair conserves the bytes send_data() took."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from meshcore.wire import hbone
from tests.protocol.test_hbone import AUTHORITY, PREFACE, HbonePair, frames

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENT_TYPES = (
    hbone.TunnelRequested,
    hbone.TunnelEstablished,
    hbone.TunnelRejected,
    hbone.DataReceived,
    hbone.StreamEnded,
    hbone.StreamReset,
    hbone.WindowOpened,
    hbone.PingAcknowledged,
    hbone.ConnectionTerminated,
    hbone.RemoteSettingsChanged,
)
GOAWAY = 0x7


def _transcripts() -> dict[bool, bytes]:
    """What each side of a real exchange sends, to use as valid prefixes (key: sent by client)."""
    pair = HbonePair(
        hbone.HboneConnection(client_side=True), hbone.HboneConnection(client_side=False)
    )
    sent = {True: bytearray(), False: bytearray()}

    def flush() -> None:
        for conn, other, key in (
            (pair.client, pair.server, True),
            (pair.server, pair.client, False),
        ):
            data = conn.data_to_send()
            sent[key] += data
            other.receive_data(data)

    pair.client.initiate()
    pair.server.initiate()
    flush()
    sid = pair.client.open_tunnel(AUTHORITY, [("baggage", "a=b")])
    flush()
    pair.server.accept_tunnel(sid)
    flush()
    pair.client.send_data(sid, b"hello")
    pair.server.send_data(sid, b"world")
    pair.client.ping(b"01234567")
    pair.client.end_stream(sid)
    flush()
    return {key: bytes(value) for key, value in sent.items()}


TRANSCRIPTS = _transcripts()


def _fresh(client_side: bool) -> hbone.HboneConnection:
    conn = hbone.HboneConnection(client_side=client_side)
    conn.initiate()
    conn.data_to_send()
    return conn


def _feed_hostile(conn: hbone.HboneConnection, chunks: list[bytes]) -> None:
    """Feed chunks; the only exception allowed is RemoteProtocolError, followed by a GOAWAY."""
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except hbone.RemoteProtocolError:
            assert GOAWAY in [ftype for ftype, *_ in frames(conn.data_to_send())]
            assert conn.is_closed
            assert conn.receive_data(chunk) == []
            return
        assert all(isinstance(event, EVENT_TYPES) for event in events)
        # The application side may act on whatever arrived without tripping anything.
        for event in events:
            if isinstance(event, hbone.DataReceived):
                conn.consumed(event.stream_id, event.flow_controlled_length)
        conn.data_to_send()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


@FUZZ
@given(client_side=st.booleans(), data=st.binary(max_size=512), cuts=st.lists(st.integers(0, 512)))
def test_arbitrary_bytes_only_raise_remote_protocol_error(
    client_side: bool, data: bytes, cuts: list[int]
) -> None:
    _feed_hostile(_fresh(client_side), _split(data, cuts))


@FUZZ
@given(
    client_side=st.booleans(),
    prefix_fraction=st.floats(0, 1),
    garbage=st.binary(max_size=256),
    cuts=st.lists(st.integers(0, 4096), max_size=8),
)
def test_valid_prefix_then_garbage_only_raises_remote_protocol_error(
    client_side: bool, prefix_fraction: float, garbage: bytes, cuts: list[int]
) -> None:
    # The server receives what a client sent and vice versa.
    transcript = TRANSCRIPTS[not client_side]
    prefix = transcript[: int(len(transcript) * prefix_fraction)]
    _feed_hostile(_fresh(client_side), _split(prefix + garbage, cuts))


_frame = st.tuples(
    st.integers(0, 12),  # frame type, including unknown ones
    st.integers(0, 255),  # flags
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFF_FFFF]),  # stream id
    st.binary(max_size=64),  # payload
)


@FUZZ
@given(client_side=st.booleans(), parts=st.lists(_frame, max_size=12))
def test_well_framed_nonsense_only_raises_remote_protocol_error(
    client_side: bool, parts: list[tuple[int, int, int, bytes]]
) -> None:
    # Syntactically valid frame headers reach much deeper into h2 than random bytes do.
    body = b"".join(
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + struct.pack(">I", sid) + payload
        for ftype, flags, sid, payload in parts
    )
    start = PREFACE if not client_side else b""
    handshake = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
    _feed_hostile(_fresh(client_side), [start + handshake, body])


# --- interleavings on a connected pair ---------------------------------------------------------


@dataclasses.dataclass
class _Flow:
    sent: bytearray = dataclasses.field(default_factory=bytearray)
    got: bytearray = dataclasses.field(default_factory=bytearray)


class PairMachine(RuleBasedStateMachine):
    """Random application calls on both sides, with random delivery of what is in flight."""

    @initialize()
    def start(self) -> None:
        self.pair = HbonePair.start(
            client_settings=hbone.HboneSettings(
                stream_window=20_000, connection_window=65_535, max_concurrent_streams=4
            ),
            server_settings=hbone.HboneSettings(
                stream_window=30_000, connection_window=70_000, max_concurrent_streams=3
            ),
        )
        self.pair.on_event = self._on_event
        self.flows: dict[tuple[bool, int], _Flow] = {}  # (sent by client, stream id)
        self.unconsumed: dict[tuple[bool, int], int] = {}  # (held by client, stream id)
        self.sids: list[int] = []
        self.requested: list[int] = []
        self.broken: set[int] = set()  # reset, rejected or refused: bytes may be cut short
        self.counter = 0

    def _on_event(self, conn: hbone.HboneConnection, event: hbone.Event) -> None:
        is_client = conn is self.pair.client
        if isinstance(event, hbone.DataReceived):
            self.flows.setdefault((not is_client, event.stream_id), _Flow()).got += event.data
            key = (is_client, event.stream_id)
            self.unconsumed[key] = self.unconsumed.get(key, 0) + event.flow_controlled_length
        elif isinstance(event, hbone.TunnelRequested):
            self.requested.append(event.stream_id)
        elif isinstance(event, hbone.StreamReset | hbone.TunnelRejected):
            self.broken.add(event.stream_id)

    def _conn(self, is_client: bool) -> hbone.HboneConnection:
        return self.pair.client if is_client else self.pair.server

    def _payload(self, size: int) -> bytes:
        self.counter += 1
        return bytes((self.counter + i) % 251 for i in range(size))

    @rule()
    def open(self) -> None:
        if self.pair.client.can_open_tunnel():
            self.sids.append(self.pair.client.open_tunnel(AUTHORITY))
        else:
            with pytest.raises(hbone.TooManyStreamsError):
                self.pair.client.open_tunnel(AUTHORITY)

    @precondition(lambda self: self.requested)
    @rule(data=st.data(), answer=st.sampled_from([200, 200, 401, 503]))
    def answer(self, data: st.DataObject, answer: int) -> None:
        sid = self.requested.pop(data.draw(st.integers(0, len(self.requested) - 1)))
        try:
            if answer == 200:
                self.pair.server.accept_tunnel(sid)
            else:
                self.pair.server.reject_tunnel(sid, answer)
                self.broken.add(sid)
        except hbone.StreamStateError:
            assert sid in self.broken  # reset by the client before we answered

    @precondition(lambda self: self.sids)
    @rule(is_client=st.booleans(), data=st.data(), size=st.integers(0, 70_000))
    def send(self, is_client: bool, data: st.DataObject, size: int) -> None:
        sid = data.draw(st.sampled_from(self.sids))
        payload = self._payload(size)
        try:
            taken = self._conn(is_client).send_data(sid, memoryview(payload))
        except hbone.LocalProtocolError:
            return  # documented: not established, ended, reset or closed
        assert 0 <= taken <= size
        self.flows.setdefault((is_client, sid), _Flow()).sent += payload[:taken]

    @precondition(lambda self: self.unconsumed)
    @rule(data=st.data(), fraction=st.floats(0, 1))
    def consume(self, data: st.DataObject, fraction: float) -> None:
        key = data.draw(st.sampled_from(sorted(self.unconsumed)))
        amount = int(self.unconsumed[key] * fraction)
        self._conn(key[0]).consumed(key[1], amount)
        self.unconsumed[key] -= amount

    @precondition(lambda self: self.sids)
    @rule(is_client=st.booleans(), data=st.data())
    def end(self, is_client: bool, data: st.DataObject) -> None:
        try:
            self._conn(is_client).end_stream(data.draw(st.sampled_from(self.sids)))
        except hbone.LocalProtocolError:
            pass  # documented: already ended, reset, not established

    @precondition(lambda self: self.sids)
    @rule(is_client=st.booleans(), data=st.data(), code=st.sampled_from([0x0, 0x2, 0x8]))
    def reset(self, is_client: bool, data: st.DataObject, code: int) -> None:
        sid = data.draw(st.sampled_from(self.sids))
        try:
            self._conn(is_client).reset_stream(sid, code)
        except hbone.UnknownStreamError:
            assert not is_client  # documented: the server has not seen this stream yet
            return
        self.broken.add(sid)

    @rule(is_client=st.booleans())
    def ping(self, is_client: bool) -> None:
        self._conn(is_client).ping(b"\x00" * 8)

    @rule()
    def goaway(self) -> None:
        self.pair.server.close()

    @rule(to_server=st.booleans(), chunk=st.sampled_from([None, 1, 7, 1000]))
    def deliver_one_way(self, to_server: bool, chunk: int | None) -> None:
        # Leaves the other direction in flight, so frames cross on the wire.
        self.pair.chunk = chunk
        if to_server:
            self.pair._feed(self.pair.server, self.pair.client.data_to_send())
        else:
            self.pair._feed(self.pair.client, self.pair.server.data_to_send())

    @rule()
    def pump(self) -> None:
        self.pair.chunk = None
        self.pair.pump()

    @invariant()
    def received_bytes_are_a_prefix_of_accepted_bytes(self) -> None:
        for flow in getattr(self, "flows", {}).values():
            assert flow.sent.startswith(flow.got)

    def teardown(self) -> None:
        if not hasattr(self, "pair"):
            return
        self.pair.chunk = None
        self.pair.pump()
        for (_by_client, sid), flow in self.flows.items():
            if sid not in self.broken:
                assert flow.got == flow.sent, f"stream {sid}: bytes lost or reordered"
        assert self.pair.client.open_streams == self.pair.server.open_streams
        for conn in (self.pair.client, self.pair.server):
            # White-box: the memory of resets stays bounded (no leak).
            assert len(conn._reset_by_us) <= hbone.MAX_RESET_MEMORY


PairMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_interleavings_conserve_bytes = PairMachine.TestCase
