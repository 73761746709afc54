"""Inbound connections kept under authorization for as long as they live (spec section 6, item 6;
ztunnel src/proxy/connection_manager.rs: ConnectionManager and PolicyWatcher).

Every inbound connection that passed RBAC is tracked with the inputs it was authorized on. When
an xDS update changes the policies of a local workload, ProxyState tells the PolicyWatcher while
it applies the batch; the watcher wakes at once and decides the tracked connections of the
affected workloads again, closing the ones now denied with ztunnel's
AuthorizationPolicyLateRejection.

Invariants:
- A connection is tracked from its authorization on: the inbound paths call `track` right after
  the decision with no await in between, so no update can land unseen between the two. Anything
  tracked after an update was authorized under it (or a later one) already.
- A tracked connection is revoked at most once. A revocation that lands before the relay is bound
  (while we are still connecting to the app) is kept in `revocation`, and the inbound path
  refuses the connection instead of starting the relay.
- Connections are grouped by workload and then by their ConnectionInfo when tracked, so a
  re-check makes one decision per distinct (identity, source ip, destination ip, port) and
  hashes nothing.
- Deciding (`build_revocations`) is pure and always reads the current state; acting comes after.
  The watcher works in chunks and yields to the event loop between them, so thousands of live
  connections do not stall every relay on the node while they are decided.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from meshcore import log, rbac
from meshcore.model import ids, workload
from ztunnel.state import proxy_state

logger = logging.getLogger("ztunnel.connections")

Closer = Callable[[str], None]
# Decisions made between two yields to the event loop (a few ms of work: see bench/recheck.py).
RECHECK_CHUNK = 250


class TrackedConnection:
    """One authorized inbound connection: what it was authorized on, and how to close it."""

    __slots__ = ("_closer", "_manager", "conn", "local", "revocation")

    def __init__(
        self, manager: ConnectionManager, conn: rbac.ConnectionInfo, local: workload.Workload
    ) -> None:
        self._manager = manager
        self.conn = conn
        # The destination workload as it was at connect time: its uid finds the current record,
        # and it stands in for that record if xDS has dropped it.
        self.local = local
        self.revocation: str | None = None
        self._closer: Closer | None = None

    @property
    def uid(self) -> ids.WorkloadUid:
        return self.local.uid

    def bind(self, closer: Closer) -> None:
        """`closer(reason)` tears the live connection down; called at most once, by `revoke`."""
        if self.revocation is not None:
            closer(self.revocation)
            return
        self._closer = closer

    def unbind(self) -> None:
        """The connection has ended: nothing is left to close."""
        self._closer = None

    def revoke(self, reason: str) -> None:
        if self.revocation is not None:
            return
        self.revocation = reason
        closer, self._closer = self._closer, None
        if closer is not None:
            closer(reason)

    def release(self) -> None:
        """Stop tracking (the connection ended or was refused); idempotent."""
        self._closer = None
        self._manager.forget(self)

    def __enter__(self) -> TrackedConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.release()


Group = tuple[rbac.ConnectionInfo, Mapping[TrackedConnection, None]]


class Candidate(typing.NamedTuple):
    """Tracked connections of one workload, grouped by what they were authorized on."""

    uid: ids.WorkloadUid
    snapshot: workload.Workload  # the workload at connect time, if xDS no longer has it
    # A copy of the list, so the registry may change while a re-check yields; each group's
    # connections are read only when it is decided.
    groups: Sequence[Group]


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    connection: TrackedConnection
    decision: rbac.Decision
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class RecheckResult:
    decisions: int  # distinct (workload, ConnectionInfo) decided again
    checked: int  # tracked connections those decisions covered
    closed: int
    seconds: float


# uid -> ConnectionInfo -> connections (dicts keep arrival order: the oldest close first).
_Registry = dict[ids.WorkloadUid, dict[rbac.ConnectionInfo, dict[TrackedConnection, None]]]


class ConnectionManager:
    """The registry of authorized inbound connections of every pod on the node."""

    def __init__(self) -> None:
        self._by_workload: _Registry = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def track(self, conn: rbac.ConnectionInfo, local: workload.Workload) -> TrackedConnection:
        tracked = TrackedConnection(self, conn, local)
        self._by_workload.setdefault(local.uid, {}).setdefault(conn, {})[tracked] = None
        self._count += 1
        return tracked

    def forget(self, tracked: TrackedConnection) -> None:
        infos = self._by_workload.get(tracked.uid)
        group = infos.get(tracked.conn) if infos is not None else None
        if infos is None or group is None or tracked not in group:
            return  # already forgotten
        del group[tracked]
        self._count -= 1
        if not group:
            del infos[tracked.conn]
            if not infos:
                del self._by_workload[tracked.uid]

    def find_by_workload(self, uid: ids.WorkloadUid) -> list[TrackedConnection]:
        return [t for group in self._by_workload.get(uid, {}).values() for t in group]

    def find_candidates(
        self, state: proxy_state.ProxyState, change: proxy_state.PolicyChange | None
    ) -> list[Candidate]:
        """What `change` may have turned into a deny (everything when None), at this moment."""
        found: list[Candidate] = []
        for uid, infos in self._by_workload.items():
            first_group = next(iter(infos.values()))
            snapshot = next(iter(first_group)).local
            if change is not None:
                current = state.workloads.find(uid)
                if not (change.affects(snapshot) or (current and change.affects(current))):
                    continue
            found.append(Candidate(uid, snapshot, list(infos.items())))
        return found

    def recheck(
        self, state: proxy_state.ProxyState, change: proxy_state.PolicyChange | None = None
    ) -> RecheckResult:
        """Decide what `change` may affect (all when None) in one go, and close what is denied.

        The PolicyWatcher does the same in chunks, yielding in between; this one-go version is
        for tests and the measurement in bench/recheck.py."""
        started = time.perf_counter()
        candidates = self.find_candidates(state, change)
        revocations, checked = build_revocations(state, candidates)
        carry_out(revocations)
        decisions = sum(len(c.groups) for c in candidates)
        return RecheckResult(decisions, checked, len(revocations), time.perf_counter() - started)


def build_revocations(
    state: proxy_state.ProxyState, candidates: Iterable[Candidate]
) -> tuple[list[Revocation], int]:
    """The tracked connections the current policies deny, and how many connections were decided.

    Pure: reads `state`, changes nothing. A workload's current xDS record is used when there is
    one, so a changed `authorization_policies` list counts; otherwise the connect-time snapshot.
    """
    revocations: list[Revocation] = []
    checked = 0
    for candidate in candidates:
        local = state.workloads.find(candidate.uid) or candidate.snapshot
        policies = state.policies.find_applicable(local)
        for conn, group in candidate.groups:
            live = [c for c in group if c.revocation is None]
            if not live:
                continue  # ended, or already being closed
            checked += len(live)
            decision = rbac.evaluate(policies, conn)
            if not decision.is_allowed:
                reason = late_rejection_reason(decision)
                revocations.extend(Revocation(c, decision, reason) for c in live)
    return revocations, checked


def split(candidates: Iterable[Candidate], size: int) -> Iterator[list[Candidate]]:
    """Candidates in chunks of at most `size` decisions each (a workload may span chunks)."""
    chunk: list[Candidate] = []
    room = size
    for candidate in candidates:
        groups, start = candidate.groups, 0
        while start < len(groups):
            part = groups[start : start + room]
            start += len(part)
            chunk.append(candidate._replace(groups=part))
            room -= len(part)
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def carry_out(revocations: Iterable[Revocation]) -> None:
    """Close every revoked connection (its relay is aborted, or its connect refused)."""
    for revocation in revocations:
        try:
            revocation.connection.revoke(revocation.reason)
        except Exception:
            # One connection's teardown failing must not keep the others open.
            logger.exception("closing a denied connection failed")


def late_rejection_reason(decision: rbac.Decision) -> str:
    """The access log's error for a connection closed by a policy update
    (ztunnel's AuthorizationPolicyLateRejection, with the policy that decided)."""
    if decision.verdict is rbac.Verdict.EXPLICITLY_DENIED and decision.policy is not None:
        why = f"denied by policy {decision.policy}"
    elif decision.verdict is rbac.Verdict.NOT_ALLOWED:
        why = "not allowed by any ALLOW policy"
    else:
        why = decision.verdict.value
    return f"connection closed: {why} after a policy update"


class PolicyWatcher:
    """Re-checks tracked connections after every policy change ProxyState applies.

    Subscribed from construction, so no change is missed before `run` starts; changes that
    arrive while a round is under way are merged and handled by the next round.
    """

    def __init__(
        self,
        state: proxy_state.ProxyState,
        connections: ConnectionManager,
        *,
        chunk: int = RECHECK_CHUNK,
    ) -> None:
        self._state = state
        self._connections = connections
        self._chunk = chunk
        self._pending: proxy_state.PolicyChange | None = None
        self._wake = asyncio.Event()
        self._unsubscribe = state.on_policy_change(self._on_change)

    def _on_change(self, change: proxy_state.PolicyChange) -> None:
        self._pending = change if self._pending is None else self._pending.merge(change)
        self._wake.set()

    def close(self) -> None:
        self._unsubscribe()

    async def run(self) -> None:
        """Until cancelled: wait for a change, then decide and close, yielding between chunks."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                change, self._pending = self._pending, None
                if change is None:
                    continue
                try:
                    await self._recheck(change)
                except Exception:
                    # The task must outlive a bug here; the next update re-checks again.
                    logger.exception("re-checking connections after a policy update failed")
        finally:
            self.close()

    async def _recheck(self, change: proxy_state.PolicyChange) -> None:
        started = time.perf_counter()
        candidates = self._connections.find_candidates(self._state, change)
        checked = closed = 0
        for index, chunk in enumerate(split(candidates, self._chunk)):
            if index:
                await asyncio.sleep(0)  # let the relays run; the state is read afresh after
            revocations, count = build_revocations(self._state, chunk)
            checked += count
            carry_out(revocations)
            closed += len(revocations)
        seconds = time.perf_counter() - started
        fields = log.fields(checked=checked, closed=closed, ms=round(seconds * 1000, 3))
        if closed:
            logger.info("connections closed after a policy update", extra=fields)
        else:
            logger.debug("connections re-checked after a policy update", extra=fields)
