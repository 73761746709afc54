"""The generic delta xDS client (spec 5.1): one ADS stream, wildcard subscriptions, ACK/NACK.

What the client guarantees:
- A response is handed to the `ResourceHandler` as one batch. The handler applies all of it or
  none of it and returns the per-resource errors; any error NACKs the whole response, and the
  versions we report as held stay those of the last accepted state.
- After a reconnect, the first request of each type carries `initial_resource_versions`, so the
  server only sends what changed while we were away (and removals for what disappeared).
  The first type's request is sent at once, the others after the server's first response
  (servers answer every initial wildcard request, even with nothing in it).
- `run` never returns and never raises except on cancellation: every stream failure (server
  gone, UNAUTHENTICATED, unreadable token file) is logged and retried after a backoff that
  doubles from `backoff_min` to `backoff_max`, and resets once a stream has delivered data.
- The bearer token is re-read from `token_file` on every connect, so a rotated token is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import grpclib.client
import grpclib.const
import grpclib.exceptions
from google.protobuf import any_pb2

from meshcore import log, rpc
from meshcore.proto import discovery_pb2

_log = logging.getLogger("xds.client")

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
INVALID_ARGUMENT = 3  # google.rpc.Code, carried in DeltaDiscoveryRequest.error_detail on a NACK
_NO_ERROR_RESET = "error_code: 0"  # how grpclib words RST_STREAM(NO_ERROR)

_Stream = grpclib.client.Stream[
    discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
]


class ResourceHandler(Protocol):
    def apply(
        self,
        type_url: str,
        updated: Sequence[tuple[str, any_pb2.Any]],
        removed: Sequence[str],
    ) -> Sequence[str]:
        """Apply the whole batch or nothing; return the per-resource errors (empty = ACK)."""
        ...


class DeltaXdsClient:
    def __init__(
        self,
        address: str,
        *,
        node_id: str,
        node_metadata: Mapping[str, str],
        token_file: str | None,
        cluster_id: str,
        type_urls: Sequence[str],
        handler: ResourceHandler,
        backoff_min: float = 0.01,
        backoff_max: float = 15.0,
    ) -> None:
        if not type_urls:
            raise ValueError("DeltaXdsClient needs at least one type URL")
        self._address = address
        self._node = discovery_pb2.Node(id=node_id, cluster=cluster_id)
        self._node.metadata.update(dict(node_metadata))
        self._token_file = token_file
        self._cluster_id = cluster_id
        self._type_urls = tuple(dict.fromkeys(type_urls))
        self._handler = handler
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        # name -> version of every resource the handler accepted, per type.
        self._versions: dict[str, dict[str, str]] = {t: {} for t in self._type_urls}
        self._synced_types: set[str] = set()
        self._synced = asyncio.Event()
        # Plain counters for status pages and tests.
        self.connect_attempts = 0
        self.responses = 0
        self.nacks = 0
        self.last_error: str | None = None

    @property
    def is_synced(self) -> bool:
        """Every type has received and ACKed its first response (stays true across reconnects)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def versions(self, type_url: str) -> dict[str, str]:
        """A copy of name -> version of what the handler holds for `type_url`."""
        return dict(self._versions[type_url])

    async def run(self) -> None:
        delay = self._backoff_min
        while True:
            self.connect_attempts += 1
            responses_before = self.responses
            try:
                reason = await self._run_stream()
            except grpclib.exceptions.GRPCError as exc:
                reason = f"{exc.status.name}: {exc.message}"
            except grpclib.exceptions.StreamTerminatedError as exc:
                reason = f"stream reset by the server: {exc}"
            except OSError as exc:  # unreachable, refused, or the connection dropped
                reason = f"cannot reach the xDS server: {exc.strerror or exc}"
            except rpc.RpcConfigError as exc:
                reason = str(exc)
            except Exception as exc:  # connection boundary: log, then reconnect
                _log.exception("xDS stream failed", extra=log.fields(address=self._address))
                reason = f"{type(exc).__name__}: {exc}"
            self.last_error = reason
            if self.responses > responses_before:
                delay = self._backoff_min  # the stream worked: reconnect quickly
            _log.warning(
                "xDS disconnected",
                extra=log.fields(address=self._address, reason=reason, retry_in=delay),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _run_stream(self) -> str:
        """One stream, until it ends; returns why it ended (or raises GRPCError or OSError)."""
        metadata = self._call_metadata()
        responses_before = self.responses
        channel = rpc.open_channel(self._address)
        try:
            stream: _Stream
            async with channel.request(
                ADS_METHOD,
                grpclib.const.Cardinality.STREAM_STREAM,
                discovery_pb2.DeltaDiscoveryRequest,
                discovery_pb2.DeltaDiscoveryResponse,
                metadata=metadata,
            ) as stream:
                # The other types' requests go out after the server's first answer, so a server
                # that refuses the stream (UNAUTHENTICATED) is told of it by one request only.
                first, *rest = self._type_urls
                await stream.send_message(self._initial_request(first))
                while (response := await stream.recv_message()) is not None:
                    if self.responses == responses_before:
                        _log.info("xDS connected", extra=log.fields(address=self._address))
                    await stream.send_message(self._handle(response))
                    while rest:
                        await stream.send_message(self._initial_request(rest.pop(0)))
                # The server ended its side; its status, raised here if not OK, says why.
                await stream.end()
                await stream.recv_trailing_metadata()
        except grpclib.exceptions.StreamTerminatedError as exc:
            # A server that is done resets the stream with NO_ERROR right after its trailers
            # (RFC 9113 section 8.1); grpclib reports that reset, and had the trailers held a
            # status other than OK, the stream's exit would have raised it as GRPCError.
            if not str(exc).endswith(_NO_ERROR_RESET):
                raise
        finally:
            channel.close()
        return "stream closed by the server"

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token_file is None:
            return ((rpc.CLUSTER_ID, self._cluster_id),)
        return rpc.call_metadata(rpc.read_token(self._token_file), self._cluster_id)

    def _initial_request(self, type_url: str) -> discovery_pb2.DeltaDiscoveryRequest:
        # Empty subscribe list = wildcard (what ztunnel sends when not on demand).
        return discovery_pb2.DeltaDiscoveryRequest(
            node=self._node,
            type_url=type_url,
            initial_resource_versions=self._versions[type_url],
        )

    def _handle(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        """Apply one response; returns the ACK or NACK to send."""
        self.responses += 1
        type_url = response.type_url
        updated = [(r.name, r.resource) for r in response.resources]
        removed = list(response.removed_resources)
        _log.debug(
            "xDS response",
            extra=log.fields(
                type_url=type_url,
                resources=len(updated),
                removed=len(removed),
                nonce=response.nonce,
            ),
        )
        errors: Sequence[str]
        if type_url not in self._versions:
            errors = [f"type {type_url} was not subscribed"]
        else:
            try:
                errors = self._handler.apply(type_url, updated, removed)
            except Exception as exc:  # a handler bug rejects this batch, not the whole client
                _log.exception("xDS handler failed", extra=log.fields(type_url=type_url))
                errors = [f"handler failed: {type(exc).__name__}: {exc}"]
        if errors:
            self.nacks += 1
            message = "; ".join(errors)
            _log.warning(
                "xDS NACK",
                extra=log.fields(type_url=type_url, nonce=response.nonce, error=message),
            )
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=response.nonce,
                error_detail=discovery_pb2.Status(code=INVALID_ARGUMENT, message=message),
            )
        versions = self._versions[type_url]
        for resource in response.resources:
            versions[resource.name] = resource.version
        for name in removed:
            versions.pop(name, None)
        self._synced_types.add(type_url)
        if len(self._synced_types) == len(self._type_urls):
            self._synced.set()
        return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
