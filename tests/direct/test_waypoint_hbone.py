"""The waypoint behind and in front of HBONE, with real mutual TLS from a test CA: a client
(as its ztunnel would) tunnels to the waypoint naming a service VIP; the waypoint routes the
HTTP inside by VirtualService, authorizes it with the client's identity, and re-originates
HBONE to the chosen endpoint with its own identity, which is what the destination sees."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from meshcore.aio import hbone, relay
from meshcore.identity import ca as ca_mod
from meshcore.identity import spiffe, tls
from meshcore.policy import spec as policy_spec
from meshcore.traffic import routes
from meshcore.wire import hbone as hbone_wire
from tests.direct import http_upstreams, workload_certs
from waypoint import engine as waypoint_engine
from waypoint import origin, tunnel, upstream

NOW = datetime.datetime.now(datetime.UTC)
DEADLINE = 10.0
VIP, SERVICE_PORT = "10.96.0.20", 9080
HOST = "reviews.shop.svc.cluster.local"
WAYPOINT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
FRONTEND_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")
BACKEND_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/backend")
REVIEWS_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/reviews")

TABLE = routes.build_route_table(
    {
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                },
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        },
    }
)
FRONTEND_ONLY = policy_spec.parse_authorization_policy(
    {
        "metadata": {"name": "frontend-only", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "rules": [{"from": [{"source": {"principals": [FRONTEND_ID.principal]}}]}],
        },
    }
)


@pytest.fixture(scope="module")
def mesh_ca() -> ca_mod.CertificateAuthority:
    return ca_mod.CertificateAuthority.generate("cluster.local", now=NOW)


class Destination:
    """What the destination's ztunnel does with the waypoint's tunnels: check the peer's
    trust domain, then connect to the pod port the CONNECT names (here on 127.0.0.1)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.peers: list[spiffe.SpiffeId | None] = []
        self.authorities: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_request(self, conn: hbone.HboneServerProtocol, ev: hbone_wire.TunnelRequested) -> None:
        async def serve() -> None:
            self.peers.append(conn.peer_identity)
            self.authorities.append(ev.authority)
            port = int(ev.authority.rsplit(":", 1)[1])
            loop = asyncio.get_running_loop()
            _, app = await loop.create_connection(relay.TcpEnd, "127.0.0.1", port)
            stream = conn.accept(ev.stream_id)
            assert stream is not None
            link = relay.Relay()
            link.start(stream, app)
            await link.done

        self._spawn(serve())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            self._spawn(
                hbone.accept(
                    sock,
                    context=self.context,
                    trust_domain="cluster.local",
                    on_request=self._on_request,
                    timeout=5,
                )
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listener.close()


class Endpoints:
    def __init__(self, by_subset: Mapping[str, Sequence[upstream.Endpoint]]) -> None:
        self.by_subset = by_subset

    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        return self.by_subset.get(subset or "", ()) if host == HOST else ()


class Tables:
    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        # Only the qualified name the tunnel's VIP resolves to: the client's Host is "reviews".
        return TABLE if (host, port) == (HOST, SERVICE_PORT) else None


class Policies:
    def find_policies(self, host: str, port: int) -> Sequence[policy_spec.PolicySpec]:
        return [FRONTEND_ONLY] if host == HOST else ()


@contextlib.asynccontextmanager
async def mesh(
    mesh_ca: ca_mod.CertificateAuthority, *servers: http_upstreams.Upstream
) -> AsyncIterator[tuple[int, Destination, origin.HboneConnector]]:
    """The destination, the waypoint in front of it; yields the waypoint's port."""
    waypoint_cert = workload_certs.issue(mesh_ca, WAYPOINT_ID)
    destination = Destination(tls.server_context(workload_certs.issue(mesh_ca, REVIEWS_ID)))
    client_context = tls.client_context(waypoint_cert)
    connector = origin.HboneConnector(
        lambda: client_context, lambda endpoint: [REVIEWS_ID], port=destination.port
    )
    by_subset = {s.name: [s.endpoint] for s in servers}
    engine = waypoint_engine.Engine(
        Tables(),
        Endpoints(by_subset),
        upstream.UpstreamPool(connector=connector),
        random.Random(3),
        policies=Policies(),
    )
    server_context = tls.server_context(waypoint_cert)
    listener = tunnel.HboneListener(
        engine,
        context=lambda: server_context,
        trust_domain="cluster.local",
        resolve=lambda ip, port: HOST if (ip, port) == (VIP, SERVICE_PORT) else None,
    )
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    tasks = [
        asyncio.ensure_future(destination.run()),
        asyncio.ensure_future(listener.serve(sock)),
    ]
    try:
        yield sock.getsockname()[1], destination, connector
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        engine.pool.close()
        connector.close()
        await destination.close()
        sock.close()


async def _client_tunnel(
    mesh_ca: ca_mod.CertificateAuthority, port: int, identity: spiffe.SpiffeId, authority: str
) -> tuple[int, http_upstreams.Client | None]:
    """What the client's ztunnel does: HBONE to the waypoint with the client's identity, CONNECT
    to the service VIP; the app's side of the tunnel as an HTTP client."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    conn = await hbone.connect(
        sock,
        context=tls.client_context(workload_certs.issue(mesh_ca, identity)),
        expected=[WAYPOINT_ID],
        timeout=5,
    )
    stream = conn.open_stream(authority, [("forwarded", 'for="10.244.1.5:40000"')])
    assert stream.response is not None
    status, _ = await asyncio.wait_for(stream.response, DEADLINE)
    if status != 200:
        return status, None
    app_sock, proxy_sock = socket.socketpair()
    app_sock.setblocking(False)
    proxy_sock.setblocking(False)
    _, down = await loop.create_connection(relay.TcpEnd, sock=proxy_sock)
    relay.Relay().start(down, stream)
    reader, writer = await asyncio.open_connection(sock=app_sock)
    return status, http_upstreams.Client(reader, writer)


def _run(coro: Any) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, DEADLINE * 3)

    asyncio.run(bounded())


def test_http_inside_hbone_is_routed_and_re_originated_with_the_waypoints_identity(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        ups = http_upstreams.Upstream("v1"), http_upstreams.Upstream("v2")
        async with (
            http_upstreams.serving(*ups) as (v1, v2),
            mesh(mesh_ca, v1, v2) as (port, destination, connector),
        ):
            status, client = await _client_tunnel(
                mesh_ca, port, FRONTEND_ID, f"{VIP}:{SERVICE_PORT}"
            )
            assert status == 200
            assert client is not None
            canary = await client.request(headers=[("x-canary", "true")])
            assert canary.json()["server"] == "v2"
            for _ in range(5):  # keep-alive inside one tunnel
                assert (await client.request()).json()["server"] == "v1"
            # The destination saw the waypoint, never the client, and the pod address named.
            assert set(destination.peers) == {WAYPOINT_ID}
            assert set(destination.authorities) == {
                f"127.0.0.1:{v1.port}",
                f"127.0.0.1:{v2.port}",
            }
            assert connector.opened == 1  # one HBONE connection to that address, many tunnels

    _run(main())


def test_the_callers_identity_decides_and_unknown_services_are_refused(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        async with (
            http_upstreams.serving(http_upstreams.Upstream("v1")) as (v1,),
            mesh(mesh_ca, v1) as (port, destination, _),
        ):
            status, client = await _client_tunnel(
                mesh_ca, port, BACKEND_ID, f"{VIP}:{SERVICE_PORT}"
            )
            assert status == 200
            assert client is not None
            denied = await client.request()
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            assert v1.requests == 0
            assert destination.peers == []
            status, _ = await _client_tunnel(mesh_ca, port, FRONTEND_ID, "10.96.0.99:80")
            assert status == 503  # a VIP this waypoint does not serve

    _run(main())
