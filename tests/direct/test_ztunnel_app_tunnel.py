"""ztunnel's HBONE inbound with an application tunnel, in-process on 127.0.0.1.

The test's own network namespace plays the pod: the real `InboundProxy` accepts mutual TLS on a
loopback listener, and for a workload with ``application_tunnel {PROXY, port}`` connects to that
port and writes a PROXY v2 header before any of the client's bytes. A real HBONE client (ztunnel's
own) opens the tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import typing
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import prometheus_client
import pytest

from meshcore.aio import hbone, relay
from meshcore.identity import ca as ca_mod
from meshcore.identity import spiffe, tls
from meshcore.model import ids, workload
from meshcore.wire import proxyproto, zds
from meshctl.demo import app
from tests.direct import workload_certs
from ztunnel import config as config_mod
from ztunnel import telemetry
from ztunnel.identity import manager
from ztunnel.inpod import pod_network
from ztunnel.proxy import inbound
from ztunnel.proxy.inputs import HandshakeBudget, PodContext, ProxyInputs
from ztunnel.state import proxy_state

NOW = datetime.datetime.now(datetime.UTC)
CLIENT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
APP_PORT = 8080  # the port clients ask for; nothing listens there in these tests


@pytest.fixture(scope="module")
def mesh_ca() -> ca_mod.CertificateAuthority:
    return ca_mod.CertificateAuthority.generate("cluster.local", now=NOW)


@contextlib.asynccontextmanager
async def inbound_proxy(
    mesh_ca: ca_mod.CertificateAuthority,
    tunnel: workload.ApplicationTunnel | None,
    handshakes: HandshakeBudget | None = None,
) -> AsyncIterator[int]:
    """The server pod's 15008, on an ephemeral loopback port; yields that port."""
    state = proxy_state.ProxyState()
    state.workloads.insert(
        workload.Workload(
            uid=ids.pod_uid("shop", "server"),
            name="server",
            namespace="shop",
            addresses=(LOOPBACK,),
            node="n1",
            service_account="server",
            tunnel_protocol=workload.TunnelProtocol.HBONE,
            application_tunnel=tunnel,
        )
    )
    inputs = ProxyInputs(
        config=config_mod.Config(
            node_name="n1",
            xds_address="unix:///x",
            ca_address="unix:///x",
            token_file="/x",
            zds_socket="/x",
            connect_timeout=5,
        ),
        state=state,
        certs=typing.cast(
            manager.CertManager,
            workload_certs.StaticServerCerts(workload_certs.issue(mesh_ca, SERVER_ID)),
        ),
        telemetry=telemetry.Telemetry(telemetry.Metrics(prometheus_client.CollectorRegistry())),
        handshakes=handshakes or HandshakeBudget(),
    )
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        network = pod_network.PodNetwork(fd, "self")
    finally:
        os.close(fd)
    pod = PodContext(
        uid="u1",
        info=zds.WorkloadInfo("server", "shop", "server"),
        identity=SERVER_ID,
        node="n1",
        network=network,
    )
    proxy = inbound.InboundProxy(inputs, pod)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    serving = asyncio.ensure_future(proxy.serve(listener))
    try:
        yield listener.getsockname()[1]
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        proxy.close()
        listener.close()
        network.close()


async def _hbone_client(
    mesh_ca: ca_mod.CertificateAuthority, port: int
) -> hbone.HboneClientProtocol:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return await hbone.connect(
        sock,
        context=tls.client_context(workload_certs.issue(mesh_ca, CLIENT_ID)),
        expected=[SERVER_ID],
        timeout=5,
    )


async def _tunnel(
    conn: hbone.HboneClientProtocol, authority: str, payload: bytes, forwarded_for: str
) -> tuple[int, bytes]:
    """One CONNECT: the app side writes `payload` and half-closes; status and what came back."""
    loop = asyncio.get_running_loop()
    app_sock, proxy_sock = socket.socketpair()
    app_sock.setblocking(False)
    proxy_sock.setblocking(False)
    _, down = await loop.create_connection(relay.TcpEnd, sock=proxy_sock)
    stream = conn.open_stream(authority, [("forwarded", f'for="{forwarded_for}"')])
    assert stream.response is not None
    status, _ = await asyncio.wait_for(stream.response, 10)
    if status != 200:
        down.abort()
        app_sock.close()
        return status, b""
    link = relay.Relay()
    link.start(down, stream)
    reader, writer = await asyncio.open_connection(sock=app_sock)
    writer.write(payload)
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 10)
    await asyncio.wait_for(link.done, 10)
    writer.close()
    return status, received


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def checked() -> None:
        await main()
        # Nothing may outlive the test: every relay and handler task has finished.
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=5)
        assert not [t for t in pending if not t.done()]

    asyncio.run(checked())


def test_app_receives_the_proxy_header_before_the_clients_bytes(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read())
            writer.write(b"pong")
            writer.write_eof()
            writer.close()

        app_server = await asyncio.start_server(backend, "127.0.0.1", 0)
        tunnel_port = app_server.sockets[0].getsockname()[1]
        tunnel = workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, tunnel_port)
        try:
            async with inbound_proxy(mesh_ca, tunnel) as port:
                conn = await _hbone_client(mesh_ca, port)
                status, answer = await _tunnel(
                    conn, f"127.0.0.1:{APP_PORT}", b"ping", "127.0.0.1:41234"
                )
                conn.close()
        finally:
            app_server.close()
            await app_server.wait_closed()
        assert status == 200
        assert answer == b"pong"
        data = await received
        header, rest = proxyproto.parse_header(data)
        # Exactly one header, byte for byte what ztunnel's write_proxy_protocol produces.
        assert data[: len(data) - len(rest)] == proxyproto.build_header(
            (LOOPBACK, 41234), (LOOPBACK, APP_PORT), [proxyproto.Tlv.for_identity(CLIENT_ID)]
        )
        assert header.source_identity == CLIENT_ID
        assert rest == b"ping"

    _run(main)


def test_demo_app_answers_with_the_callers_identity(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        config = app.ServiceConfig("product-catalog", 0, pod_name="pc-1", proxy_port=0)
        servers = await app.DemoServer(config).start()
        tunnel_port = servers[1].sockets[0].getsockname()[1]
        tunnel = workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, tunnel_port)
        request = b"GET /products HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        try:
            async with inbound_proxy(mesh_ca, tunnel) as port:
                conn = await _hbone_client(mesh_ca, port)
                status, raw = await _tunnel(
                    conn, f"127.0.0.1:{APP_PORT}", request, "127.0.0.1:50000"
                )
                conn.close()
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()
        assert status == 200
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        answer = json.loads(body)
        assert answer["caller_identity"] == CLIENT_ID.uri
        assert answer["caller"] == "127.0.0.1:50000"
        assert answer["pod"] == "pc-1"

    _run(main)


def test_connect_is_refused_when_the_tunnel_port_is_closed(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """No 200 before the app was reached: the tunnel port has no listener, so 503."""

    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        tunnel = workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, dead)
        async with inbound_proxy(mesh_ca, tunnel) as port:
            conn = await _hbone_client(mesh_ca, port)
            status, _ = await _tunnel(conn, f"127.0.0.1:{APP_PORT}", b"x", "127.0.0.1:1")
            assert conn.is_usable
            conn.close()
        assert status == 503

    _run(main)


def test_past_the_handshake_budget_new_connections_are_closed_until_it_recovers(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """Found by an audit: floods of unfinished TLS handshakes grew ztunnel's memory for good."""
    budget = HandshakeBudget(limit=2)

    async def main() -> None:
        async with inbound_proxy(mesh_ca, None, budget) as port:
            stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await _until(lambda: budget.pending == 2)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
            writer.close()
            assert budget.is_exhausted
            for _, stalled_writer in stalled:
                stalled_writer.close()
            await _until(lambda: budget.pending == 0)
            conn = await _hbone_client(mesh_ca, port)
            assert conn.is_usable
            conn.close()
        assert not budget.is_exhausted

    _run(main)


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


def test_without_a_tunnel_the_requested_port_is_used_and_nothing_is_prepended(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read())
            writer.close()

        app_server = await asyncio.start_server(backend, "127.0.0.1", 0)
        app_port = app_server.sockets[0].getsockname()[1]
        try:
            async with inbound_proxy(mesh_ca, None) as port:
                conn = await _hbone_client(mesh_ca, port)
                status, _ = await _tunnel(conn, f"127.0.0.1:{app_port}", b"raw", "127.0.0.1:2")
                conn.close()
        finally:
            app_server.close()
            await app_server.wait_closed()
        assert status == 200
        assert await received == b"raw"

    _run(main)
