"""HTTP/1.1 on h11 for the waypoint's tests: small servers on 127.0.0.1 that answer with who they
are and what they received (and can be told to fail, stall or echo), and a keep-alive client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import h11


@dataclasses.dataclass
class Upstream:
    """A named server. Behaviour per request: `fail_every` > 0 answers 503 to every n-th request
    (counting from the first); `delay` stalls before answering; POST bodies are echoed back
    chunked; everything else gets a JSON document of what was received."""

    name: str
    fail_every: int = 0
    delay: float = 0.0
    requests: int = 0
    connections: int = 0
    port: int = 0
    seen: list[dict[str, object]] = dataclasses.field(default_factory=list)
    bodies: list[bytes] = dataclasses.field(default_factory=list)  # of POST requests

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, reader)
                if request is None:
                    return
                self.requests += 1
                await self._answer(conn, writer, request, body)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()

    async def _answer(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> None:
        headers = {k.decode(): v.decode() for k, v in request.headers}
        record = {
            "server": self.name,
            "method": request.method.decode(),
            "path": request.target.decode(),
            "headers": headers,
            "body_length": len(body),
        }
        self.seen.append(record)
        if request.method == b"POST":
            self.bodies.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_every and self.requests % self.fail_every == 1 % self.fail_every:
            data = b"failing on purpose"
            status, out = 503, [(b"content-length", str(len(data)).encode())]
            writer.write(conn.send(h11.Response(status_code=status, headers=out)))
            writer.write(conn.send(h11.Data(data=data)))
        elif request.method == b"POST":
            out = [(b"transfer-encoding", b"chunked"), (b"x-server", self.name.encode())]
            writer.write(conn.send(h11.Response(status_code=200, headers=out)))
            for i in range(0, len(body), 65536):
                writer.write(conn.send(h11.Data(data=body[i : i + 65536])))
        else:
            data = json.dumps(record).encode()
            out = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"x-server", self.name.encode()),
            ]
            writer.write(conn.send(h11.Response(status_code=200, headers=out)))
            if request.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and request is None:
                return None, b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


@contextlib.asynccontextmanager
async def serving(*upstreams: Upstream) -> AsyncIterator[tuple[Upstream, ...]]:
    servers = []
    try:
        for up in upstreams:
            server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
            up.port = server.sockets[0].getsockname()[1]
            servers.append(server)
        yield upstreams
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


class Client:
    """One keep-alive client connection (h11), request after request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        chunked: bool = False,
    ) -> Response:
        has_host = any(name == "host" for name, _ in headers)
        fields = [*([] if has_host else [("host", "reviews")]), *headers]
        if body is not None:
            fields.append(
                ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body)))
            )
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=fields)))
        if body:
            for i in range(0, len(body), 100_000):
                self.writer.write(self.conn.send(h11.Data(data=body[i : i + 100_000])))
                await self.writer.drain()
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        response = None
        data = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before the response ended")
        assert response is not None
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        answered = {k.decode(): v.decode() for k, v in response.headers}
        return Response(response.status_code, answered, bytes(data))
