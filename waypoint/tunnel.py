"""The waypoint behind HBONE: each CONNECT stream a ztunnel opens to the waypoint's port 15008
carries one client connection's HTTP/1.1, which the engine serves as if it had come over TCP
(through `waypoint.streams`).

`HboneListener` accepts the mTLS connections (the peer must hold a certificate of the trust
domain), answers each CONNECT for a service the waypoint serves with 200 and the rest with
503, and tells the engine who is calling: the HBONE peer's identity, the original client's
address from the `forwarded` header, and the service VIP:port the tunnel names.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from meshcore import log
from meshcore.aio import hbone, tasks
from meshcore.wire import hbone as hbone_wire
from meshcore.wire import hbone_headers
from waypoint import engine as engine_mod
from waypoint import h2downstream, streams

logger = logging.getLogger("waypoint.tunnel")

# The service a VIP:port names (its qualified hostname), None when the waypoint does not serve it.
ServiceResolver = Callable[[str, int], str | None]


class HboneListener:
    def __init__(
        self,
        engine: engine_mod.Engine,
        *,
        context: Callable[[], ssl.SSLContext],
        trust_domain: str,
        resolve: ServiceResolver,
        handshake_timeout: float = 10.0,
    ) -> None:
        self._engine = engine
        self._context = context
        self._trust_domain = trust_domain
        self._resolve = resolve
        self._timeout = handshake_timeout
        self._tasks = tasks.TaskSet()
        self.connections: list[hbone.HboneServerProtocol] = []

    async def serve(self, listener: socket.socket) -> None:
        """Accept until cancelled; `listener` is a bound, listening, non-blocking socket."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                sock, _ = await loop.sock_accept(listener)
                self._tasks.spawn(self._accept(sock))
        finally:
            for conn in list(self.connections):
                conn.abort()
            self._tasks.cancel_all()
            await self._tasks.wait_all()

    async def _accept(self, sock: socket.socket) -> None:
        try:
            conn = await hbone.accept(
                sock,
                context=self._context(),  # the current certificate (renewed at half-life)
                trust_domain=self._trust_domain,
                on_request=self._on_request,
                timeout=self._timeout,
            )
        except hbone.HboneConnectError as exc:
            logger.warning("HBONE peer refused", extra=log.fields(error=str(exc), flag=exc.flag))
            return
        self.connections.append(conn)
        try:
            await conn.closed
        finally:
            self.connections.remove(conn)

    def _on_request(
        self, conn: hbone.HboneServerProtocol, event: hbone_wire.TunnelRequested
    ) -> None:
        if event.method != "CONNECT":
            conn.reject(event.stream_id, 400)
            return
        try:
            address, port = hbone_headers.parse_authority(event.authority)
        except hbone_headers.InvalidAuthorityError:
            conn.reject(event.stream_id, 400)
            return
        service = self._resolve(str(address), port)
        if service is None:
            logger.info(
                "tunnel to a service this waypoint does not serve",
                extra=log.fields(authority=event.authority),
            )
            conn.reject(event.stream_id, 503)
            return
        end = conn.accept(event.stream_id)
        if end is None:
            return
        peer = conn.peer_address or ("", 0)
        client = _forwarded_for(event.headers) or (str(peer[0]), int(peer[1]))
        identity = conn.peer_identity
        caller = engine_mod.Caller(
            address=client,
            destination=(str(address), port),
            principal=identity.principal if identity is not None else None,
            is_mutual_tls=True,
            service=service,
        )
        protocol = h2downstream.SniffingProtocol(self._engine, port, caller)
        extra = {"peername": client, "sockname": (str(address), port)}
        streams.StreamBridge(end, protocol, extra).start()


def _forwarded_for(headers: hbone_headers.Headers) -> tuple[str, int] | None:
    for name, value in headers:
        if name == "forwarded":
            found, _ = hbone_headers.parse_forwarded(value)
            if found is None:
                return None
            try:
                address, port = hbone_headers.parse_authority(found)
            except hbone_headers.InvalidAuthorityError:
                return None
            return str(address), port
    return None
