"""``mesh-demo-app``: the shop's services, and a tiny curl-like client.

    mesh-demo-app serve --service product-catalog --port 8080
    mesh-demo-app serve --service order-management --port 8080 \\
        --upstream catalog=http://product-catalog.shop/products \\
        --upstream payment=http://payment-processing.shop/pay
    mesh-demo-app serve --service product-catalog --port 8080 --proxy-port 15088
    mesh-demo-app get http://product-catalog.shop/products

Every answer is JSON naming the service, the pod (``POD_NAME``), the caller's address as the
server saw it and the caller's SPIFFE identity (``caller_identity``). Before the mesh the address
is the client pod's (or its node's, through kube-proxy's hairpin), with the mesh it is still the
client pod's (ztunnel preserves it). An L4 app cannot see mTLS, so the identity comes from
ztunnel: with ``--proxy-port`` the app also listens there for connections that start with a
PROXY protocol v2 header (the pod's ``ambient.istio.io/application-tunnel: PROXY/<port>``
annotation makes ztunnel deliver mesh traffic that way); the header names the client and, in TLV
0xD0, its SPIFFE ID. Plain connections on ``--port`` report ``caller_identity: null``. Routes:
``/healthz``, ``/`` and the service's own path (product-catalog ``/products``,
payment-processing ``/pay``, order-management ``/orders``, which calls every upstream and
includes their answers). HTTP/1.1 on h11; a control-plane-grade server, not a data path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import h11

from meshcore import log
from meshcore.aio import http
from meshcore.wire import proxyproto

MAX_BODY = 1 << 20
UPSTREAM_TIMEOUT = 5.0
# ztunnel writes the whole header at once right after connecting; a client that sends none
# (or too little) is not held open longer than this.
PROXY_HEADER_TIMEOUT = 5.0
PRODUCTS = (
    {"id": 1, "name": "ambient lamp", "price": 24.0},
    {"id": 2, "name": "tunnel kit", "price": 99.5},
    {"id": 3, "name": "waypoint sign", "price": 12.25},
)


logger = logging.getLogger("mesh-demo-app")


class DemoError(Exception):
    """A client-side failure (bad URL, connection, protocol) with a readable message."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceConfig:
    service: str
    port: int
    host: str = "0.0.0.0"
    upstreams: tuple[tuple[str, str], ...] = ()
    pod_name: str = ""
    pod_namespace: str = ""
    proxy_port: int | None = None  # also listen here, for PROXY v2 connections
    proxy_header_timeout: float = PROXY_HEADER_TIMEOUT


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who called, as this server saw it: ``ip:port`` and, through the mesh, a SPIFFE ID."""

    address: str
    identity: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]


def parse_upstream(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"expected name=http://host[:port]/path, got {text!r}")
    return name, url


# -- routing (pure) -------------------------------------------------------------------------


def service_path(service: str) -> str:
    return {
        "product-catalog": "/products",
        "payment-processing": "/pay",
        "order-management": "/orders",
    }.get(service, "/")


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}")
    return port


def format_address(address: object) -> str:
    """``ip:port`` of a socket address (a peername or a PROXY header endpoint)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def build_caller(peer: object, header: proxyproto.ProxyHeader | None) -> Caller:
    """The caller of a connection: its peer, unless a PROXY header names the real client.

    A LOCAL header, or one without IP endpoints, leaves the connection's own peer in place."""
    if header is None or header.source is None:
        return Caller(format_address(peer))
    identity = header.source_identity
    return Caller(format_address(header.source), identity.uri if identity else None)


def _base(config: ServiceConfig, path: str, caller: Caller) -> dict[str, Any]:
    return {
        "service": config.service,
        "pod": config.pod_name,
        "namespace": config.pod_namespace,
        "caller": caller.address,
        "caller_identity": caller.identity,
        "path": path,
    }


def build_answer(config: ServiceConfig, path: str, caller: Caller) -> Answer | None:
    """The answer for `path`, or None when it needs the upstreams (order-management)."""
    base = _base(config, path, caller)
    route = path.split("?", 1)[0]
    if route == "/healthz":
        return Answer(200, {"status": "ok", **base})
    if route == "/":
        return Answer(200, base)
    if route != service_path(config.service):
        return Answer(404, {"error": f"no route {route}", **base})
    if config.service == "product-catalog":
        return Answer(200, {**base, "products": list(PRODUCTS)})
    if config.service == "payment-processing":
        return Answer(200, {**base, "payment": "approved", "amount": 123.75})
    return None


def build_aggregate(
    config: ServiceConfig, path: str, caller: Caller, upstream: Mapping[str, Any]
) -> Answer:
    ok = all(isinstance(v, dict) and "error" not in v for v in upstream.values())
    body = {
        **_base(config, path, caller),
        "order": {"id": 42, "status": "placed" if ok else "failed"},
        "upstreams": dict(upstream),
    }
    return Answer(200 if ok else 502, body)


# -- HTTP client ----------------------------------------------------------------------------


async def fetch(url: str, timeout: float = UPSTREAM_TIMEOUT) -> tuple[int, bytes]:
    """GET `url` (http only); the status and body. Names resolve through /etc/hosts."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise DemoError(f"unsupported URL {url!r}: only http://host[:port]/path")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return await http.get(
                    reader,
                    writer,
                    parts.netloc,
                    target,
                    user_agent="mesh-demo-app",
                    max_body=MAX_BODY,
                )
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise DemoError(f"GET {url}: timed out after {timeout:g}s") from exc
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            detail = f"cannot resolve {host}: {exc.strerror}"
        else:
            detail = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
        raise DemoError(f"GET {url}: {detail}") from exc
    except h11.ProtocolError as exc:
        raise DemoError(f"GET {url}: bad HTTP answer: {exc}") from exc


async def fetch_json(url: str) -> dict[str, Any]:
    """An upstream's JSON answer, or ``{"error": ...}`` (the aggregate reports, never raises)."""
    try:
        status, body = await fetch(url)
    except DemoError as exc:
        return {"error": str(exc)}
    try:
        parsed = json.loads(body)
    except ValueError:
        return {"error": f"status {status}: body is not JSON"}
    if status != 200:
        return {"error": f"status {status}", "answer": parsed}
    return parsed if isinstance(parsed, dict) else {"error": "answer is not a JSON object"}


# -- HTTP server ----------------------------------------------------------------------------


class DemoServer:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config

    async def answer(self, path: str, caller: Caller) -> Answer:
        answer = build_answer(self.config, path, caller)
        if answer is not None:
            return answer
        names = [n for n, _ in self.config.upstreams]
        results = await asyncio.gather(*(fetch_json(u) for _, u in self.config.upstreams))
        return build_aggregate(self.config, path, caller, dict(zip(names, results, strict=True)))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain connection on ``--port``: the caller is the TCP peer, with no identity."""
        await self._serve(reader, writer, build_caller(writer.get_extra_info("peername"), None))

    async def handle_proxied(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A connection on ``--proxy-port``: a PROXY v2 header first, or it is closed."""
        peer = writer.get_extra_info("peername")
        timeout = self.config.proxy_header_timeout
        try:
            async with asyncio.timeout(timeout):
                header, leftover = await _read_proxy_header(reader)
        except (proxyproto.ProxyProtocolRemoteError, TimeoutError, ConnectionError) as exc:
            reason = str(exc) or f"no complete PROXY header within {timeout:g}s"
            logger.error(
                "closing connection without a valid PROXY protocol v2 header",
                extra=log.fields(peer=format_address(peer), error=reason),
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await self._serve(reader, writer, build_caller(peer, header), leftover)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        caller: Caller,
        initial: bytes = b"",
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        if initial:
            conn.receive_data(initial)  # the request's first bytes came with the header
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                answer = await self.answer(request.target.decode(errors="replace"), caller)
                payload = json.dumps(answer.body, indent=2).encode() + b"\n"
                data = (
                    conn.send(
                        h11.Response(
                            status_code=answer.status,
                            headers=[
                                ("content-type", "application/json"),
                                ("content-length", str(len(payload))),
                                ("server", "mesh-demo-app"),
                            ],
                        )
                    )
                    or b""
                )
                data += conn.send(h11.Data(data=payload)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                writer.write(data)
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Request | None:
        request: h11.Request | None = None
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def start(self) -> list[asyncio.Server]:
        """Listen on the plain port and, when configured, the PROXY port (in that order)."""
        config = self.config
        servers = [await asyncio.start_server(self.handle, config.host, config.port)]
        if config.proxy_port is not None:
            try:
                servers.append(
                    await asyncio.start_server(self.handle_proxied, config.host, config.proxy_port)
                )
            except BaseException:
                servers[0].close()
                await servers[0].wait_closed()
                raise
        return servers

    async def serve_forever(self) -> None:
        servers = await self.start()
        try:
            ports = [str(s.sockets[0].getsockname()[1]) for s in servers]
            proxied = f" (PROXY protocol v2 on {ports[1]})" if len(ports) > 1 else ""
            print(
                f"mesh-demo-app: {self.config.service} listening on"
                f" {self.config.host}:{ports[0]}{proxied}",
                flush=True,
            )
            await asyncio.gather(*(s.serve_forever() for s in servers))
        finally:
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()


async def _read_proxy_header(
    reader: asyncio.StreamReader,
) -> tuple[proxyproto.ProxyHeader, bytes]:
    parser = proxyproto.ProxyHeaderParser()
    while True:
        data = await reader.read(4096)
        if not data:
            parser.receive_eof()
        result = parser.receive_data(data)
        if result is not None:
            return result


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh-demo-app", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one of the shop's services")
    serve.add_argument("--service", required=True)
    serve.add_argument("--port", type=parse_port, default=8080)
    serve.add_argument(
        "--proxy-port",
        type=parse_port,
        default=None,
        help="also listen here; every connection must start with a PROXY protocol v2 header",
    )
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--upstream", action="append", type=parse_upstream, default=[])
    get = sub.add_parser("get", help="GET a URL and print the body (exit 1 unless 2xx)")
    get.add_argument("url")
    get.add_argument("--timeout", type=float, default=UPSTREAM_TIMEOUT)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environ = os.environ if env is None else env
    if args.command == "serve":
        config = ServiceConfig(
            service=args.service,
            port=args.port,
            host=args.host,
            upstreams=tuple(args.upstream),
            pod_name=environ.get("POD_NAME", ""),
            pod_namespace=environ.get("POD_NAMESPACE", ""),
            proxy_port=args.proxy_port,
        )
        log.configure(environ.get("LOG_LEVEL", "info"))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(DemoServer(config).serve_forever())
        return 0
    try:
        status, body = asyncio.run(fetch(args.url, args.timeout))
    except DemoError as exc:
        print(f"mesh-demo-app: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode(errors="replace"))
    sys.stdout.flush()
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
