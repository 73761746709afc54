"""How the waypoint reaches an endpoint: in the mesh, over HBONE with its own identity: a CONNECT
for ``endpoint_ip:port`` on a pooled mTLS connection to the endpoint's port 15008, where the
destination's ztunnel checks the waypoint's identity against the destination's L4 policy, then
connects to the pod; outside the mesh (a pod ztunnel does not capture, a MESH_EXTERNAL
ServiceEntry's endpoint, which may be a DNS name), over plain TCP. `MeshConnector` picks.

A tunnel that the destination refuses (a CONNECT answered with anything but 200) or a
connection that cannot be made is an `OSError`: to the exchange it is a connect failure, which
retries and outlier detection treat as such.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Collection
from typing import Protocol

from meshcore.aio import hbone, sockets
from meshcore.identity import spiffe
from waypoint import streams

HBONE_PORT = 15008
ProtocolFactory = Callable[[], asyncio.Protocol]
Endpoint = tuple[str, int]


class Connector(Protocol):
    async def connect(self, endpoint: Endpoint, factory: ProtocolFactory) -> asyncio.Protocol:
        """A connection to `endpoint` carrying the protocol `factory` makes."""
        ...


class TcpConnector:
    async def connect(self, endpoint: Endpoint, factory: ProtocolFactory) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(factory, endpoint[0], endpoint[1])
        return protocol


class MeshConnector:
    """HBONE to endpoints in the mesh, plain TCP to the others (`in_mesh` says which)."""

    def __init__(
        self, hbone: Connector, plain: Connector, in_mesh: Callable[[Endpoint], bool]
    ) -> None:
        self._hbone = hbone
        self._plain = plain
        self._in_mesh = in_mesh

    async def connect(self, endpoint: Endpoint, factory: ProtocolFactory) -> asyncio.Protocol:
        chosen = self._hbone if self._in_mesh(endpoint) else self._plain
        return await chosen.connect(endpoint, factory)


class HboneConnector:
    """One HBONE connection per destination address, shared by its tunnels while it has room."""

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        expected: Callable[[Endpoint], Collection[spiffe.SpiffeId]],
        *,
        port: int = HBONE_PORT,
        timeout: float = 10.0,
    ) -> None:
        self._context = context
        self._expected = expected
        self._port = port
        self._timeout = timeout
        self._connections: dict[str, hbone.HboneClientProtocol] = {}
        self._opening: dict[str, asyncio.Future[hbone.HboneClientProtocol]] = {}
        self.opened = 0  # HBONE connections ever opened (tests look at reuse)

    async def connect(self, endpoint: Endpoint, factory: ProtocolFactory) -> asyncio.Protocol:
        conn = await self._connection(endpoint)
        end = conn.open_stream(f"{endpoint[0]}:{endpoint[1]}", [])
        assert end.response is not None
        try:
            status, _ = await asyncio.wait_for(end.response, self._timeout)
        except hbone.HboneConnectError as exc:
            raise ConnectionError(f"HBONE tunnel to {endpoint[0]}:{endpoint[1]}: {exc}") from exc
        if status != 200:
            end.abort()
            raise ConnectionRefusedError(
                f"HBONE CONNECT to {endpoint[0]}:{endpoint[1]} answered {status}"
            )
        protocol = factory()
        streams.StreamBridge(end, protocol, {"peername": endpoint}).start()
        return protocol

    async def _connection(self, endpoint: Endpoint) -> hbone.HboneClientProtocol:
        address = endpoint[0]
        found = self._connections.get(address)
        if found is not None and found.is_usable:
            return found
        opening = self._opening.get(address)
        if opening is not None:
            return await asyncio.shield(opening)  # one handshake, however many tunnels wait
        future = asyncio.get_running_loop().create_future()
        self._opening[address] = future
        try:
            conn = await self._open(endpoint)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
            future.exception()  # retrieved: waiters see it, nobody else needs to
            raise
        else:
            future.set_result(conn)
            self._connections[address] = conn
            return conn
        finally:
            del self._opening[address]

    async def _open(self, endpoint: Endpoint) -> hbone.HboneClientProtocol:
        sock = socket.socket(socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self._timeout):
                await sockets.connect(sock, (endpoint[0], self._port))
        except BaseException:
            sock.close()
            raise
        try:
            conn = await hbone.connect(
                sock,
                context=self._context(),  # the current certificate (renewed at half-life)
                expected=self._expected(endpoint),
                timeout=self._timeout,
            )
        except hbone.HboneConnectError as exc:
            raise ConnectionError(f"HBONE to {endpoint[0]}:{self._port}: {exc}") from exc
        self.opened += 1
        return conn

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
