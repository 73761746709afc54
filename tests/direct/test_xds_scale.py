"""XdsServer at scale and with shared per-stream memory, over real grpc.aio on a Unix socket."""

from __future__ import annotations

import ipaddress
import pathlib

from meshcore.model import ids, workload
from meshcore.proto import discovery_pb2
from meshcore.xds import resources, types
from tests.direct.test_xds import (
    NODE,
    RecordingHandler,
    _client,
    _eventually,
    _pod,
    _put,
    _raw_stream,
    _read,
    _run,
    _running,
    _seeded_cache,
    _serving,
    _versions,
    _within,
    state_dir,
)

__all__ = ["state_dir"]  # the fixture, re-exported for pytest

WORKLOADS = 10_000


def _workload(i: int) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid("bulk", f"pod-{i}"),
        name=f"pod-{i}",
        namespace="bulk",
        addresses=(ipaddress.ip_address(f"10.{64 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"),),
        node=NODE,
    )


def test_ten_thousand_workloads_arrive_whole_and_are_acked(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        cache = _seeded_cache()
        cache.update(
            types.ADDRESS, dict(resources.address_resource(_workload(i)) for i in range(WORKLOADS))
        )
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        async with _serving(cache, state_dir / "xds.sock") as server, _running(client):
            await _within(client.wait_synced(), "sync")
            # Every resource decoded to what the cache holds, at the cache's version.
            assert len(handler.held[types.ADDRESS]) == WORKLOADS + 3
            assert handler.held[types.ADDRESS][ids.pod_uid("bulk", "pod-9999")] == _workload(9999)
            assert client.versions(types.ADDRESS) == _versions(cache, types.ADDRESS)
            assert client.versions(types.AUTHORIZATION) == _versions(cache, types.AUTHORIZATION)
            await _eventually(lambda: server.acks == 2, "both ACKs")
            assert server.nacks == 0
            assert client.responses == 2

    _run(main())


def test_wildcard_streams_share_the_cache_versions_and_narrowing_copies_them(
    state_dir: pathlib.Path,
) -> None:
    """Wildcard streams point at the cache's versions map; a stream that narrows its
    subscription takes a private copy, leaving the shared map and the others' pushes intact."""

    async def main() -> None:
        cache = _seeded_cache()
        socket = state_dir / "xds.sock"
        a, b = ids.pod_uid("shop", "a"), ids.pod_uid("shop", "b")
        handler = RecordingHandler()
        client = _client(state_dir, handler)
        async with _serving(cache, socket) as server, _running(client):
            await _within(client.wait_synced(), "sync")
            channel, call = await _raw_stream(socket)
            try:
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=types.ADDRESS))
                first = await _read(call)
                assert {r.name for r in first.resources} == set(_versions(cache, types.ADDRESS))
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=types.ADDRESS, response_nonce=first.nonce
                    )
                )
                await _eventually(lambda: server.acks == 3, "the raw stream's ACK")
                shared = cache.versions(types.ADDRESS)
                states = [s.types[types.ADDRESS] for s in server._streams.values()]
                assert len(states) == 2
                assert all(s.sent is shared and s.shared for s in states)

                # Narrow the raw stream to `a` only: it forgets the rest, the cache does not.
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=types.ADDRESS,
                        resource_names_unsubscribe=["*"],
                        resource_names_subscribe=[a],
                    )
                )
                await _eventually(
                    lambda: any(set(s.sent) == {a} for s in states), "the narrowed memory"
                )
                assert cache.versions(types.ADDRESS) is shared
                assert dict(shared) == _versions(cache, types.ADDRESS)

                seen = len(handler.batches)
                _put(cache, _pod("b", "10.0.0.42"))
                _put(cache, _pod("a", "10.0.0.41"))
                # The narrowed stream gets only `a`; the wildcard client gets both changes.
                second = await _read(call)
                assert [r.name for r in second.resources] == [a]
                await _eventually(
                    lambda: {n for x in handler.batches[seen:] for n in x.updated} == {a, b},
                    "both changes at the wildcard client",
                )
                assert client.versions(types.ADDRESS) == _versions(cache, types.ADDRESS)
            finally:
                call.cancel()
                await channel.close(None)

    _run(main())
