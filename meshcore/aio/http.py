"""A small HTTP/1.1 server on h11 for control-plane endpoints (metrics, readiness, admin).

Not for the data path: it buffers whole requests and responses. Keep-alive is supported so a
Prometheus scraper can reuse its connection. Bad requests get a 400 and the connection closes.

These ports are reachable from every pod on the node, so nobody may hold them: a connection
closes when no request starts within `IDLE_TIMEOUT` or a started one is not complete within
`REQUEST_TIMEOUT`, and past `MAX_CONNECTIONS` new connections are closed at once (each is a file
descriptor of the process that also proxies every pod's traffic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import urllib.parse
from collections.abc import Awaitable, Callable

import h11

from meshcore import budget, log

logger = logging.getLogger("meshcore.http")

MAX_BODY = 1 << 20
IDLE_TIMEOUT = 30.0  # seconds for a request to start (a scraper's reused connection waits here)
REQUEST_TIMEOUT = 10.0  # seconds for a started request to be complete
MAX_CONNECTIONS = 128  # per server


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, status: int, body: str) -> Response:
        return cls(status, body.encode(), "application/json")


Handler = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    idle_timeout: float = IDLE_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    limits: Limits = Limits(),
) -> asyncio.Server:
    connections = budget.Budget(limits.max_connections)

    def say_exhausted() -> None:
        logger.warning(
            "too many connections; closing new ones until some finish",
            extra=log.fields(port=port, limit=limits.max_connections),
        )

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not connections.try_acquire(say_exhausted):
            writer.close()
            return
        try:
            await _serve_connection(handler, reader, writer, limits)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            logger.debug("http connection timed out", extra=log.fields(port=port))
        except Exception:
            logger.exception("http connection failed")
        finally:
            connections.release()
            writer.close()

    return await asyncio.start_server(on_client, host, port, reuse_port=reuse_port)


async def _serve_connection(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits
) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        try:
            request = await _read_request(conn, reader, limits)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(conn, writer, Response.text(400, f"bad request: {exc}\n"), close=True)
            return
        if request is None:
            return
        try:
            response = await handler(request)
        except Exception as exc:
            logger.exception("http handler failed", extra=log.fields(path=request.path))
            response = Response.text(500, f"internal error: {exc}\n")
        await _send(conn, writer, response, close=False, head=request.method == "HEAD")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, limits: Limits
) -> Request | None:
    """The next request; TimeoutError when it does not start or complete in time."""
    head: h11.Request | None = None
    body = bytearray()
    loop = asyncio.get_running_loop()
    started = False
    async with asyncio.timeout(limits.idle_timeout) as deadline:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if data and not started:
                    started = True
                    deadline.reschedule(loop.time() + limits.request_timeout)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = urllib.parse.urlsplit(head.target.decode("latin-1"))
                return Request(
                    method=head.method.decode(),
                    path=target.path,
                    query=urllib.parse.parse_qs(target.query, keep_blank_values=True),
                    headers=tuple((k.decode(), v.decode("latin-1")) for k, v in head.headers),
                    body=bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: Response,
    *,
    close: bool,
    head: bool = False,
) -> None:
    """`head`: the request was HEAD, so the headers describe a body that is not sent."""
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
    ]
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data += conn.send(h11.Data(data=response.body)) if response.body and not head else b""
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()


class ResponseTooLargeError(h11.RemoteProtocolError):
    """The response body exceeded the caller's limit."""


async def get(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    target: str,
    *,
    user_agent: str,
    max_body: int = MAX_BODY,
) -> tuple[int, bytes]:
    """One ``GET`` on an open connection (``connection: close``): the status and the body.

    Raises h11.ProtocolError (ResponseTooLargeError past `max_body`) on a bad answer.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[("host", host), ("user-agent", user_agent), ("connection", "close")],
    )
    writer.write((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    await writer.drain()
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise ResponseTooLargeError("response body too large")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, bytes(body)
