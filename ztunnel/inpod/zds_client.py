"""ztunnel's ZDS client: receives pod network namespaces from the node agent (spec section 4).

ztunnel connects to the agent's SEQPACKET socket, says Hello(V1), then handles one request at a
time and acks each: first the snapshot (Add/Keep per enrolled pod, then SnapshotSent), then
steady-state Add/Del. The connection is retried forever with doubling backoff; the backoff
resets only after a connection reached the steady state, so an agent that accepts and drops at
once cannot make us spin.

fd ownership: the netns fd of an AddWorkload passes to `WorkloadHandler.add_workload` on the
call, whether it returns or raises. Fds on any other message are a protocol error; they are
closed here and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from meshcore import log
from meshcore.aio import seqpacket
from meshcore.wire import zds

logger = logging.getLogger("ztunnel.inpod.zds")


class WorkloadHandler(Protocol):
    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        """Start (or replace) the proxy for `uid`. Owns `netns_fd` from the call on.

        Raising makes the Ack carry `str(exc)`.
        """

    async def keep_workload(self, uid: str) -> None: ...

    async def del_workload(self, uid: str) -> None: ...

    async def snapshot_done(self, keep_uids: frozenset[str]) -> None:
        """The snapshot is complete: drop every proxy whose uid is not in `keep_uids`."""


class ZdsClient:
    def __init__(
        self,
        path: str,
        handler: WorkloadHandler,
        *,
        backoff_min: float = 0.01,
        backoff_max: float = 15.0,
    ) -> None:
        self._path = path
        self._handler = handler
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._ready = asyncio.Event()
        # Workloads the agent has handed us, carried across connections so that a new snapshot
        # can tell which ones are stale.
        self._known: frozenset[str] = frozenset()

    @property
    def is_ready(self) -> bool:
        """A SnapshotSent has been processed on the current connection."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Connect and serve forever; cancel the task to stop."""
        backoff = self._backoff_min
        while True:
            reached_steady = False
            try:
                channel = await seqpacket.connect(self._path)
            except (OSError, seqpacket.SeqpacketError) as exc:
                logger.debug(
                    "cannot reach the node agent",
                    extra=log.fields(path=self._path, error=str(exc), retry_in=backoff),
                )
            else:
                logger.info("connected to the node agent", extra=log.fields(path=self._path))
                try:
                    reached_steady = await self._serve(channel)
                finally:
                    channel.close()
                    self._ready.clear()
            if reached_steady:
                backoff = self._backoff_min
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _serve(self, channel: seqpacket.SeqpacketChannel) -> bool:
        """Serve one connection until it ends; returns whether it reached the steady state."""
        session = zds.ZtunnelSession(self._known)
        try:
            await channel.send(session.send_hello())
            while True:
                data, fds = await channel.recv()
                try:
                    request = session.receive(data, len(fds))
                except zds.ZdsRemoteError:
                    seqpacket.close_fds(fds)
                    raise
                error = await self._dispatch(session, request, fds)
                await channel.send(session.send_ack(zds.build_ack(error)))
                self._known = session.known_uids
                if isinstance(request, zds.SnapshotSent) and not error:
                    self._ready.set()
        except seqpacket.ChannelClosedError as exc:
            logger.info("node agent connection closed", extra=log.fields(reason=str(exc)))
        except (zds.ZdsRemoteError, seqpacket.TruncatedMessageError) as exc:
            logger.warning(
                "node agent broke the ZDS protocol; reconnecting", extra=log.fields(error=str(exc))
            )
        return session.is_ready

    async def _dispatch(
        self, session: zds.ZtunnelSession, request: zds.Request, fds: list[int]
    ) -> str:
        """Run the handler for one request; returns the Ack error ("" on success)."""
        try:
            match request:
                case zds.AddWorkload(uid=uid, info=info):
                    await self._handler.add_workload(uid, info, fds[0])
                case zds.KeepWorkload(uid=uid):
                    await self._handler.keep_workload(uid)
                case zds.DelWorkload(uid=uid):
                    await self._handler.del_workload(uid)
                case zds.SnapshotSent():
                    if session.stale_uids:
                        logger.info(
                            "dropping workloads missing from the snapshot",
                            extra=log.fields(uids=sorted(session.stale_uids)),
                        )
                    await self._handler.snapshot_done(session.snapshot_uids)
        except Exception as exc:
            logger.warning(
                "workload request failed",
                extra=log.fields(request=type(request).__name__, error=str(exc)),
            )
            return str(exc) or type(exc).__name__
        return ""
