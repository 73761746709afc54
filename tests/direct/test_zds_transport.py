"""ZDS over real SOCK_SEQPACKET sockets: the agent's ZdsServer and ztunnel's ZdsClient in-process.

Every test runs on both asyncio and uvloop, checks that no fd is leaked (/proc/self/fd before and
after) and that no task is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from cni.agent import zds_server
from meshcore.aio import seqpacket
from meshcore.wire import zds
from ztunnel.inpod import zds_client

INFO = zds.WorkloadInfo("web-1", "shop", "web")
INFO2 = zds.WorkloadInfo("db-0", "shop", "db")
SELF_NETNS = "/proc/self/ns/net"
DEADLINE = 10.0

Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]


class RecordingHandler:
    """A WorkloadHandler that records calls; `reject` makes add_workload fail with that text."""

    def __init__(self, reject: str = "") -> None:
        self.calls: list[tuple[object, ...]] = []
        self.inodes: dict[str, int] = {}
        self.reject = reject

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        try:
            if self.reject:
                raise RuntimeError(self.reject)
            self.inodes[uid] = os.fstat(netns_fd).st_ino
            self.calls.append(("add", uid, info))
        finally:
            os.close(netns_fd)

    async def keep_workload(self, uid: str) -> None:
        self.calls.append(("keep", uid))

    async def del_workload(self, uid: str) -> None:
        self.calls.append(("del", uid))

    async def snapshot_done(self, keep_uids: frozenset[str]) -> None:
        self.calls.append(("snapshot_done", keep_uids))


def _seqpacket_inodes() -> set[str]:
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 7 and fields[4] == "0005":  # SOCK_SEQPACKET
                inodes.add(fields[6])
    return inodes


def _open_fds() -> set[str]:
    """Our fds that ZDS could leak: namespace handles and SEQPACKET sockets.

    Counting every fd would be flaky: libraries loaded by other tests in this process (gRPC's
    background threads) open and close fds of their own at any time.
    """
    seqpacket = _seqpacket_inodes()
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("net:[") or (
            target.startswith("socket:[") and target[8:-1] in seqpacket
        ):
            found.add(f"{fd}->{target}")
    return found


def run_clean(runner: Runner, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on a fresh loop; fail if it leaves tasks behind or leaks file descriptors."""

    async def checked() -> None:
        await main()
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, f"tasks left running: {leftover}"

    async def warm_up() -> None:
        pass

    # libuv keeps a process-wide pipe after its first loop: open it before counting.
    runner(warm_up())
    before = _open_fds()
    runner(checked())
    assert _open_fds() == before


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes: keep the directory short.
    directory = tempfile.mkdtemp(prefix="mt-zds-", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_client(
    path: str, handler: RecordingHandler
) -> Any:  # AsyncIterator[ZdsClient]; Any keeps mypy happy with the decorator
    client = zds_client.ZdsClient(path, handler, backoff_min=0.005, backoff_max=0.05)
    task = asyncio.create_task(client.run(), name="test-zds-client")
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running_server(
    path: str,
    entries: list[zds_server.SnapshotEntry] | None = None,
    ack_timeout: float = zds_server.ACK_TIMEOUT,
) -> Any:
    server = zds_server.ZdsServer(path, lambda: list(entries or []), ack_timeout=ack_timeout)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def expect_disconnect(channel: seqpacket.SeqpacketChannel) -> None:
    """The server must close this connection (no further datagram may arrive)."""
    try:
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(seqpacket.ChannelClosedError):
                await channel.recv()
    finally:
        channel.close()


async def raw_handshake(path: str) -> seqpacket.SeqpacketChannel:
    """A hand-driven ztunnel: Hello, then ack the (empty) snapshot."""
    channel = await seqpacket.connect(path)
    await channel.send(zds.encode_hello())
    data, fds = await channel.recv()
    assert fds == []
    assert zds.decode_request(data, 0) == zds.SnapshotSent()
    await channel.send(zds.encode_ack(zds.Ack()))
    return channel


@pytest.mark.parametrize("runner", RUNNERS)
def test_add_workload_hands_over_the_netns_fd(runner: Runner, sock_path: str) -> None:
    handler = RecordingHandler()

    async def main() -> None:
        # The client starts first and has to retry until the agent listens.
        async with (
            running_client(sock_path, handler) as client,
            running_server(sock_path) as server,
        ):
            async with asyncio.timeout(DEADLINE):
                await client.wait_ready()
                await server.wait_connected(DEADLINE)
                assert server.is_connected
                assert os.stat(sock_path).st_mode & 0o777 == 0o600
                await server.add_workload("uid-1", INFO, SELF_NETNS)
                assert handler.calls == [
                    ("snapshot_done", frozenset()),
                    ("add", "uid-1", INFO),
                ]
                assert handler.inodes["uid-1"] == os.stat(SELF_NETNS).st_ino
                await server.del_workload("uid-1")
                assert handler.calls[-1] == ("del", "uid-1")

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_snapshot_is_replayed_to_every_new_connection(runner: Runner, sock_path: str) -> None:
    entries = [
        zds_server.SnapshotEntry("uid-1", INFO, SELF_NETNS),
        zds_server.SnapshotEntry("uid-2", INFO2, None),
        # Its netns is gone: left out of the snapshot, so ztunnel drops the proxy.
        zds_server.SnapshotEntry("uid-gone", INFO, "/proc/self/ns/no-such-ns"),
    ]
    expected = [
        ("add", "uid-1", INFO),
        ("keep", "uid-2"),
        ("snapshot_done", frozenset({"uid-1", "uid-2"})),
    ]

    async def main() -> None:
        first, second = RecordingHandler(), RecordingHandler()
        async with running_server(sock_path, entries) as server:
            # ztunnel restarts: a new client gets the same snapshot.
            async with running_client(sock_path, first) as client:
                await asyncio.wait_for(client.wait_ready(), DEADLINE)
            assert first.calls == expected
            await asyncio.wait_for(server.wait_disconnected(), DEADLINE)
            assert not server.is_connected
            async with running_client(sock_path, second) as client:
                await asyncio.wait_for(client.wait_ready(), DEADLINE)
                assert second.calls == expected
                assert second.inodes["uid-1"] == os.stat(SELF_NETNS).st_ino
                # The agent restarts: the same client reconnects and is sent the snapshot again.
                await server.close()
                async with running_server(sock_path, entries[:1]):
                    await wait_until(lambda: len(second.calls) == 5)
                    await asyncio.wait_for(client.wait_ready(), DEADLINE)
                assert second.calls[3:] == [
                    ("add", "uid-1", INFO),
                    ("snapshot_done", frozenset({"uid-1"})),
                ]

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_add_workload_without_ztunnel(runner: Runner, sock_path: str) -> None:
    async def main() -> None:
        async with running_server(sock_path) as server:
            assert not server.is_connected
            await asyncio.wait_for(server.wait_disconnected(), DEADLINE)  # at once: none yet
            with pytest.raises(zds_server.NoZtunnelError, match=r"^no ztunnel connection$"):
                await server.add_workload("uid-1", INFO, SELF_NETNS)
            with pytest.raises(zds_server.ZtunnelTimeoutError):
                await server.wait_connected(0.05)
            await server.del_workload("uid-1")  # nobody to tell: not an error

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_handler_failure_is_reported_as_rejection(runner: Runner, sock_path: str) -> None:
    handler = RecordingHandler(reject="cannot create listeners in netns")

    async def main() -> None:
        async with running_server(sock_path) as server, running_client(sock_path, handler) as c:
            await asyncio.wait_for(c.wait_ready(), DEADLINE)
            with pytest.raises(zds_server.ZtunnelRejectedError) as caught:
                await server.add_workload("uid-1", INFO, SELF_NETNS)
            assert caught.value.message == "cannot create listeners in netns"
            # The connection stays usable.
            handler.reject = ""
            await server.add_workload("uid-1", INFO, SELF_NETNS)
            assert handler.calls[-1] == ("add", "uid-1", INFO)

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_misbehaving_peers_are_dropped_and_others_keep_working(
    runner: Runner, sock_path: str
) -> None:
    handler = RecordingHandler()

    async def main() -> None:
        async with running_server(sock_path) as server, running_client(sock_path, handler) as c:
            await asyncio.wait_for(c.wait_ready(), DEADLINE)

            garbage = await seqpacket.connect(sock_path)
            await garbage.send(b"\xff\xff\xff not protobuf")
            await expect_disconnect(garbage)

            reader, writer = os.pipe()
            try:
                hello_with_fd = await seqpacket.connect(sock_path)
                await hello_with_fd.send(zds.encode_hello(), [reader])
                await expect_disconnect(hello_with_fd)
            finally:
                os.close(reader)
                os.close(writer)

            bad_ack = await seqpacket.connect(sock_path)
            await bad_ack.send(zds.encode_hello())
            await bad_ack.recv()  # SnapshotSent
            await bad_ack.send(b"\x0a\x05truncated")
            await expect_disconnect(bad_ack)

            # 2000 bytes whose first 1024 are a valid Hello (repeated field, last wins): only
            # the MSG_TRUNC check can tell.
            oversize = await seqpacket.connect(sock_path)
            await oversize.send(zds.encode_hello() * 1000)
            await expect_disconnect(oversize)

            fd_on_ack = await seqpacket.connect(sock_path)
            await fd_on_ack.send(zds.encode_hello())
            await fd_on_ack.recv()  # SnapshotSent
            reader, writer = os.pipe()
            try:
                await fd_on_ack.send(zds.encode_ack(zds.Ack()), [reader])
            finally:
                os.close(reader)
                os.close(writer)
            await expect_disconnect(fd_on_ack)

            unsolicited = await raw_handshake(sock_path)
            await unsolicited.send(zds.encode_ack(zds.Ack()))
            await expect_disconnect(unsolicited)

            assert server.is_connected
            await server.add_workload("uid-1", INFO, SELF_NETNS)
            assert handler.calls[-1] == ("add", "uid-1", INFO)

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_add_goes_to_the_newest_connection_and_del_to_all(runner: Runner, sock_path: str) -> None:
    old, new = RecordingHandler(), RecordingHandler()

    async def main() -> None:
        async with running_server(sock_path) as server, running_client(sock_path, old) as first:
            await asyncio.wait_for(first.wait_ready(), DEADLINE)
            async with running_client(sock_path, new) as second:
                await asyncio.wait_for(second.wait_ready(), DEADLINE)
                await server.add_workload("uid-1", INFO, SELF_NETNS)
                await server.del_workload("uid-1")
        assert old.calls == [("snapshot_done", frozenset()), ("del", "uid-1")]
        assert new.calls == [
            ("snapshot_done", frozenset()),
            ("add", "uid-1", INFO),
            ("del", "uid-1"),
        ]

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_when_the_newest_connection_goes_the_older_one_gets_every_pod(
    runner: Runner, sock_path: str
) -> None:
    """A newer connection (an upgrade's new ztunnel, or any client that said Hello) took the
    pods added while it was there; when it goes, the remaining ztunnel must get them."""
    old = RecordingHandler()
    entries: list[zds_server.SnapshotEntry] = []

    async def main() -> None:
        async with (
            running_server(sock_path, entries) as server,
            running_client(sock_path, old) as first,
        ):
            await asyncio.wait_for(first.wait_ready(), DEADLINE)
            newer = await raw_handshake(sock_path)  # its snapshot acked: it is the newest
            # Added while the newer connection was there: it goes there only.
            adding = asyncio.create_task(server.add_workload("uid-2", INFO, SELF_NETNS))
            data, fds = await newer.recv()
            seqpacket.close_fds(fds)
            assert zds.decode_request(data, len(fds)) == zds.AddWorkload("uid-2", INFO)
            await newer.send(zds.encode_ack(zds.Ack()))
            await adding
            entries.append(zds_server.SnapshotEntry("uid-2", INFO, SELF_NETNS))
            entries.append(zds_server.SnapshotEntry("uid-lost", INFO, None))  # no handle: skipped
            assert ("add", "uid-2", INFO) not in old.calls

            newer.close()
            await wait_until(lambda: ("add", "uid-2", INFO) in old.calls)
        assert old.calls == [("snapshot_done", frozenset()), ("add", "uid-2", INFO)]

    run_clean(runner, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_missing_ack_times_out_and_drops_the_connection(runner: Runner, sock_path: str) -> None:
    async def main() -> None:
        async with running_server(sock_path, ack_timeout=0.3) as server:
            silent = await raw_handshake(sock_path)
            await wait_until(lambda: server.is_connected)
            with pytest.raises(zds_server.ZtunnelTimeoutError, match="AddWorkload"):
                await server.add_workload("uid-1", INFO, SELF_NETNS)
            data, fds = await silent.recv()
            seqpacket.close_fds(fds)
            assert zds.decode_request(data, len(fds)) == zds.AddWorkload("uid-1", INFO)
            await expect_disconnect(silent)
            assert not server.is_connected

    run_clean(runner, main)


def test_accepts_at_most_five_connections_per_second(sock_path: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with running_server(sock_path):
            channels = [await seqpacket.connect(sock_path) for _ in range(6)]
            try:
                for channel in channels:
                    await channel.send(zds.encode_hello())
                served: list[float] = []
                for channel in channels:
                    async with asyncio.timeout(DEADLINE):
                        data, _ = await channel.recv()
                    assert zds.decode_request(data, 0) == zds.SnapshotSent()
                    served.append(loop.time())
            finally:
                for channel in channels:
                    channel.close()
        served.sort()
        assert served[4] - served[0] < 0.5
        assert served[5] - served[0] >= 0.8

    run_clean(asyncio.run, main)


@pytest.mark.parametrize("runner", RUNNERS)
def test_client_drops_a_misbehaving_agent_and_reconnects(runner: Runner, sock_path: str) -> None:
    handler = RecordingHandler()

    async def agent_turn(listener: seqpacket.Listener, request: bytes, fds: list[int]) -> None:
        """Accept the client, read its Hello, send one request; expect it to hang up."""
        channel = await listener.accept()
        try:
            data, received = await channel.recv()
            assert (zds.decode_hello(data, len(received)), received) == (zds.Hello(), [])
            await channel.send(request, fds)
            with pytest.raises(seqpacket.ChannelClosedError):
                await channel.recv()
        finally:
            channel.close()

    async def main() -> None:
        listener = seqpacket.Listener.bind(sock_path)
        try:
            async with running_client(sock_path, handler) as client, asyncio.timeout(DEADLINE):
                await agent_turn(listener, b"\xff garbage", [])
                # A Del must not carry an fd: the client closes it and drops the connection.
                reader, writer = os.pipe()
                try:
                    await agent_turn(listener, zds.encode_request(zds.DelWorkload("u")), [reader])
                finally:
                    os.close(reader)
                    os.close(writer)
                await agent_turn(listener, b"\x2a\x00", [])  # KeepWorkload with no uid
                assert not client.is_ready
                assert handler.calls == []
                # A well-behaved agent at last.
                channel = await listener.accept()
                try:
                    data, _ = await channel.recv()
                    await channel.send(zds.encode_request(zds.SnapshotSent()))
                    data, _ = await channel.recv()
                    assert zds.decode_ack(data, 0) == zds.Ack()
                    await client.wait_ready()
                finally:
                    channel.close()
            assert handler.calls == [("snapshot_done", frozenset())]
        finally:
            listener.close()

    run_clean(runner, main)
