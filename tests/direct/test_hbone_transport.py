"""ztunnel's HBONE client and server Protocols over real TLS 1.3 on 127.0.0.1.

A client app writes into one end of a socket pair, ztunnel's client side carries it through a
CONNECT stream, the server side relays it to a backend, and back. No network namespaces: this
isolates the asyncio layer (relay, flow control, half-close, identity checks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from meshcore.aio import hbone, relay
from meshcore.identity import ca as ca_mod
from meshcore.identity import certs, spiffe, tls
from meshcore.wire import hbone as hbone_wire
from tests.direct import workload_certs

NOW = datetime.datetime.now(datetime.UTC)
CLIENT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")


@pytest.fixture(scope="module")
def mesh_ca() -> ca_mod.CertificateAuthority:
    return ca_mod.CertificateAuthority.generate("cluster.local", now=NOW)


def _pattern(n: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class Harness:
    """A backend, an HBONE server in front of it, and a way to open tunnels to it."""

    def __init__(self, server_cert: certs.WorkloadCertificate) -> None:
        self.server_cert = server_cert
        self.backend_received = hashlib.sha256()
        self.backend_reply = b""
        self.handshake_errors: list[str] = []
        self.statuses: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.Server] = []
        self.listener = socket.socket()
        self.server_ctx: ssl.SSLContext | None = None
        self.on_request: hbone.RequestHandler | None = None
        self.accepted: list[hbone.HboneServerProtocol] = []
        self.accepted_event = asyncio.Event()
        self.port = 0
        self.backend_port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(1 << 18):
                self.backend_received.update(chunk)
            writer.write(self.backend_reply)
            writer.write_eof()
            await writer.drain()
            writer.close()

        bsrv = await asyncio.start_server(backend, "127.0.0.1", 0)
        self.backend_port = bsrv.sockets[0].getsockname()[1]
        self.server_ctx = tls.server_context(self.server_cert)

        def on_request(conn: hbone.HboneServerProtocol, ev: hbone_wire.TunnelRequested) -> None:
            async def serve() -> None:
                if ev.authority != f"127.0.0.1:{self.backend_port}":
                    conn.reject(ev.stream_id, 400)
                    return
                _, up = await loop.create_connection(relay.TcpEnd, "127.0.0.1", self.backend_port)
                stream = conn.accept(ev.stream_id)
                assert stream is not None
                link = relay.Relay()
                link.start(stream, up)
                await link.done

            self._spawn(serve())

        self.on_request = on_request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.servers = [bsrv]

        async def accept_loop() -> None:
            while True:
                sock, _ = await loop.sock_accept(self.listener)
                self._spawn(self.serve_socket(sock))

        self._spawn(accept_loop())

    async def serve_socket(self, sock: socket.socket) -> None:
        """What ztunnel's inbound does with an accepted socket: TLS, peer check, then streams."""
        assert self.on_request is not None
        assert self.server_ctx is not None
        try:
            conn = await hbone.accept(
                sock,
                context=self.server_ctx,
                trust_domain="cluster.local",
                on_request=self.on_request,
                timeout=5,
            )
        except hbone.HboneConnectError as exc:
            self.handshake_errors.append(str(exc))
            return
        self.accepted.append(conn)
        self.accepted_event.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect(
        self,
        cert: certs.WorkloadCertificate,
        expected: list[spiffe.SpiffeId],
        keepalive: tuple[float, float] | None = None,
    ) -> hbone.HboneClientProtocol:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", self.port))
        return await hbone.connect(
            sock,
            context=tls.client_context(cert),
            expected=expected,
            timeout=5,
            keepalive=keepalive,
        )

    async def __aenter__(self) -> Harness:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listener.close()


async def _app_and_relay_end() -> tuple[socket.socket, relay.TcpEnd]:
    """The app's socket, and the other end of its socket pair as a relay end (ztunnel's side)."""
    app_sock, proxy_sock = socket.socketpair()
    app_sock.setblocking(False)
    proxy_sock.setblocking(False)
    _, down = await asyncio.get_running_loop().create_connection(relay.TcpEnd, sock=proxy_sock)
    return app_sock, down


async def _tunnel_exchange(
    conn: hbone.HboneClientProtocol, authority: str, payload: bytes
) -> tuple[int, bytes]:
    """App writes `payload` then half-closes; returns the CONNECT status and what came back."""
    app_sock, down = await _app_and_relay_end()
    stream = conn.open_stream(authority, [("forwarded", 'for="127.0.0.1:1"')])
    assert stream.response is not None
    status, _ = await asyncio.wait_for(stream.response, 5)
    if status != 200:
        down.abort()
        app_sock.close()
        return status, b""
    link = relay.Relay()
    link.start(down, stream)
    reader, writer = await asyncio.open_connection(sock=app_sock)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 20):
            writer.write(view[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    received = bytearray()
    while chunk := await reader.read(1 << 18):
        received += chunk
    await sender
    await asyncio.wait_for(link.done, 5)
    writer.close()
    assert link.error is None
    assert link.received == [len(payload), len(received)]
    return status, bytes(received)


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(main())


def test_ten_megabytes_each_way_through_one_tunnel(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        up = _pattern(10 << 20, b"up")
        h.backend_reply = _pattern(10 << 20, b"down")
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            assert conn.peer_identity == SERVER_ID
            status, got = await _tunnel_exchange(conn, f"127.0.0.1:{h.backend_port}", up)
            assert status == 200
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(h.backend_reply).hexdigest()
            assert h.backend_received.hexdigest() == hashlib.sha256(up).hexdigest()
            conn.close()

    _run(main)


def test_many_concurrent_tunnels_share_one_connection(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        h.backend_reply = b"pong"
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            results = await asyncio.gather(
                *(
                    _tunnel_exchange(conn, f"127.0.0.1:{h.backend_port}", b"ping" * 1000)
                    for _ in range(50)
                )
            )
            assert all(r == (200, b"pong") for r in results)
            assert not conn.streams  # every finished stream was forgotten
            conn.close()

    _run(main)


def test_rejected_tunnel_reports_status(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            status, _ = await _tunnel_exchange(conn, "127.0.0.1:1", b"x")
            assert status == 400
            assert conn.is_usable  # a rejected stream does not spoil the connection
            conn.close()

    _run(main)


async def _optimistic_exchange(
    conn: hbone.HboneClientProtocol, authority: str, payload: bytes
) -> tuple[relay.Relay, int, bytes]:
    """As ztunnel's outbound does: the relay starts before the CONNECT is answered, and the app
    has already written and half-closed by then."""
    app_sock, down = await _app_and_relay_end()
    reader, writer = await asyncio.open_connection(sock=app_sock)
    writer.write(payload)
    writer.write_eof()
    stream = conn.open_stream(authority, [])
    link = relay.Relay()
    link.start(down, stream)
    assert stream.response is not None
    status, _ = await asyncio.wait_for(stream.response, 5)
    received = bytearray()
    try:
        while chunk := await reader.read(1 << 18):
            received += chunk
    except ConnectionResetError:
        pass
    await asyncio.wait_for(link.done, 5)
    writer.close()
    return link, status, bytes(received)


def test_optimistic_data_reaches_the_backend_once_accepted(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        h.backend_reply = b"pong"
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            up = _pattern(100_000, b"early")
            link, status, got = await _optimistic_exchange(conn, f"127.0.0.1:{h.backend_port}", up)
            assert (status, got, link.error) == (200, b"pong", None)
            assert h.backend_received.hexdigest() == hashlib.sha256(up).hexdigest()
            assert link.received == [len(up), 4]
            conn.close()

    _run(main)


def test_a_refusal_ends_a_relay_that_started_before_the_answer(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            link, status, got = await _optimistic_exchange(conn, "127.0.0.1:1", b"secret")
            assert (status, got) == (400, b"")
            assert link.error == "HBONE CONNECT refused with 400"
            assert h.backend_received.digest() == hashlib.sha256().digest()  # nothing arrived
            assert not conn.streams
            assert conn.is_usable
            conn.close()

    _run(main)


def test_unexpected_server_identity_is_refused(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            other = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/other")
            with pytest.raises(hbone.HboneConnectError) as err:
                await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [other])
            assert err.value.flag == "IDENTITY_ERROR"
            assert "sa/server" in str(err.value)

    _run(main)


def test_client_from_another_ca_never_gets_a_tunnel(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            rogue_ca = ca_mod.CertificateAuthority.generate("cluster.local", now=NOW)
            rogue = workload_certs.issue(rogue_ca, CLIENT_ID)
            # The rogue client trusts our root so its own handshake completes (TLS 1.3 gotcha:
            # the refusal only shows up afterwards), and must still never get a 200.
            rogue = dataclasses.replace(rogue, root_pem=mesh_ca.root_pem)
            try:
                conn = await h.connect(rogue, [SERVER_ID])
            except hbone.HboneConnectError:
                conn = None
            if conn is not None:
                with pytest.raises(hbone.HboneConnectError):
                    await _tunnel_exchange(conn, f"127.0.0.1:{h.backend_port}", b"secret")
                await asyncio.wait_for(conn.closed, 5)
            assert h.backend_received.hexdigest() == hashlib.sha256(b"").hexdigest()
            assert h.handshake_errors, "the server must have refused the handshake"

    _run(main)


def test_client_hello_waiting_before_the_accept_is_not_lost(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """A remote client (another node's ztunnel) sends its ClientHello right after the TCP
    handshake, often before the server has picked the connection up. Those bytes must reach
    TLS: a plaintext reader that swallows them leaves the handshake hanging until timeout."""

    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            loop = asyncio.get_running_loop()
            # Take over accepting, so this test decides when the server sees the connection.
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setblocking(False)
            port = listener.getsockname()[1]
            client_sock = socket.socket()
            client_sock.setblocking(False)
            try:
                await loop.sock_connect(client_sock, ("127.0.0.1", port))
                client = asyncio.ensure_future(
                    hbone.connect(
                        client_sock,
                        context=tls.client_context(workload_certs.issue(mesh_ca, CLIENT_ID)),
                        expected=[SERVER_ID],
                        timeout=5,
                    )
                )
                server_sock, _ = await loop.sock_accept(listener)
                # Wait until the ClientHello sits unread in the accepted socket.
                ready: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    if not ready.done():
                        ready.set_result(None)

                loop.add_reader(server_sock.fileno(), readable)
                try:
                    await asyncio.wait_for(ready, 5)
                finally:
                    loop.remove_reader(server_sock.fileno())
                h._spawn(h.serve_socket(server_sock))
                conn = await asyncio.wait_for(client, 5)
                assert conn.peer_identity == SERVER_ID
                payload = b"arrived early" * 1000
                h.backend_reply = b"seen"
                backend = f"127.0.0.1:{h.backend_port}"
                status, echoed = await _tunnel_exchange(conn, backend, payload)
                assert echoed == b"seen"
                assert status == 200
                assert h.backend_received.hexdigest() == hashlib.sha256(payload).hexdigest()
                assert h.handshake_errors == []
                conn.close()
            finally:
                listener.close()

    _run(main)


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_keepalive_pings_are_acknowledged(mesh_ca: ca_mod.CertificateAuthority) -> None:
    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            conn = await h.connect(
                workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID], keepalive=(0.02, 1.0)
            )
            await _wait_for(lambda: conn.pings_acknowledged >= 3)
            assert conn.is_usable
            conn.close()

    _run(main)


def test_keepalive_closes_a_connection_whose_peer_went_silent(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """A peer node that vanished without a FIN: no PING ACK, so the pool must stop using it."""

    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            conn = await h.connect(
                workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID], keepalive=(0.02, 0.2)
            )
            await asyncio.wait_for(h.accepted_event.wait(), 5)
            server = h.accepted[0]
            assert server.transport is not None
            server.transport.pause_reading()  # stops answering, connection stays open
            await asyncio.wait_for(conn.closed, 5)
            assert conn.is_lost
            assert not conn.is_usable
            assert conn.keepalive_failure == "HBONE keepalive: no PING ACK within 0.2s"

    _run(main)


def test_rapid_reset_closes_the_connection_with_enhance_your_calm(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """CVE-2023-44487: CONNECT then RST_STREAM, over and over, starts work on the server each
    time without the stream limit ever biting. Once half of 500 or more streams were reset
    before an answer, the server sends GOAWAY (ENHANCE_YOUR_CALM) and closes; a client that
    resets a few streams is left alone."""

    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        h.on_request = lambda conn, ev: None  # never answers: every reset is premature
        async with h:
            polite = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            for _ in range(10):
                polite.reset_stream(polite.open_stream("10.0.0.1:80", ()).stream_id, hbone.CANCEL)
            rude = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            for _ in range(hbone.PREMATURE_RESET_MIN_STREAMS * 3):
                if not rude.is_usable:
                    break
                rude.reset_stream(rude.open_stream("10.0.0.1:80", ()).stream_id, hbone.CANCEL)
                await asyncio.sleep(0)  # one loop turn: the server reads what was sent
            await asyncio.wait_for(rude.closed, 5)
            assert rude.goaway_received
            assert polite.is_usable
            polite.close()

    _run(main)


def test_a_ping_flood_from_a_peer_that_does_not_read_closes_the_connection(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """Each PING makes the server queue an ACK; a peer that never reads would grow the
    server's write buffer without end."""

    async def main() -> None:
        h = Harness(workload_certs.issue(mesh_ca, SERVER_ID))
        async with h:
            conn = await h.connect(workload_certs.issue(mesh_ca, CLIENT_ID), [SERVER_ID])
            await asyncio.wait_for(h.accepted_event.wait(), 5)
            server = h.accepted[0]
            assert conn.transport is not None
            conn.transport.pause_reading()  # the flooding peer reads nothing
            sent = 0
            while not server.closed.done() and sent < 2_000_000:
                for _ in range(1000):
                    conn.codec.ping(sent.to_bytes(8, "big"))
                    sent += 1
                conn.flush()
                await asyncio.sleep(0)  # one loop turn for the server to read
            assert server.closed.done(), "the server kept acknowledging a peer that never reads"
            assert server.flood_refusal == (
                "PING/SETTINGS flood from a peer that does not read what we send"
            )

    _run(main)
