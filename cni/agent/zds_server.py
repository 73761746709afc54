"""The agent's ZDS server: hands pod network namespaces to ztunnel (spec section 4).

The agent listens; each ztunnel connects, says Hello, and receives a snapshot of every enrolled
pod (an Add with the netns fd, or a Keep when the agent has no netns handle), then SnapshotSent.
After that the agent sends Add for new pods to the NEWEST connection only and Del to ALL (two
ztunnels overlap during a rolling upgrade). When the newest connection goes away while an older
one remains (the new ztunnel failed during the upgrade, or something else connected and left),
the older one is sent an Add for every enrolled pod (ztunnel treats an Add of a pod it already
proxies in the same namespace as nothing to do), so pods added in the meantime are not lost.

Invariants:
- One request at a time per connection (acks match requests by order only): every exchange holds
  the connection's lock, and the whole snapshot replay holds it too, so a concurrent Add waits
  behind the replay instead of interleaving with it.
- Each connection has one reader task; it resolves the outstanding exchange with the Ack, and
  notices at once when ztunnel goes away or sends something it should not. Either way the
  connection is closed and dropped; other connections and the listener are unaffected.
- A request not acked within `ACK_TIMEOUT` closes its connection: a late Ack would otherwise be
  matched to the next request.
- The agent never keeps fds from ztunnel (it has no reason to send any) and closes every netns fd
  it opens right after the send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshcore import errors, log, netns
from meshcore.aio import seqpacket
from meshcore.wire import zds

logger = logging.getLogger("cni.zds")

ACK_TIMEOUT = 5.0  # seconds; the deadline istio-cni uses for each read and write
MAX_CONNECTIONS_PER_SECOND = 5


class ZdsServerError(errors.MeshError):
    """Root of the errors the ZDS server reports to its callers."""


class NoZtunnelError(ZdsServerError):
    def __init__(self) -> None:
        super().__init__("no ztunnel connection")


class ZtunnelRejectedError(ZdsServerError):
    """ztunnel answered with an Ack carrying an error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ZtunnelTimeoutError(ZdsServerError):
    """ztunnel did not answer in time; its connection has been closed."""


class ZtunnelConnectionLostError(ZdsServerError):
    """The ztunnel connection went away before answering."""


class InvalidRequestError(ZdsServerError):
    """The request cannot be sent as given (e.g. it would not fit in one ZDS datagram)."""


@dataclass(frozen=True)
class SnapshotEntry:
    """One enrolled pod, as the snapshot sent to a (re)connecting ztunnel lists it.

    `netns_path` None means the agent lost the handle (e.g. after its own restart): ztunnel is
    told to keep what it has (KeepWorkload) instead.
    """

    uid: str
    info: zds.WorkloadInfo
    netns_path: str | None


class _Connection:
    """One connected ztunnel. `exchange()` must be called with `lock` held."""

    def __init__(
        self, channel: seqpacket.SeqpacketChannel, conn_id: int, ack_timeout: float
    ) -> None:
        self.channel = channel
        self.id = conn_id
        self.ack_timeout = ack_timeout
        self.session = zds.AgentSession()
        self.lock = asyncio.Lock()
        self._pending: asyncio.Future[zds.Ack] | None = None

    @property
    def is_closed(self) -> bool:
        return self.channel.is_closed

    def close(self, reason: str) -> None:
        if not self.channel.is_closed:
            logger.info("closing ztunnel connection", extra=log.fields(conn=self.id, reason=reason))
        self.channel.close()
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.set_exception(ZtunnelConnectionLostError(f"ztunnel connection lost: {reason}"))

    async def read_hello(self) -> zds.Hello:
        async with asyncio.timeout(self.ack_timeout):
            data, fds = await self.channel.recv()
        seqpacket.close_fds(fds)
        hello = self.session.receive(data, len(fds))
        assert isinstance(hello, zds.Hello)  # the session decodes only a Hello first
        return hello

    async def read_acks(self) -> None:
        """Runs for the connection's lifetime; ends (and closes it) on EOF or a protocol error."""
        reason = "peer closed the connection"
        try:
            while True:
                data, fds = await self.channel.recv()
                seqpacket.close_fds(fds)
                ack = self.session.receive(data, len(fds))
                assert isinstance(ack, zds.Ack)  # after the Hello the session decodes only Acks
                pending = self._pending
                if pending is not None and not pending.done():
                    pending.set_result(ack)
        except seqpacket.ChannelClosedError:
            pass
        except (zds.ZdsError, seqpacket.TruncatedMessageError) as exc:
            reason = f"protocol error: {exc}"
            logger.warning(
                "ztunnel broke the ZDS protocol; disconnecting",
                extra=log.fields(conn=self.id, error=str(exc)),
            )
        finally:
            self.close(reason)

    async def exchange(self, request: zds.Request, fds: Sequence[int] = ()) -> zds.Ack:
        if self.is_closed:
            raise ZtunnelConnectionLostError("ztunnel connection lost before the request")
        try:
            data = self.session.send(request)
        except zds.ZdsLocalError as exc:
            raise InvalidRequestError(str(exc)) from exc
        pending: asyncio.Future[zds.Ack] = asyncio.get_running_loop().create_future()
        self._pending = pending
        try:
            async with asyncio.timeout(self.ack_timeout):
                await self.channel.send(data, fds)
                return await pending
        except TimeoutError:
            what = type(request).__name__
            self.close(f"no Ack for {what} within {self.ack_timeout} s")
            raise ZtunnelTimeoutError(
                f"ztunnel did not acknowledge {what} within {self.ack_timeout} s"
            ) from None
        except seqpacket.ChannelClosedError as exc:
            self.close(str(exc))
            raise ZtunnelConnectionLostError(f"ztunnel connection lost: {exc}") from exc
        finally:
            if self._pending is pending:
                self._pending = None


class ZdsServer:
    """Listens on `path` for ztunnel connections; see the module docstring for the rules.

    `snapshot()` is called for every new connection and must list every enrolled pod.
    `ack_timeout` bounds each request's send + Ack (and the wait for a new connection's Hello).
    """

    def __init__(
        self,
        path: str,
        snapshot: Callable[[], Sequence[SnapshotEntry]],
        *,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._ack_timeout = ack_timeout
        self._listener: seqpacket.Listener | None = None
        self._main: asyncio.Task[None] | None = None
        # Oldest first; only connections that have said Hello.
        self._conns: list[_Connection] = []
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._ids = itertools.count(1)

    @property
    def path(self) -> str:
        return self._path

    @property
    def is_connected(self) -> bool:
        return any(not conn.is_closed for conn in self._conns)

    async def start(self) -> None:
        if self._main is not None:
            raise RuntimeError("ZdsServer already started")
        self._listener = seqpacket.Listener.bind(self._path)
        self._main = asyncio.create_task(self._run(self._listener), name="zds-server")
        logger.info("ZDS server listening", extra=log.fields(path=self._path))

    async def close(self) -> None:
        """Stop accepting, close every connection (failing their pending requests), wait."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns):
            conn.close("server shutting down")
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None

    async def wait_connected(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise ZtunnelTimeoutError(f"no ztunnel connected within {timeout} s") from None

    async def wait_disconnected(self) -> None:
        """Return once no ztunnel is connected (at once if none is)."""
        await self._disconnected.wait()

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_path: str) -> None:
        """Hand pod `uid` to the newest ztunnel and wait for its Ack (`ack_timeout`).

        Raises NoZtunnelError, ZtunnelRejectedError, ZtunnelTimeoutError,
        ZtunnelConnectionLostError, or netns.NetnsError when the namespace cannot be opened.
        """
        conn = self._newest()
        if conn is None:
            raise NoZtunnelError()
        fd = netns.open_netns(netns_path)
        try:
            async with conn.lock:
                ack = await conn.exchange(zds.AddWorkload(uid, info), [fd])
        finally:
            os.close(fd)
        if not ack.is_ok:
            raise ZtunnelRejectedError(ack.error)

    async def del_workload(self, uid: str) -> None:
        """Tell every connected ztunnel that pod `uid` is gone.

        All connections are tried; the first failure (if any) is raised afterwards. With no
        ztunnel connected there is nothing to do: the next snapshot will not mention the pod.
        """
        conns = [conn for conn in self._conns if not conn.is_closed]
        results = await asyncio.gather(
            *(self._del_one(conn, uid) for conn in conns), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _del_one(self, conn: _Connection, uid: str) -> None:
        async with conn.lock:
            ack = await conn.exchange(zds.DelWorkload(uid))
        if not ack.is_ok:
            raise ZtunnelRejectedError(ack.error)

    def _newest(self) -> _Connection | None:
        for conn in reversed(self._conns):
            if not conn.is_closed:
                return conn
        return None

    async def _run(self, listener: seqpacket.Listener) -> None:
        accepted: collections.deque[float] = collections.deque(maxlen=MAX_CONNECTIONS_PER_SECOND)
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tasks:
            while True:
                # Rate limit: the sixth connection within one second waits in the backlog.
                if len(accepted) == accepted.maxlen:
                    wait = accepted[0] + 1.0 - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    channel = await listener.accept()
                except seqpacket.ChannelClosedError:
                    return
                except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                    logger.error("accept failed", extra=log.fields(error=str(exc)))
                    await asyncio.sleep(0.1)
                    continue
                accepted.append(loop.time())
                conn = _Connection(channel, next(self._ids), self._ack_timeout)
                tasks.create_task(self._serve(conn), name=f"zds-conn-{conn.id}")

    async def _serve(self, conn: _Connection) -> None:
        was_newest = False
        try:
            try:
                hello = await conn.read_hello()
            except (TimeoutError, zds.ZdsError, seqpacket.SeqpacketError) as exc:
                logger.warning(
                    "ztunnel connection failed before Hello; disconnecting",
                    extra=log.fields(conn=conn.id, error=str(exc) or type(exc).__name__),
                )
                return
            logger.info("ztunnel connected", extra=log.fields(conn=conn.id, version=hello.version))
            self._conns.append(conn)
            self._connected.set()
            self._disconnected.clear()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(conn.read_acks(), name=f"zds-acks-{conn.id}")
                await self._replay_snapshot(conn)
        except Exception:
            logger.exception("ZDS connection handler failed", extra=log.fields(conn=conn.id))
        finally:
            was_newest = bool(self._conns) and self._conns[-1] is conn
            conn.close("connection handler finished")
            if conn in self._conns:
                self._conns.remove(conn)
            if not self.is_connected:
                self._connected.clear()
                self._disconnected.set()
        survivor = self._newest()
        if was_newest and survivor is not None:
            await self._resync(survivor, gone=conn)

    async def _resync(self, conn: _Connection, *, gone: _Connection) -> None:
        """The newest connection went away: `conn`, older, may lack the pods added since."""
        logger.info(
            "newest ztunnel connection gone; re-sending every pod to the older one",
            extra=log.fields(conn=conn.id, gone=gone.id),
        )
        try:
            async with conn.lock:
                entries = [e for e in self._snapshot() if e.netns_path is not None]
                for entry in entries:
                    await self._replay_entry(conn, entry)
        except ZdsServerError as exc:
            # The exchange closed that connection too; its ztunnel reconnects for a snapshot.
            logger.warning("resync aborted", extra=log.fields(conn=conn.id, error=str(exc)))

    async def _replay_snapshot(self, conn: _Connection) -> None:
        try:
            async with conn.lock:
                entries = list(self._snapshot())
                for entry in entries:
                    await self._replay_entry(conn, entry)
                ack = await conn.exchange(zds.SnapshotSent())
        except ZdsServerError as exc:
            logger.warning(
                "snapshot replay aborted", extra=log.fields(conn=conn.id, error=str(exc))
            )
            conn.close(f"snapshot replay aborted: {exc}")
            return
        if not ack.is_ok:
            logger.warning(
                "ztunnel reported an error for SnapshotSent",
                extra=log.fields(conn=conn.id, error=ack.error),
            )
        logger.info("snapshot sent", extra=log.fields(conn=conn.id, workloads=len(entries)))

    async def _replay_entry(self, conn: _Connection, entry: SnapshotEntry) -> None:
        fd: int | None = None
        if entry.netns_path is not None:
            try:
                fd = netns.open_netns(entry.netns_path)
            except netns.NetnsError as exc:
                # The pod is gone or going; leaving it out of the snapshot makes ztunnel drop it.
                logger.warning(
                    "skipping snapshot entry: netns unavailable",
                    extra=log.fields(conn=conn.id, uid=entry.uid, error=str(exc)),
                )
                return
        try:
            if fd is None:
                ack = await conn.exchange(zds.KeepWorkload(entry.uid))
            else:
                ack = await conn.exchange(zds.AddWorkload(entry.uid, entry.info), [fd])
        except InvalidRequestError as exc:
            logger.warning(
                "skipping snapshot entry: cannot encode it",
                extra=log.fields(conn=conn.id, uid=entry.uid, error=str(exc)),
            )
            return
        finally:
            if fd is not None:
                os.close(fd)
        if not ack.is_ok:
            logger.warning(
                "ztunnel rejected a snapshot entry",
                extra=log.fields(conn=conn.id, uid=entry.uid, error=ack.error),
            )
