"""Before/after numbers for ztunnel's HBONE data path (issue 5), in one process on 127.0.0.1.

app source -> TcpEnd -> HboneClientProtocol == mTLS/HTTP2 == HboneServerProtocol -> TcpEnd -> sink.
Reports throughput and CPU-seconds per GB for one tunnel moving `--gib` GiB (the CPU includes the
app ends, which are cheap Protocols), and the p50/p99 of 1-byte ping-pong through the tunnel to an
echo backend. Usage: .venv/bin/python -m bench.hbone_pair [--gib 1] [--pings 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import json
import socket
import time
import typing

import uvloop

from meshcore.aio import hbone, relay
from meshcore.identity import ca as ca_mod
from meshcore.identity import certs, csr, spiffe, tls
from meshcore.wire import hbone as hbone_wire

CHUNK = 256 << 10
CLIENT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/client")
SERVER_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/server")


def _issue(
    authority: ca_mod.CertificateAuthority, ident: spiffe.SpiffeId
) -> certs.WorkloadCertificate:
    now = datetime.datetime.now(datetime.UTC)
    key = csr.generate_key()
    leaf = authority.sign_csr(
        csr.build_csr(key, ident), identity=ident, ttl=datetime.timedelta(hours=1), now=now
    )
    return certs.build_workload_certificate(
        ident,
        key,
        [leaf.decode(), authority.root_pem.decode()],
        trusted_root_pem=authority.root_pem,
    )


class Sink(asyncio.Protocol):
    """Counts bytes; echoes them back when `echo`."""

    def __init__(self, want: int, echo: bool) -> None:
        self.want = want
        self.echo = echo
        self.got = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.echo and self.transport is not None:
            self.transport.write(data)
        if self.got >= self.want and not self.done.done():
            self.done.set_result(None)


class Source(asyncio.Protocol):
    """Writes `total` bytes as fast as the transport takes them."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.block = b"x" * CHUNK
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def pump(self) -> None:
        while self.left > 0 and not self.paused and self.transport is not None:
            n = min(self.left, CHUNK)
            self.transport.write(self.block if n == CHUNK else self.block[:n])
            self.left -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()


async def _main(gib: float, pings: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    authority = ca_mod.CertificateAuthority.generate(
        "cluster.local", now=datetime.datetime.now(datetime.UTC)
    )
    server_ctx = tls.server_context(_issue(authority, SERVER_ID))
    client_ctx = tls.client_context(_issue(authority, CLIENT_ID))
    total = int(gib * (1 << 30))
    sinks: list[Sink] = []

    backend = await loop.create_server(lambda: sinks[-1], "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    tasks: set[asyncio.Task[None]] = set()

    def on_request(conn: hbone.HboneServerProtocol, ev: hbone_wire.TunnelRequested) -> None:
        async def serve() -> None:
            _, up = await loop.create_connection(relay.TcpEnd, "127.0.0.1", backend_port)
            stream = conn.accept(ev.stream_id)
            assert stream is not None
            link = relay.Relay()
            link.start(stream, up)
            await link.done

        t = loop.create_task(serve())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def accept_one() -> None:
        sock, _ = await loop.sock_accept(listener)
        await hbone.accept(
            sock, context=server_ctx, trust_domain="cluster.local", on_request=on_request, timeout=5
        )

    acceptor = loop.create_task(accept_one())
    csock = socket.socket()
    csock.setblocking(False)
    await loop.sock_connect(csock, listener.getsockname())
    conn = await hbone.connect(csock, context=client_ctx, expected=[SERVER_ID], timeout=5)
    await acceptor

    async def tunnel(source: asyncio.Protocol) -> tuple[asyncio.Transport, relay.Relay]:
        app, proxy = socket.socketpair()
        app.setblocking(False)
        proxy.setblocking(False)
        _, down = await loop.create_connection(relay.TcpEnd, sock=proxy)
        stream = conn.open_stream(f"127.0.0.1:{backend_port}", [])
        assert stream.response is not None
        status, _ = await stream.response
        assert status == 200, status
        link = relay.Relay()
        link.start(down, stream)
        transport, _ = await loop.create_connection(lambda: source, sock=app)
        return transport, link

    result: dict[str, float] = {}
    # Throughput: one tunnel, app -> backend.
    sinks.append(Sink(total, echo=False))
    src = Source(total)
    transport, link = await tunnel(src)
    cpu0, t0 = time.process_time(), time.perf_counter()
    src.pump()
    await sinks[-1].done
    cpu1, t1 = time.process_time(), time.perf_counter()
    transport.close()
    result["gbit_s"] = total * 8 / (t1 - t0) / 1e9
    result["cpu_s_per_gb"] = (cpu1 - cpu0) / (total / 1e9)
    await link.done

    # Latency: 1-byte ping-pong through a second tunnel to an echo backend.
    sinks.append(Sink(1 << 62, echo=True))
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Pinger(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            replies.put_nowait(data)

    transport, link = await tunnel(Pinger())
    samples = []
    for i in range(pings + 500):
        t = time.perf_counter()
        transport.write(b"x")
        await replies.get()
        if i >= 500:
            samples.append(time.perf_counter() - t)
    samples.sort()
    result["p50_us"] = samples[len(samples) // 2] * 1e6
    result["p99_us"] = samples[int(len(samples) * 0.99)] * 1e6
    transport.close()
    await link.done
    conn.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    backend.close()
    listener.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--pings", type=int, default=5000)
    args = parser.parse_args()
    # perf-baselines "Which optimizations mattered" #2: avoid mmap churn on 256 KiB reads.
    ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)
    print(json.dumps({k: round(v, 2) for k, v in uvloop.run(_main(args.gib, args.pings)).items()}))


if __name__ == "__main__":
    main()
