"""ZDS sans-I/O: the agent and ztunnel sessions piped together, no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.wire import zds

INFO = zds.WorkloadInfo(name="web-1", namespace="shop", service_account="web")


@dataclass
class ZdsPair:
    """Both ends of one connection; datagrams are handed over directly with their fd count."""

    agent: zds.AgentSession
    ztunnel: zds.ZtunnelSession

    @classmethod
    def connected(cls, known: frozenset[str] = frozenset()) -> ZdsPair:
        pair = cls(zds.AgentSession(), zds.ZtunnelSession(known))
        assert pair.agent.receive(pair.ztunnel.send_hello(), 0) == zds.Hello(zds.VERSION_V1)
        return pair

    def exchange(self, request: zds.Request, error: str = "") -> tuple[zds.Request, zds.Ack]:
        data = self.agent.send(request)
        nfds = 1 if isinstance(request, zds.AddWorkload) else 0
        received = self.ztunnel.receive(data, nfds)
        ack = self.agent.receive(self.ztunnel.send_ack(zds.Ack(error)), 0)
        assert isinstance(ack, zds.Ack)
        return received, ack


def test_hello_snapshot_then_steady_state() -> None:
    pair = ZdsPair.connected(known=frozenset({"u-old", "u-kept"}))
    assert (pair.agent.state, pair.ztunnel.state) == (zds.State.SNAPSHOT, zds.State.SNAPSHOT)

    snapshot: list[zds.Request] = [
        zds.AddWorkload("u-new", INFO),
        zds.KeepWorkload("u-kept"),
        zds.SnapshotSent(),
    ]
    for request in snapshot:
        received, ack = pair.exchange(request)
        assert received == request
        assert ack.is_ok
    assert (pair.agent.state, pair.ztunnel.state) == (zds.State.STEADY, zds.State.STEADY)
    assert pair.ztunnel.is_ready
    assert pair.ztunnel.snapshot_uids == {"u-new", "u-kept"}
    assert pair.ztunnel.stale_uids == {"u-old"}

    assert pair.exchange(zds.AddWorkload("u-2", INFO))[0] == zds.AddWorkload("u-2", INFO)
    assert pair.exchange(zds.DelWorkload("u-new"))[0] == zds.DelWorkload("u-new")
    assert pair.ztunnel.known_uids == {"u-kept", "u-2"}
    assert pair.agent.pending is None
    assert pair.ztunnel.pending is None


def test_del_during_snapshot_removes_the_uid_from_it() -> None:
    pair = ZdsPair.connected()
    pair.exchange(zds.AddWorkload("u-1", INFO))
    pair.exchange(zds.DelWorkload("u-1"))
    pair.exchange(zds.SnapshotSent())
    assert pair.ztunnel.snapshot_uids == frozenset()


def test_ack_error_reaches_the_agent() -> None:
    pair = ZdsPair.connected()
    _, ack = pair.exchange(zds.AddWorkload("u-1", INFO), error="cannot enter netns")
    assert ack == zds.Ack("cannot enter netns")
    assert not ack.is_ok


def test_keep_after_snapshot_is_rejected_on_both_sides() -> None:
    pair = ZdsPair.connected()
    pair.exchange(zds.SnapshotSent())
    with pytest.raises(zds.ZdsLocalError, match="KeepWorkload in state steady"):
        pair.agent.send(zds.KeepWorkload("u-1"))
    # A misbehaving agent sends it anyway: ztunnel treats it as a protocol violation.
    with pytest.raises(zds.ZdsRemoteError, match="KeepWorkload is not allowed in state steady"):
        pair.ztunnel.receive(zds.encode_request(zds.KeepWorkload("u-1")), 0)
    assert pair.ztunnel.state is zds.State.FAILED
    with pytest.raises(zds.ZdsLocalError, match="already failed"):
        pair.ztunnel.receive(zds.encode_request(zds.DelWorkload("u-1")), 0)


def test_second_snapshot_sent_is_a_remote_error() -> None:
    pair = ZdsPair.connected()
    pair.exchange(zds.SnapshotSent())
    with pytest.raises(zds.ZdsRemoteError, match="SnapshotSent is not allowed"):
        pair.ztunnel.receive(zds.encode_request(zds.SnapshotSent()), 0)


def test_request_before_hello_is_a_remote_error() -> None:
    ztunnel = zds.ZtunnelSession()
    with pytest.raises(zds.ZdsRemoteError, match="before ztunnel's Hello"):
        ztunnel.receive(zds.encode_request(zds.SnapshotSent()), 0)


def test_agent_cannot_send_before_hello() -> None:
    with pytest.raises(zds.ZdsLocalError, match="in state await-hello"):
        zds.AgentSession().send(zds.SnapshotSent())


def test_hello_twice_is_a_local_error() -> None:
    ztunnel = zds.ZtunnelSession()
    ztunnel.send_hello()
    with pytest.raises(zds.ZdsLocalError, match="Hello already sent"):
        ztunnel.send_hello()


def test_unsolicited_ack_is_a_remote_error() -> None:
    pair = ZdsPair.connected()
    with pytest.raises(zds.ZdsRemoteError, match="no request was outstanding"):
        pair.agent.receive(zds.encode_ack(zds.Ack()), 0)
    assert pair.agent.state is zds.State.FAILED


def test_one_outstanding_request_at_a_time() -> None:
    pair = ZdsPair.connected()
    pair.agent.send(zds.AddWorkload("u-1", INFO))
    with pytest.raises(zds.ZdsLocalError, match="AddWorkload is still awaiting its Ack"):
        pair.agent.send(zds.AddWorkload("u-2", INFO))


def test_ztunnel_must_ack_before_the_next_request() -> None:
    pair = ZdsPair.connected()
    pair.ztunnel.receive(zds.encode_request(zds.AddWorkload("u-1", INFO)), 1)
    with pytest.raises(zds.ZdsLocalError, match="ack AddWorkload"):
        pair.ztunnel.receive(zds.encode_request(zds.AddWorkload("u-2", INFO)), 1)
    with pytest.raises(zds.ZdsLocalError, match="no request is awaiting"):
        zds.ZtunnelSession().send_ack(zds.Ack())


def test_unknown_hello_version_is_a_remote_error() -> None:
    with pytest.raises(zds.ZdsRemoteError, match="unsupported ZDS version 2"):
        zds.AgentSession().receive(zds.encode_hello(version=2), 0)
    with pytest.raises(zds.ZdsRemoteError, match="unsupported ZDS version 0"):
        zds.decode_hello(b"", 0)


@pytest.mark.parametrize(
    ("data", "nfds", "message"),
    [
        pytest.param(
            zds.encode_request(zds.AddWorkload("u", INFO)), 0, "requires 1", id="add-no-fd"
        ),
        pytest.param(
            zds.encode_request(zds.AddWorkload("u", INFO)), 2, "requires 1", id="add-2-fds"
        ),
        pytest.param(zds.encode_request(zds.DelWorkload("u")), 1, "requires 0", id="del-with-fd"),
        pytest.param(zds.encode_request(zds.KeepWorkload("u")), 1, "requires 0", id="keep-with-fd"),
        pytest.param(zds.encode_request(zds.SnapshotSent()), 1, "requires 0", id="snapshot-fd"),
        pytest.param(b"\x22\x00", 0, "no payload", id="unknown-oneof-field-4"),
        pytest.param(b"", 0, "no payload", id="empty"),
        pytest.param(b"\x0a\x05\x0a\x03u", 1, "undecodable", id="truncated-inner"),
        pytest.param(b"\x0a\x02\x0a\x00", 1, "workload_info is missing", id="add-without-info"),
        pytest.param(b"\x12\x00", 0, "DelWorkload.uid is empty", id="del-empty-uid"),
        pytest.param(b"\x0a" + b"\xff" * 11, 1, "undecodable", id="bad-varint"),
        pytest.param(b"\x00" * 1025, 0, "exceeds 1024", id="oversize"),
    ],
)
def test_decode_request_rejects(data: bytes, nfds: int, message: str) -> None:
    with pytest.raises(zds.ZdsRemoteError, match=message):
        zds.decode_request(data, nfds)


def test_fd_rules_for_hello_and_ack() -> None:
    with pytest.raises(zds.ZdsRemoteError, match="ZdsHello carried 1"):
        zds.decode_hello(zds.encode_hello(), 1)
    with pytest.raises(zds.ZdsRemoteError, match="WorkloadResponse carried 1"):
        zds.decode_ack(zds.encode_ack(zds.Ack()), 1)
    with pytest.raises(zds.ZdsRemoteError, match="no payload"):
        zds.decode_ack(b"", 0)


def test_every_truncation_of_an_add_is_a_remote_error() -> None:
    data = zds.encode_request(zds.AddWorkload("0b1d5f9e-uid", INFO))
    for cut in range(len(data)):
        with pytest.raises(zds.ZdsRemoteError):
            zds.decode_request(data[:cut], 1)


def test_exact_bytes() -> None:
    # WorkloadRequest.add (field 1) { uid (1) = "u1", workload_info (2) { name (1), namespace (2),
    # service_account (3) } }
    add = zds.encode_request(zds.AddWorkload("u1", zds.WorkloadInfo("n", "ns", "sa")))
    info = b"\x0a\x01n" + b"\x12\x02ns" + b"\x1a\x02sa"
    inner = b"\x0a\x02u1" + b"\x12" + bytes([len(info)]) + info
    assert add == b"\x0a" + bytes([len(inner)]) + inner
    # WorkloadRequest.del (field 2) { uid: field 2 (not 1) }
    assert zds.encode_request(zds.DelWorkload("u1")) == b"\x12\x04\x12\x02u1"
    # WorkloadRequest.keep is field 5; snapshot_sent field 3 (an empty message, still present)
    assert zds.encode_request(zds.KeepWorkload("u1")) == b"\x2a\x04\x0a\x02u1"
    assert zds.encode_request(zds.SnapshotSent()) == b"\x1a\x00"
    # WorkloadResponse.ack (1) { error (1) }; ZdsHello.version (1) = V1 (varint)
    assert zds.encode_ack(zds.Ack()) == b"\x0a\x00"
    assert zds.encode_ack(zds.Ack("x")) == b"\x0a\x03\x0a\x01x"
    assert zds.encode_hello() == b"\x08\x01"
    assert zds.decode_request(add, 1) == zds.AddWorkload("u1", zds.WorkloadInfo("n", "ns", "sa"))


def test_oversize_request_is_a_local_error_and_leaves_the_session_usable() -> None:
    pair = ZdsPair.connected()
    huge = zds.AddWorkload("u-1", zds.WorkloadInfo("x" * 2000, "shop", "web"))
    with pytest.raises(zds.ZdsLocalError, match="must stay below 1024"):
        pair.agent.send(huge)
    assert pair.agent.pending is None
    assert pair.exchange(zds.AddWorkload("u-1", INFO))[1].is_ok


def test_empty_uid_is_a_local_error() -> None:
    with pytest.raises(zds.ZdsLocalError, match=r"AddWorkload\.uid is empty"):
        zds.encode_request(zds.AddWorkload("", INFO))


@given(st.text(max_size=5000))
def test_build_ack_always_fits(error: str) -> None:
    data = zds.encode_ack(zds.build_ack(error))
    assert len(data) < zds.MAX_MESSAGE_SIZE
    if len(error) <= zds.MAX_ERROR_CHARS:
        assert zds.decode_ack(data, 0).error == error


_uids = st.sampled_from(["a", "b", "c", "d"])
_ops = st.lists(
    st.one_of(
        st.builds(zds.AddWorkload, _uids, st.just(INFO)),
        st.builds(zds.KeepWorkload, _uids),
        st.builds(zds.DelWorkload, _uids),
    ),
    max_size=12,
)


@given(known=st.frozensets(_uids), snapshot=_ops)
def test_snapshot_tracking_matches_a_model(
    known: frozenset[str], snapshot: list[zds.Request]
) -> None:
    pair = ZdsPair.connected(known)
    expected: set[str] = set()
    for request in snapshot:
        pair.exchange(request)
        if isinstance(request, zds.DelWorkload):
            expected.discard(request.uid)
        else:
            assert isinstance(request, zds.AddWorkload | zds.KeepWorkload)
            expected.add(request.uid)
    pair.exchange(zds.SnapshotSent())
    assert pair.ztunnel.snapshot_uids == expected
    assert pair.ztunnel.stale_uids == known - expected
    assert pair.ztunnel.known_uids == expected
