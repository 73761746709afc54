"""XdsServer and DeltaXdsClient over real grpc.aio on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2

from controller.xds import cache as xds_cache
from controller.xds import server as xds_server
from meshcore import rpc, rpc_server
from meshcore.model import authorization, ids, workload
from meshcore.proto import discovery_pb2
from meshcore.xds import client as xds_client
from meshcore.xds import resources, types
from tests.direct import grpc_harness

GOOD_TOKEN = "token-for-node-1"
NODE = "node-1"
NODE_ID = "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
DEADLINE = 10.0


def _authenticate(token: str | None) -> str | None:
    return NODE if token == GOOD_TOKEN else None


def _pod(name: str, ip: str) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("shop", name),
        name=name,
        namespace="shop",
        addresses=(ipaddress.ip_address(ip),),
        node="node-1",
    )


def _service(name: str, vip: str) -> workload.Service:
    return workload.Service(
        name=name,
        namespace="shop",
        hostname=ids.service_hostname(name, "shop"),
        addresses=(ipaddress.ip_address(vip),),
        ports=(workload.PortMapping(80, 8080),),
    )


def _policy(name: str) -> authorization.Authorization:
    return authorization.Authorization(
        name, "shop", authorization.Scope.NAMESPACE, authorization.Action.ALLOW, ()
    )


def _put(cache: xds_cache.ResourceCache, *objs: workload.Workload | workload.Service) -> None:
    cache.update(types.ADDRESS, dict(resources.address_resource(o) for o in objs))


@dataclasses.dataclass(frozen=True)
class Batch:
    type_url: str
    updated: tuple[str, ...]
    removed: tuple[str, ...]


class RecordingHandler:
    """Decodes for real (so the wire format is exercised) and rejects names in `reject`."""

    def __init__(self, reject: Sequence[str] = (), explode: Sequence[str] = ()) -> None:
        self.reject = set(reject)
        self.explode = set(explode)
        self.batches: list[Batch] = []
        self.rejected: list[Batch] = []
        self.held: dict[str, dict[str, object]] = {types.ADDRESS: {}, types.AUTHORIZATION: {}}

    def apply(
        self, type_url: str, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        batch = Batch(type_url, tuple(n for n, _ in updated), tuple(removed))
        if any(name in self.explode for name, _ in updated):
            raise RuntimeError("handler bug")
        errors = [f"{name}: rejected by test" for name, _ in updated if name in self.reject]
        decoded: dict[str, object] = {}
        for name, value in updated:
            try:
                if type_url == types.ADDRESS:
                    decoded[name] = resources.decode_address(value, name=name)
                else:
                    decoded[name] = resources.decode_authorization(value, name=name)
            except resources.ResourceError as exc:
                errors.append(str(exc))
        if errors:
            self.rejected.append(batch)
            return errors
        held = self.held[type_url]
        held.update(decoded)
        for name in removed:
            held.pop(name, None)
        self.batches.append(batch)
        return []


async def _eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` with a deadline (polling: the state lives in other tasks)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _within(awaitable: Awaitable[object], what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, DEADLINE)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


_run = grpc_harness.run
state_dir = grpc_harness.state_dir


@contextlib.asynccontextmanager
async def _serving(
    cache: xds_cache.ResourceCache, socket: pathlib.Path
) -> AsyncIterator[xds_server.XdsServer]:
    server = rpc_server.new_server()
    servicer = xds_server.XdsServer(cache, authenticate=_authenticate)
    xds_server.register(server, servicer)
    rpc_server.add_listener(server, f"unix://{socket}")
    await server.start()
    try:
        yield servicer
    finally:
        servicer.close()
        await server.stop(DEADLINE)


@contextlib.asynccontextmanager
async def _running(client: xds_client.DeltaXdsClient) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert task.cancelled(), "run() must only end by cancellation"


def _client(
    state_dir: pathlib.Path, handler: RecordingHandler, *, token: str = GOOD_TOKEN
) -> xds_client.DeltaXdsClient:
    token_file = state_dir / "token"
    if not token_file.exists():
        token_file.write_text(token + "\n")
    return xds_client.DeltaXdsClient(
        f"unix://{state_dir / 'xds.sock'}",
        node_id=NODE_ID,
        node_metadata={"NODE_NAME": NODE, "NAMESPACE": "istio-system"},
        token_file=str(token_file),
        cluster_id="Kubernetes",
        type_urls=[types.ADDRESS, types.AUTHORIZATION],
        handler=handler,
        backoff_min=0.01,
        backoff_max=0.1,
    )


def _seeded_cache() -> xds_cache.ResourceCache:
    cache = xds_cache.ResourceCache()
    _put(cache, _pod("a", "10.0.0.1"), _pod("b", "10.0.0.2"), _service("web", "10.96.0.10"))
    cache.update(types.AUTHORIZATION, dict([resources.authorization_resource(_policy("p1"))]))
    return cache


def _versions(cache: xds_cache.ResourceCache, type_url: str) -> dict[str, str]:
    return {name: entry.version for name, entry in cache.snapshot(type_url).items()}


def test_initial_snapshot_is_received_and_acked(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        async with _serving(cache, state_dir / "xds.sock") as server, _running(client):
            await _within(client.wait_synced(), "sync")
            assert client.is_synced
            assert set(handler.held[types.ADDRESS]) == {
                ids.pod_uid("shop", "a"),
                ids.pod_uid("shop", "b"),
                "shop/web.shop.svc.cluster.local",
            }
            assert handler.held[types.ADDRESS][ids.pod_uid("shop", "a")] == _pod("a", "10.0.0.1")
            assert handler.held[types.AUTHORIZATION] == {"shop/p1": _policy("p1")}
            assert client.versions(types.ADDRESS) == _versions(cache, types.ADDRESS)
            assert client.versions(types.AUTHORIZATION) == _versions(cache, types.AUTHORIZATION)
            await _eventually(lambda: server.acks == 2, "both ACKs")
            assert server.nacks == 0
            assert server.connected_nodes() == [NODE]
            [status] = server.stream_status()
            assert status.node_id == NODE_ID
            assert set(status.types) == {types.ADDRESS, types.AUTHORIZATION}

    _run(main())


def test_updates_push_only_changes_and_removals(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        async with _serving(cache, state_dir / "xds.sock"), _running(client):
            await _within(client.wait_synced(), "sync")
            seen = len(handler.batches)

            _put(cache, _pod("a", "10.0.0.11"))
            await _eventually(lambda: len(handler.batches) > seen, "the update")
            assert handler.batches[seen:] == [Batch(types.ADDRESS, (ids.pod_uid("shop", "a"),), ())]
            assert handler.held[types.ADDRESS][ids.pod_uid("shop", "a")] == _pod("a", "10.0.0.11")

            # Re-publishing identical content sends nothing: the next batch is only the removal.
            _put(cache, _pod("a", "10.0.0.11"), _pod("b", "10.0.0.2"))
            cache.update(types.ADDRESS, {}, [ids.pod_uid("shop", "b")])
            await _eventually(lambda: len(handler.batches) > seen + 1, "the removal")
            assert handler.batches[seen + 1 :] == [
                Batch(types.ADDRESS, (), (ids.pod_uid("shop", "b"),))
            ]
            assert ids.pod_uid("shop", "b") not in client.versions(types.ADDRESS)

    _run(main())


def test_nack_is_recorded_and_stream_keeps_working(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        bad = ids.pod_uid("shop", "bad")
        buggy = ids.pod_uid("shop", "buggy")
        handler = RecordingHandler(reject=[bad], explode=[buggy])
        client = _client(state_dir, handler)
        async with _serving(cache, state_dir / "xds.sock") as server, _running(client):
            await _within(client.wait_synced(), "sync")
            streams_before = server.streams_total

            _put(cache, _pod("bad", "10.0.0.66"))
            await _eventually(lambda: server.nacks == 1, "the NACK")
            [status] = server.stream_status()
            assert status.last_nack == f"{bad}: rejected by test"
            assert client.nacks == 1
            assert bad not in client.versions(types.ADDRESS)

            # Same stream, later updates flow, and the NACKed version is not sent again.
            seen = len(handler.batches)
            _put(cache, _pod("c", "10.0.0.3"))
            await _eventually(lambda: len(handler.batches) > seen, "the next update")
            assert handler.batches[seen:] == [Batch(types.ADDRESS, (ids.pod_uid("shop", "c"),), ())]
            assert handler.rejected == [Batch(types.ADDRESS, (bad,), ())]
            assert server.streams_total == streams_before
            assert server.nacks == 1

            # A handler that raises NACKs too, and the client carries on.
            _put(cache, _pod("buggy", "10.0.0.67"))
            await _eventually(lambda: server.nacks == 2, "the second NACK")
            [status] = server.stream_status()
            assert status.last_nack == "handler failed: RuntimeError: handler bug"
            seen = len(handler.batches)
            _put(cache, _pod("d", "10.0.0.4"))
            await _eventually(lambda: len(handler.batches) > seen, "an update after the bug")
            assert server.streams_total == streams_before

    _run(main())


def test_unauthenticated_client_retries_until_token_is_valid(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handler = RecordingHandler()
        client = _client(state_dir, handler, token="stolen")
        async with _serving(cache, state_dir / "xds.sock") as server, _running(client) as task:
            await _eventually(lambda: client.connect_attempts >= 3, "three attempts")
            assert client.last_error is not None
            assert client.last_error.startswith("UNAUTHENTICATED")
            assert server.rejected >= 2
            assert not task.done()
            assert handler.batches == []
            assert not client.is_synced
            assert server.connected_nodes() == []

            # The token is re-read on every connect.
            (state_dir / "token").write_text(GOOD_TOKEN)
            await _within(client.wait_synced(), "sync after the token was fixed")
            assert server.connected_nodes() == [NODE]

    _run(main())


def test_unreadable_token_file_is_retried(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        handler = RecordingHandler()
        client = xds_client.DeltaXdsClient(
            f"unix://{state_dir / 'xds.sock'}",
            node_id=NODE_ID,
            node_metadata={},
            token_file=str(state_dir / "late-token"),
            cluster_id="Kubernetes",
            type_urls=[types.ADDRESS],
            handler=handler,
            backoff_max=0.05,
        )
        async with _serving(_seeded_cache(), state_dir / "xds.sock"), _running(client) as task:
            await _eventually(lambda: client.connect_attempts >= 2, "two attempts")
            assert (client.last_error or "").startswith("cannot read token file")
            assert not task.done()
            (state_dir / "late-token").write_text(GOOD_TOKEN)
            await _within(client.wait_synced(), "sync once the token exists")
            assert len(handler.held[types.ADDRESS]) == 3

    _run(main())


def test_client_started_before_the_server_connects_once_it_listens(
    state_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        with caplog.at_level(logging.WARNING, logger="xds.client"):
            async with _running(client) as task:
                await _eventually(lambda: client.connect_attempts >= 2, "two attempts")
                assert (client.last_error or "").startswith("cannot reach the xDS server")
                assert not task.done()
                async with _serving(_seeded_cache(), state_dir / "xds.sock"):
                    await _within(client.wait_synced(), "sync once the server listens")
                    assert len(handler.held[types.ADDRESS]) == 3
        # An unreachable server is an expected condition: a warning, not a traceback.
        assert not any(r.exc_info for r in caplog.records)

    _run(main())


def test_reconnect_sends_only_what_changed_meanwhile(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        socket = state_dir / "xds.sock"
        async with _running(client):
            async with _serving(cache, socket):
                await _within(client.wait_synced(), "sync")
            seen = len(handler.batches)
            # While the server is down: one change, one removal, one addition, rest untouched.
            _put(cache, _pod("a", "10.0.0.21"), _pod("c", "10.0.0.3"))
            cache.update(types.ADDRESS, {}, [ids.pod_uid("shop", "b")])
            async with _serving(cache, socket) as server:
                await _eventually(lambda: len(handler.batches) >= seen + 2, "the resync")
                after = {b.type_url: b for b in handler.batches[seen:]}
                assert len(handler.batches) == seen + 2
                assert after[types.ADDRESS] == Batch(
                    types.ADDRESS,
                    (ids.pod_uid("shop", "a"), ids.pod_uid("shop", "c")),
                    (ids.pod_uid("shop", "b"),),
                )
                # Nothing changed for policies: an empty first response, just to confirm sync.
                assert after[types.AUTHORIZATION] == Batch(types.AUTHORIZATION, (), ())
                assert client.versions(types.ADDRESS) == _versions(cache, types.ADDRESS)
                await _eventually(lambda: server.acks == 2, "ACKs after reconnect")

    _run(main())


def test_cancelled_stream_resumes_with_initial_versions(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        async with _serving(cache, state_dir / "xds.sock") as server:
            async with _running(client):
                await _within(client.wait_synced(), "sync")
            # run() was cancelled: the stream is gone, the client keeps what it holds.
            await _eventually(lambda: server.connected_nodes() == [], "the server to notice")
            _put(cache, _service("web", "10.96.0.11"))
            seen = len(handler.batches)
            async with _running(client):
                await _eventually(lambda: len(handler.batches) >= seen + 2, "the resync")
            assert sorted(handler.batches[seen:], key=lambda b: b.type_url) == [
                Batch(types.AUTHORIZATION, (), ()),
                Batch(types.ADDRESS, ("shop/web.shop.svc.cluster.local",), ()),
            ]
            assert server.streams_total == 2

    _run(main())


def test_hundred_clients_receive_one_change(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        handlers = [RecordingHandler() for _ in range(100)]
        clients = [_client(state_dir, h) for h in handlers]
        async with (
            _serving(cache, state_dir / "xds.sock") as server,
            contextlib.AsyncExitStack() as stack,
        ):
            for client in clients:
                await stack.enter_async_context(_running(client))
            await _within(asyncio.gather(*(c.wait_synced() for c in clients)), "all synced")
            seen = [len(h.batches) for h in handlers]
            _put(cache, _pod("b", "10.0.0.22"))
            await _eventually(
                lambda: all(len(h.batches) > n for h, n in zip(handlers, seen, strict=True)),
                "every client to get the change",
            )
            for handler, n in zip(handlers, seen, strict=True):
                assert handler.batches[n:] == [
                    Batch(types.ADDRESS, (ids.pod_uid("shop", "b"),), ())
                ]
            assert len(server.stream_status()) == 100

    _run(main())


def test_close_ends_streams_cleanly(
    state_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        client = _client(state_dir, RecordingHandler())
        async with _serving(cache, state_dir / "xds.sock") as server, _running(client):
            await _within(client.wait_synced(), "sync")
            with caplog.at_level(logging.WARNING, logger="xds.client"):
                server.close()
                await _eventually(lambda: server.connected_nodes() == [], "streams to end")
                await _eventually(
                    lambda: (client.last_error or "").startswith("UNAVAILABLE"),
                    "the reconnect to be refused",
                )
            reasons = [
                getattr(r, "fields", {}).get("reason")
                for r in caplog.records
                if r.getMessage() == "xDS disconnected"
            ]
            assert reasons[0] == "stream closed by the server"
            assert reasons[1] == "UNAVAILABLE: xDS server is closing"

    _run(main())


async def _raw_stream(
    socket: pathlib.Path,
) -> tuple[
    grpc.aio.Channel,
    grpc.aio.StreamStreamCall[
        discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
    ],
]:
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    call = channel.stream_stream(
        xds_client.ADS_METHOD,
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )(None, metadata=rpc.call_metadata(GOOD_TOKEN, "Kubernetes"))
    return channel, call


async def _read(
    call: grpc.aio.StreamStreamCall[
        discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
    ],
) -> discovery_pb2.DeltaDiscoveryResponse:
    response = await asyncio.wait_for(call.read(), DEADLINE)
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    return response


def test_named_subscription_and_stale_initial_versions(state_dir: pathlib.Path) -> None:
    """Protocol details the client above does not use: explicit names, unknown held names."""

    async def main() -> None:
        cache = _seeded_cache()
        socket = state_dir / "xds.sock"
        a, b = ids.pod_uid("shop", "a"), ids.pod_uid("shop", "b")
        async with _serving(cache, socket):
            channel, call = await _raw_stream(socket)
            try:
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=types.ADDRESS,
                        resource_names_subscribe=[a],
                        initial_resource_versions={a: "stale", "shop/gone": "v1"},
                    )
                )
                first = await _read(call)
                assert [r.name for r in first.resources] == [a]
                assert list(first.removed_resources) == ["shop/gone"]
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=types.ADDRESS, response_nonce=first.nonce
                    )
                )
                # A change to an unsubscribed name is not sent; one to a subscribed name is.
                _put(cache, _pod("b", "10.0.0.32"))
                _put(cache, _pod("a", "10.0.0.31"))
                second = await _read(call)
                assert [r.name for r in second.resources] == [a]
                assert second.nonce != first.nonce
                # Subscribing to more names sends them.
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=types.ADDRESS,
                        response_nonce=second.nonce,
                        resource_names_subscribe=[b],
                    )
                )
                third = await _read(call)
                assert [r.name for r in third.resources] == [b]
                assert len({first.nonce, second.nonce, third.nonce}) == 3
            finally:
                call.cancel()
                await channel.close(None)

    _run(main())


def test_stream_that_fell_off_the_change_log_gets_a_full_diff(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = xds_cache.ResourceCache(history=1)
        _put(cache, _pod("a", "10.0.0.1"), _pod("b", "10.0.0.2"), _service("web", "10.96.0.10"))
        socket = state_dir / "xds.sock"
        a, b, c = (ids.pod_uid("shop", n) for n in "abc")
        async with _serving(cache, socket):
            channel, call = await _raw_stream(socket)
            try:
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=types.ADDRESS))
                first = await _read(call)
                assert len(first.resources) == 3
                generation = cache.generation
                # Two batches with no await between them: the stream wakes once, and the
                # one-entry log only covers the second batch.
                _put(cache, _pod("a", "10.0.0.11"))
                _put(cache, _pod("c", "10.0.0.3"))
                assert cache.changes_since(types.ADDRESS, generation) is None
                second = await _read(call)
                assert sorted(r.name for r in second.resources) == [a, c]
                assert list(second.removed_resources) == []
                # A resync that drops b and c sends just those removals.
                cache.replace(
                    types.ADDRESS,
                    dict(
                        resources.address_resource(o)
                        for o in (_pod("a", "10.0.0.11"), _service("web", "10.96.0.10"))
                    ),
                )
                third = await _read(call)
                assert list(third.resources) == []
                assert sorted(third.removed_resources) == [b, c]
            finally:
                call.cancel()
                await channel.close(None)

    _run(main())


def test_missing_token_is_rejected(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        socket = state_dir / "xds.sock"
        async with _serving(xds_cache.ResourceCache(), socket) as server:
            channel = grpc.aio.insecure_channel(f"unix://{socket}")
            try:
                call = channel.stream_stream(
                    xds_client.ADS_METHOD,
                    request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                    response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
                )(None)
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=types.ADDRESS))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _read(call)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert server.rejected == 1
            finally:
                await channel.close(None)

    _run(main())
