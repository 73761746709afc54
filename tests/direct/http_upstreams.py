"""Small HTTP/1.1 servers on 127.0.0.1 for the waypoint's tests, built on h11: each answers with
who it is and what it received, and can be told to fail, stall or echo."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

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
