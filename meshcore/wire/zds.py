"""ZDS, the node agent <-> ztunnel protocol (spec section 4), sans-I/O.

Transport facts the codec relies on: one protobuf message per SOCK_SEQPACKET datagram, no length
prefix; ztunnel reads into a 1 KiB buffer, so every message we encode stays under
`MAX_MESSAGE_SIZE`. File descriptors travel beside the bytes (SCM_RIGHTS); the codec only sees how
many arrived (`nfds`) and enforces the rule: an AddWorkload carries exactly one (the pod's netns),
every other message carries none.

The agent is the server, ztunnel the client. The conversation, as both ends track it:

    AWAIT_HELLO --Hello--> SNAPSHOT --SnapshotSent--> STEADY
    SNAPSHOT: AddWorkload | KeepWorkload | DelWorkload (one per cached pod, each acked)
    STEADY:   AddWorkload | DelWorkload

Every request is answered by one Ack before the next request is sent; acks are matched to
requests by order only. Both sessions below follow the single `_TRANSITIONS` table: the two peers
track the same conversation, so one table keeps them from drifting apart.

Errors follow h11: `ZdsRemoteError` when the peer broke the protocol (the connection is then
useless and the session refuses further use), `ZdsLocalError` when our own code misused it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from google.protobuf import message as pb_message

from meshcore import errors
from meshcore.proto import zds_pb2

VERSION_V1 = 1
# ztunnel's receive buffer (Z:src/inpod/packet.rs). A datagram of this size still fits, but we keep
# every message strictly below it so a peer with an off-by-one never sees MSG_TRUNC.
MAX_MESSAGE_SIZE = 1024
# An Ack error is free text from a failed handler; this many characters always fit (4 bytes each
# in the worst case, plus the framing).
MAX_ERROR_CHARS = 240


class ZdsError(errors.MeshError):
    """Root of every ZDS protocol error."""


class ZdsRemoteError(ZdsError):
    """The peer sent something the protocol does not allow; the connection must be dropped."""


class ZdsLocalError(ZdsError):
    """Our side misused the protocol (a bug) or built a message too large to send."""


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class AddWorkload:
    """Start proxying for pod `uid` (the Kubernetes pod UID); its netns fd travels with it."""

    uid: str
    info: WorkloadInfo


@dataclass(frozen=True)
class KeepWorkload:
    """Snapshot only: keep the proxy for `uid`; the agent no longer holds its netns."""

    uid: str


@dataclass(frozen=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    """End of the snapshot: ztunnel drops every proxy the snapshot did not mention."""


Request: TypeAlias = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True)
class Ack:
    error: str = ""

    @property
    def is_ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class Hello:
    version: int = VERSION_V1


def build_ack(error: str = "") -> Ack:
    """An Ack whose error text is trimmed so the encoded message always fits in a datagram."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    return Ack(error)


# --- codec ------------------------------------------------------------------------------------


def _serialize(msg: pb_message.Message, what: str) -> bytes:
    try:
        data = msg.SerializeToString()
    except (ValueError, pb_message.EncodeError) as exc:  # e.g. a str with lone surrogates
        raise ZdsLocalError(f"cannot encode {what}: {exc}") from exc
    if len(data) >= MAX_MESSAGE_SIZE:
        raise ZdsLocalError(
            f"{what} encodes to {len(data)} bytes; ZDS messages must stay below "
            f"{MAX_MESSAGE_SIZE} bytes (ztunnel's receive buffer)"
        )
    return data


def _parse(msg: pb_message.Message, data: bytes, what: str) -> None:
    if len(data) > MAX_MESSAGE_SIZE:
        raise ZdsRemoteError(f"{what} of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    try:
        msg.ParseFromString(data)
    except (pb_message.DecodeError, ValueError) as exc:
        raise ZdsRemoteError(f"undecodable {what} ({len(data)} bytes): {exc}") from None


def _check_fds(nfds: int, expected: int, what: str) -> None:
    if nfds != expected:
        raise ZdsRemoteError(
            f"{what} carried {nfds} file descriptor(s); the protocol requires {expected}"
        )


def _check_uid(uid: str, what: str, err: type[ZdsError]) -> None:
    if not uid:
        raise err(f"{what}.uid is empty")


def encode_hello(version: int = VERSION_V1) -> bytes:
    return _serialize(zds_pb2.ZdsHello(version=version), "ZdsHello")  # type: ignore[arg-type]


def decode_hello(data: bytes, nfds: int) -> Hello:
    _check_fds(nfds, 0, "ZdsHello")
    msg = zds_pb2.ZdsHello()
    _parse(msg, data, "ZdsHello")
    version = int(msg.version)
    if version != VERSION_V1:
        raise ZdsRemoteError(f"unsupported ZDS version {version} in ZdsHello (want {VERSION_V1})")
    return Hello(version)


def encode_request(request: Request) -> bytes:
    what = type(request).__name__
    msg = zds_pb2.WorkloadRequest()
    match request:
        case AddWorkload(uid=uid, info=info):
            _check_uid(uid, what, ZdsLocalError)
            msg.add.uid = uid
            msg.add.workload_info.name = info.name
            msg.add.workload_info.namespace = info.namespace
            msg.add.workload_info.service_account = info.service_account
        case KeepWorkload(uid=uid):
            _check_uid(uid, what, ZdsLocalError)
            msg.keep.uid = uid
        case DelWorkload(uid=uid):
            _check_uid(uid, what, ZdsLocalError)
            getattr(msg, "del").uid = uid  # `del` is a Python keyword
        case SnapshotSent():
            msg.snapshot_sent.SetInParent()
    return _serialize(msg, what)


def decode_request(data: bytes, nfds: int) -> Request:
    msg = zds_pb2.WorkloadRequest()
    _parse(msg, data, "WorkloadRequest")
    kind = msg.WhichOneof("payload")
    request: Request
    if kind == "add":
        if not msg.add.HasField("workload_info"):
            raise ZdsRemoteError("AddWorkload.workload_info is missing")
        info = msg.add.workload_info
        request = AddWorkload(
            msg.add.uid, WorkloadInfo(info.name, info.namespace, info.service_account)
        )
        _check_uid(request.uid, "AddWorkload", ZdsRemoteError)
        _check_fds(nfds, 1, "AddWorkload")
        return request
    if kind == "keep":
        request = KeepWorkload(msg.keep.uid)
        _check_uid(request.uid, "KeepWorkload", ZdsRemoteError)
    elif kind == "del":
        request = DelWorkload(getattr(msg, "del").uid)
        _check_uid(request.uid, "DelWorkload", ZdsRemoteError)
    elif kind == "snapshot_sent":
        request = SnapshotSent()
    else:
        raise ZdsRemoteError("WorkloadRequest has no payload (empty or unknown oneof)")
    _check_fds(nfds, 0, type(request).__name__)
    return request


def encode_ack(ack: Ack) -> bytes:
    return _serialize(zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=ack.error)), "Ack")


def decode_ack(data: bytes, nfds: int) -> Ack:
    _check_fds(nfds, 0, "WorkloadResponse")
    msg = zds_pb2.WorkloadResponse()
    _parse(msg, data, "WorkloadResponse")
    if msg.WhichOneof("payload") != "ack":
        raise ZdsRemoteError("WorkloadResponse has no payload (empty or unknown oneof)")
    return Ack(msg.ack.error)


# --- state machines ---------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    SNAPSHOT = "snapshot"
    STEADY = "steady"
    # A remote protocol error happened: the connection must be closed.
    FAILED = "failed"


# (state, message type) -> next state. Anything missing is a protocol violation.
_TRANSITIONS: dict[tuple[State, type[object]], State] = {
    (State.AWAIT_HELLO, Hello): State.SNAPSHOT,
    (State.SNAPSHOT, AddWorkload): State.SNAPSHOT,
    (State.SNAPSHOT, KeepWorkload): State.SNAPSHOT,
    (State.SNAPSHOT, DelWorkload): State.SNAPSHOT,
    (State.SNAPSHOT, SnapshotSent): State.STEADY,
    (State.STEADY, AddWorkload): State.STEADY,
    (State.STEADY, DelWorkload): State.STEADY,
}


def _next_state(state: State, event: object) -> State | None:
    return _TRANSITIONS.get((state, type(event)))


class AgentSession:
    """The agent's (server's) view of one ztunnel connection.

    `receive()` takes each datagram from ztunnel (first the Hello, then one Ack per request);
    `send()` returns the bytes of the next request. At most one request is outstanding.
    """

    def __init__(self) -> None:
        self._state = State.AWAIT_HELLO
        self._pending: Request | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending(self) -> Request | None:
        """The request awaiting its Ack, if any."""
        return self._pending

    def _fail(self, message: str) -> ZdsRemoteError:
        self._state = State.FAILED
        return ZdsRemoteError(message)

    def receive(self, data: bytes, nfds: int) -> Hello | Ack:
        if self._state is State.FAILED:
            raise ZdsLocalError("session already failed; close the connection")
        try:
            if self._state is State.AWAIT_HELLO:
                hello = decode_hello(data, nfds)
                self._state = _TRANSITIONS[(self._state, Hello)]
                return hello
            if self._pending is None:
                raise self._fail("ztunnel sent a message while no request was outstanding")
            ack = decode_ack(data, nfds)
        except ZdsRemoteError:
            self._state = State.FAILED
            raise
        self._pending = None
        return ack

    def send(self, request: Request) -> bytes:
        name = type(request).__name__
        if self._pending is not None:
            raise ZdsLocalError(
                f"cannot send {name}: {type(self._pending).__name__} is still awaiting its Ack"
            )
        next_state = _next_state(self._state, request)
        if next_state is None:
            raise ZdsLocalError(f"cannot send {name} in state {self._state.value}")
        data = encode_request(request)
        self._state = next_state
        self._pending = request
        return data


class ZtunnelSession:
    """ztunnel's (client's) view of one agent connection.

    `known_uids` are the workloads this ztunnel already proxies (from earlier connections). The
    session records which uids the snapshot mentions; once SnapshotSent arrives,
    `snapshot_uids` is what to keep and `stale_uids` what was known but not mentioned (to drop).
    """

    def __init__(self, known_uids: Iterable[str] = ()) -> None:
        self._state = State.AWAIT_HELLO
        self._pending: Request | None = None
        self._known: set[str] = set(known_uids)
        self._previously_known = frozenset(self._known)
        self._snapshot: set[str] = set()
        self._stale: frozenset[str] = frozenset()

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending(self) -> Request | None:
        return self._pending

    @property
    def is_ready(self) -> bool:
        """SnapshotSent has been received (and possibly not yet acked)."""
        return self._state is State.STEADY

    @property
    def known_uids(self) -> frozenset[str]:
        """Uids the agent currently wants proxied, as far as this conversation says."""
        return frozenset(self._known)

    @property
    def snapshot_uids(self) -> frozenset[str]:
        return frozenset(self._snapshot)

    @property
    def stale_uids(self) -> frozenset[str]:
        """Uids known before this connection that the (complete) snapshot did not mention."""
        return self._stale

    def send_hello(self) -> bytes:
        if self._state is not State.AWAIT_HELLO:
            raise ZdsLocalError(f"Hello already sent (state {self._state.value})")
        data = encode_hello()
        self._state = _TRANSITIONS[(self._state, Hello)]
        return data

    def receive(self, data: bytes, nfds: int) -> Request:
        if self._state is State.FAILED:
            raise ZdsLocalError("session already failed; close the connection")
        if self._pending is not None:
            raise ZdsLocalError(
                f"ack {type(self._pending).__name__} before receiving the next request"
            )
        if self._state is State.AWAIT_HELLO:
            self._state = State.FAILED
            raise ZdsRemoteError("agent sent a request before ztunnel's Hello")
        try:
            request = decode_request(data, nfds)
        except ZdsRemoteError:
            self._state = State.FAILED
            raise
        next_state = _next_state(self._state, request)
        if next_state is None:
            state = self._state
            self._state = State.FAILED
            raise ZdsRemoteError(f"{type(request).__name__} is not allowed in state {state.value}")
        self._track(request)
        self._state = next_state
        self._pending = request
        return request

    def _track(self, request: Request) -> None:
        in_snapshot = self._state is State.SNAPSHOT
        match request:
            case AddWorkload(uid=uid) | KeepWorkload(uid=uid):
                self._known.add(uid)
                if in_snapshot:
                    self._snapshot.add(uid)
            case DelWorkload(uid=uid):
                self._known.discard(uid)
                self._snapshot.discard(uid)
            case SnapshotSent():
                self._stale = self._previously_known - self._snapshot
                self._known = set(self._snapshot)

    def send_ack(self, ack: Ack) -> bytes:
        if self._pending is None:
            raise ZdsLocalError("no request is awaiting an Ack")
        data = encode_ack(ack)
        self._pending = None
        return data
