"""ZDS decoders and sessions on arbitrary datagrams: only ZdsRemoteError may come out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.wire import zds

_INFO = zds.WorkloadInfo("web-1", "shop", "web")
_VALID = [
    zds.encode_hello(),
    zds.encode_request(zds.AddWorkload("uid-1", _INFO)),
    zds.encode_request(zds.KeepWorkload("uid-1")),
    zds.encode_request(zds.DelWorkload("uid-1")),
    zds.encode_request(zds.SnapshotSent()),
    zds.encode_ack(zds.Ack("boom")),
]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes replaced, inserted or cut: reaches deeper parser paths."""
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["replace", "insert", "cut"])):
            case "replace" if pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            case "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
            case _:
                del data[pos:]
    return bytes(data)


_datagrams = st.one_of(st.binary(max_size=1100), _mutated())
_nfds = st.integers(0, 3)


@settings(max_examples=500)
@given(_datagrams, _nfds)
def test_decoders_raise_only_remote_errors(data: bytes, nfds: int) -> None:
    for decode in (zds.decode_hello, zds.decode_request, zds.decode_ack):
        try:
            result = decode(data, nfds)
        except zds.ZdsRemoteError:
            continue
        # Whatever decoded obeys the fd rules and, if the datagram was below the encoder's
        # limit, re-encodes (unknown fields are dropped, so it can only shrink).
        fits = len(data) < zds.MAX_MESSAGE_SIZE
        if isinstance(result, zds.Hello):
            assert result.version == zds.VERSION_V1
            assert nfds == 0
        elif isinstance(result, zds.Ack):
            assert nfds == 0
            assert not fits or zds.decode_ack(zds.encode_ack(result), 0) == result
        else:
            assert nfds == (1 if isinstance(result, zds.AddWorkload) else 0)
            assert not fits or zds.decode_request(zds.encode_request(result), nfds) == result


@settings(max_examples=300)
@given(st.lists(st.tuples(_datagrams, _nfds), max_size=6))
def test_agent_session_raises_only_remote_errors(datagrams: list[tuple[bytes, int]]) -> None:
    session = zds.AgentSession()
    for data, nfds in datagrams:
        try:
            session.receive(data, nfds)
        except zds.ZdsRemoteError:
            assert session.state is zds.State.FAILED
            return
        if session.state is zds.State.SNAPSHOT and session.pending is None:
            session.send(zds.SnapshotSent())


@settings(max_examples=300)
@given(st.lists(st.tuples(_datagrams, _nfds), max_size=6))
def test_ztunnel_session_raises_only_remote_errors(datagrams: list[tuple[bytes, int]]) -> None:
    session = zds.ZtunnelSession(known_uids={"uid-1"})
    session.send_hello()
    for data, nfds in datagrams:
        try:
            session.receive(data, nfds)
        except zds.ZdsRemoteError:
            assert session.state is zds.State.FAILED
            return
        session.send_ack(zds.Ack())
