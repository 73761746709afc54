"""``mesh-demo-app``: the shop's services, and a tiny curl-like client.

    mesh-demo-app serve --service product-catalog --port 8080
    mesh-demo-app serve --service order-management --port 8080 \\
        --upstream catalog=http://product-catalog.shop/products \\
        --upstream payment=http://payment-processing.shop/pay
    mesh-demo-app get http://product-catalog.shop/products

Every answer is JSON naming the service, the pod (``POD_NAME``) and the caller's address as the
server saw it: before the mesh that is the client pod's address (or its node's, through
kube-proxy's hairpin), with the mesh it is still the client pod's (ztunnel preserves it). Routes:
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
import os
import socket
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import h11

from meshcore.aio import http

MAX_BODY = 1 << 20
UPSTREAM_TIMEOUT = 5.0
PRODUCTS = (
    {"id": 1, "name": "ambient lamp", "price": 24.0},
    {"id": 2, "name": "tunnel kit", "price": 99.5},
    {"id": 3, "name": "waypoint sign", "price": 12.25},
)


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


def build_answer(config: ServiceConfig, path: str, caller: str) -> Answer | None:
    """The answer for `path`, or None when it needs the upstreams (order-management)."""
    base = {
        "service": config.service,
        "pod": config.pod_name,
        "namespace": config.pod_namespace,
        "caller": caller,
        "path": path,
    }
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
    config: ServiceConfig, path: str, caller: str, upstream: Mapping[str, Any]
) -> Answer:
    ok = all(isinstance(v, dict) and "error" not in v for v in upstream.values())
    body = {
        "service": config.service,
        "pod": config.pod_name,
        "namespace": config.pod_namespace,
        "caller": caller,
        "path": path,
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

    async def answer(self, path: str, caller: str) -> Answer:
        answer = build_answer(self.config, path, caller)
        if answer is not None:
            return answer
        names = [n for n, _ in self.config.upstreams]
        results = await asyncio.gather(*(fetch_json(u) for _, u in self.config.upstreams))
        return build_aggregate(self.config, path, caller, dict(zip(names, results, strict=True)))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        caller = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = h11.Connection(h11.SERVER)
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

    async def serve_forever(self) -> None:
        server = await asyncio.start_server(self.handle, self.config.host, self.config.port)
        async with server:
            print(
                f"mesh-demo-app: {self.config.service} listening on"
                f" {self.config.host}:{self.config.port}",
                flush=True,
            )
            await server.serve_forever()


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh-demo-app", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one of the shop's services")
    serve.add_argument("--service", required=True)
    serve.add_argument("--port", type=int, default=8080)
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
        )
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
