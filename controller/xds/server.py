"""The controller's delta ADS server (envoy.service.discovery.v3 DeltaAggregatedResources).

Per stream, per type URL, the server remembers which resources the client holds and at which
version (`sent`), and the cache generation that memory reflects. Everything pushed is a diff
between the cache and that memory:
- the first request of a type seeds the memory from `initial_resource_versions`, so a
  reconnecting client gets only the resources that changed and removals for those that are gone;
  the first response of a type is always sent, even when empty, so the client can call itself
  synced;
- later, each cache change wakes the stream once; it diffs only the names the cache's change log
  lists since its generation (a full diff if it fell off the log) and pushes changed and removed
  resources;
- the memory is updated when a response is sent, not when it is ACKed: a NACKed version is not
  sent again (no resend loop); the next change of that resource, or a reconnect with
  `initial_resource_versions`, brings the client back in line;
- after a push, a wildcard subscriber's memory is exactly the cache's contents, so it is then
  the cache's shared `versions` map rather than a copy per stream (100 ztunnels holding 10k
  resources would otherwise keep 100 identical maps); it is copied before it is changed.

Responses are written as bytes: a serialised header (version, type, nonce, removals) followed by
the cache's pre-serialised `Resource` elements, which is the same DeltaDiscoveryResponse on the
wire without building and re-encoding a message of thousands of resources per stream.

Every stream must present a bearer token that `authenticate` maps to a node name; otherwise it
is aborted with UNAUTHENTICATED before anything is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import NoReturn

import grpc
import grpc.aio

from controller.xds import cache as xds_cache
from meshcore import log, rpc
from meshcore.proto import discovery_pb2
from meshcore.xds import types as xds_types

_log = logging.getLogger("xds.server")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WILDCARD = "*"
REJECT_READ_TIMEOUT = 5.0  # seconds a refused caller gets to send its first request

# Responses go out serialised already (see `_build_responses`).
_Context = grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes]


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStatus:
    """One connected stream, for meshctl status."""

    node: str  # from the authenticated token
    node_id: str  # what the client put in Node.id
    peer: str
    connected_at: float  # time.time()
    types: tuple[str, ...]
    acks: int
    nacks: int
    last_nack: str | None


@dataclasses.dataclass(slots=True)
class _TypeState:
    wildcard: bool
    names: set[str]  # explicit subscriptions (besides the wildcard)
    sent: Mapping[str, str]  # name -> version the client holds, as far as we know
    generation: int = -1  # cache generation `sent` reflects; -1: do a full diff
    initial: bool = True  # the first response is still owed
    shared: bool = False  # `sent` is the cache's read-only versions map: copy before changing

    def is_subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def own_sent(self) -> dict[str, str]:
        """`sent`, made private to this stream first if it is the cache's shared map."""
        if self.shared or not isinstance(self.sent, dict):
            self.sent = dict(self.sent)
            self.shared = False
        return self.sent


@dataclasses.dataclass(slots=True)
class _Stream:
    node: str
    peer: str
    connected_at: float
    node_id: str = ""
    types: dict[str, _TypeState] = dataclasses.field(default_factory=dict)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    nonces: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1))
    acks: int = 0
    nacks: int = 0
    last_nack: str | None = None


class XdsServer:
    """The ADS servicer; add it to a grpc.aio server with `register`."""

    def __init__(
        self,
        cache: xds_cache.ResourceCache,
        *,
        authenticate: Callable[[str | None], str | None],
    ) -> None:
        self._cache = cache
        self._authenticate = authenticate
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._closing = False
        # Plain counters for metrics.
        self.streams_total = 0
        self.rejected = 0
        self.pushes = 0
        self.acks = 0
        self.nacks = 0

    def close(self) -> None:
        """End every stream with OK and refuse new ones; call before `grpc.aio.Server.stop`.

        Without this, stop() cancels the never-ending stream handlers, which grpc logs as
        errors, and clients see CANCELLED/UNAVAILABLE instead of a clean end."""
        self._closing = True
        for stream in self._streams.values():
            stream.wake.set()

    def connected_nodes(self) -> list[str]:
        return sorted({stream.node for stream in self._streams.values()})

    def stream_status(self) -> list[StreamStatus]:
        return [
            StreamStatus(
                node=s.node,
                node_id=s.node_id,
                peer=s.peer,
                connected_at=s.connected_at,
                types=tuple(sorted(s.types)),
                acks=s.acks,
                nacks=s.nacks,
                last_nack=s.last_nack,
            )
            for s in self._streams.values()
        ]

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: _Context,
    ) -> None:
        if self._closing:
            await self._refuse(
                context, request_iterator, grpc.StatusCode.UNAVAILABLE, "xDS server is closing"
            )
        node = await self._check_caller(context, request_iterator)
        stream_id = next(self._stream_ids)
        stream = _Stream(node=node, peer=context.peer(), connected_at=time.time())
        self._streams[stream_id] = stream
        self.streams_total += 1
        self._cache.subscribe(stream.wake)
        _log.info("xDS stream opened", extra=log.fields(node=node, peer=stream.peer))
        reader = asyncio.create_task(self._read_requests(request_iterator, stream))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if reader.done() or self._closing:
                    break
                for response in self._build_responses(stream):
                    await context.write(response)
                    self.pushes += 1
        finally:
            self._cache.unsubscribe(stream.wake)
            del self._streams[stream_id]
            reader.cancel()
            # Not `await reader`: that would re-raise the reader's CancelledError as ours.
            await asyncio.wait([reader])
            _log.info("xDS stream closed", extra=log.fields(node=node, peer=stream.peer))
        if not reader.cancelled() and (exc := reader.exception()) is not None:
            _log.error("xDS request handling failed", extra=log.fields(node=node), exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error handling a request")

    async def _check_caller(
        self,
        context: _Context,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
    ) -> str:
        tokens = [v for k, v in (context.invocation_metadata() or ()) if k == rpc.AUTHORIZATION]
        # Exactly one authorization header: two would let a proxy and a client disagree.
        token = rpc.bearer_token({rpc.AUTHORIZATION: tokens[0]}) if len(tokens) == 1 else None
        try:
            node = self._authenticate(token)
        except Exception:  # an authenticator bug must fail closed, not crash the server
            _log.exception("xDS authenticator failed")
            node = None
        if node is None:
            self.rejected += 1
            code = grpc.StatusCode.UNAUTHENTICATED
            await self._refuse(context, requests, code, "invalid or missing bearer token")
        return node

    async def _refuse(
        self,
        context: _Context,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        code: grpc.StatusCode,
        message: str,
    ) -> NoReturn:
        # Read the first request before closing: it names the caller for the log, and a
        # grpc.aio client whose write races our close would see INTERNAL instead of `code`
        # (grpc/grpc#36066).
        node_id = ""
        try:
            first = await asyncio.wait_for(anext(requests), REJECT_READ_TIMEOUT)
            node_id = first.node.id
        except (StopAsyncIteration, TimeoutError):
            pass
        _log.warning(
            "xDS stream refused",
            extra=log.fields(peer=context.peer(), node_id=node_id, code=code.name, error=message),
        )
        await context.abort(code, message)

    async def _read_requests(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        stream: _Stream,
    ) -> None:
        try:
            async for request in requests:
                self._on_request(stream, request)
                stream.wake.set()
        finally:
            stream.wake.set()  # let the writer see that the client is gone

    def _on_request(self, stream: _Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if request.node.id:
            stream.node_id = request.node.id
        type_url = request.type_url
        if not type_url:
            _log.warning("xDS request without type_url", extra=log.fields(node=stream.node))
            return
        if request.response_nonce:
            self._on_reply(stream, request)
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        state = stream.types.get(type_url)
        if state is None:
            # Legacy wildcard: a first request naming nothing subscribes to everything.
            state = _TypeState(
                wildcard=not subscribe or WILDCARD in subscribe,
                names=subscribe - {WILDCARD},
                sent=dict(request.initial_resource_versions),
            )
            stream.types[type_url] = state
        elif subscribe:
            state.wildcard = state.wildcard or WILDCARD in subscribe
            state.names |= subscribe - {WILDCARD}
            state.generation = -1  # newly subscribed names need a full look
        if unsubscribe:
            if WILDCARD in unsubscribe:
                state.wildcard = False
            state.names -= unsubscribe
            # The client drops what it unsubscribed from; forget it so a resubscribe resends.
            sent = state.own_sent()
            for name in [n for n in sent if not state.is_subscribed(n)]:
                del sent[name]

    def _on_reply(self, stream: _Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if request.HasField("error_detail"):
            stream.nacks += 1
            self.nacks += 1
            stream.last_nack = request.error_detail.message
            _log.warning(
                "xDS NACK",
                extra=log.fields(
                    node=stream.node,
                    type_url=request.type_url,
                    nonce=request.response_nonce,
                    error=request.error_detail.message,
                ),
            )
        else:
            stream.acks += 1
            self.acks += 1

    def _build_responses(self, stream: _Stream) -> list[bytes]:
        """The serialised DeltaDiscoveryResponses that bring `stream` up to the cache."""
        generation = self._cache.generation
        responses: list[bytes] = []
        # Policies before the workloads that name them: a ztunnel that briefly saw a workload
        # listing a policy it has not received would skip that policy.
        ordered = sorted(stream.types.items(), key=lambda item: item[0] != xds_types.AUTHORIZATION)
        for type_url, state in ordered:
            if state.generation == generation and not state.initial:
                continue
            snapshot = self._cache.snapshot(type_url)
            names = (
                None
                if state.generation < 0
                else self._cache.changes_since(type_url, state.generation)
            )
            if names is None:
                names = set(snapshot).union(state.sent)
            upserts: list[bytes] = []
            removed: list[str] = []
            # A wildcard stream ends up holding exactly the cache, whose shared map then stands
            # for `sent`; any other keeps (a private copy of) its own map up to date.
            private = None if state.wildcard else state.own_sent()
            sent = state.sent
            for name in sorted(names):
                entry = snapshot.get(name)
                if entry is not None and state.is_subscribed(name):
                    if sent.get(name) != entry.version:
                        upserts.append(entry.wire)
                        if private is not None:
                            private[name] = entry.version
                elif name in sent:
                    removed.append(name)
                    if private is not None:
                        del private[name]
            if private is None:
                state.sent = self._cache.versions(type_url)
                state.shared = True
            state.generation = generation
            if not (upserts or removed or state.initial):
                continue
            state.initial = False
            header = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=str(generation),
                type_url=type_url,
                nonce=str(next(stream.nonces)),
                removed_resources=removed,
            ).SerializeToString()
            # Protobuf fields may come in any order and repeated ones accumulate, so the header
            # followed by the `resources` elements is the whole response.
            responses.append(b"".join([header, *upserts]))
            _log.debug(
                "xDS push",
                extra=log.fields(
                    node=stream.node,
                    type_url=type_url,
                    resources=len(upserts),
                    removed=len(removed),
                ),
            )
        return responses


def register(server: grpc.aio.Server, servicer: XdsServer) -> None:
    """Serve `servicer` as envoy.service.discovery.v3.AggregatedDiscoveryService on `server`."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.DeltaAggregatedResources,
        request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
        response_serializer=_already_serialised,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"DeltaAggregatedResources": handler}),)
    )


def _already_serialised(response: bytes) -> bytes:
    """The stream handler writes responses it has serialised itself (see `_build_responses`)."""
    return response
