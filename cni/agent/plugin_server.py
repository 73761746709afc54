"""The agent's endpoint for mesh-cni: HTTP/1.1 (h11) on a Unix socket, mode 0600.

    POST /cmd      {"cmd": "add"|"del"|"check", "containerId", "netns", "ifname", "podName",
                    "podNamespace", "podUid", "ips": [...] (add/check)}
    GET  /healthz  200 while the server runs (the plugin's STATUS)

Answers: 200 `{}` when the handler returned; 500 `{"error": msg}` when it raised (the plugin
fails the CNI ADD with that message and the runtime retries); 400 `{"error": msg}` naming the
field for malformed requests. Statuses are chosen in `_respond_to` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Protocol

import h11

from meshcore import errors, log

logger = logging.getLogger("cni.plugin_events")

MAX_BODY = 64 * 1024
READ_TIMEOUT = 30.0  # seconds to deliver one whole request; the plugin needs far less


class PluginEventError(errors.MeshError):
    """Root of this module's errors."""


class InvalidEventError(PluginEventError):
    """The request body is not a valid plugin event (answered with 400)."""


@dataclass(frozen=True)
class PodAddEvent:
    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class PodCheckEvent:
    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class PodDelEvent:
    """DEL may arrive after the sandbox is gone: `netns` may be empty."""

    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str


PluginEvent = PodAddEvent | PodDelEvent | PodCheckEvent


class PluginEventHandler(Protocol):
    async def on_add(self, event: PodAddEvent) -> None:
        """Capture the pod before it starts. Raise to refuse: the message reaches the plugin."""

    async def on_del(self, event: PodDelEvent) -> None: ...

    async def on_check(self, event: PodCheckEvent) -> None: ...


def _field(body: dict[str, Any], name: str, *, required: bool) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise InvalidEventError(f"{name}: must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidEventError(f"{name}: required")
    if "\0" in value:
        raise InvalidEventError(f"{name}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \u escapes can carry
        raise InvalidEventError(f"{name}: is not valid Unicode text") from None
    return value


def _netns(body: dict[str, Any], *, required: bool) -> str:
    value = _field(body, "netns", required=required)
    if value and not value.startswith("/"):
        raise InvalidEventError(f"netns: must be an absolute path, got {value[:64]!r}")
    return value


def _ips(body: dict[str, Any]) -> tuple[str, ...]:
    raw = body.get("ips", [])
    if not isinstance(raw, list):
        raise InvalidEventError(f"ips: must be a list, got {type(raw).__name__}")
    ips: list[str] = []
    for i, value in enumerate(raw):
        try:
            if not isinstance(value, str):  # ip_address() would take 1 for 0.0.0.1
                raise ValueError(value)
            ips.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise InvalidEventError(f"ips[{i}]: {str(value)[:64]!r} is not an IP address") from None
    return tuple(ips)


def parse_event(data: bytes) -> PluginEvent:
    """Decode a POST /cmd body. Raises InvalidEventError naming the field at fault."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidEventError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidEventError("body must be a JSON object")
    cmd = body.get("cmd")
    if cmd not in ("add", "del", "check"):
        raise InvalidEventError(f"cmd: must be add, del or check, got {str(cmd)[:32]!r}")
    needs_pod = cmd != "del"
    common = {
        "container_id": _field(body, "containerId", required=True),
        "netns": _netns(body, required=needs_pod),
        "ifname": _field(body, "ifname", required=False),
        "pod_name": _field(body, "podName", required=needs_pod),
        "pod_namespace": _field(body, "podNamespace", required=needs_pod),
        "pod_uid": _field(body, "podUid", required=False),
    }
    if cmd == "add":
        return PodAddEvent(**common, ips=_ips(body))
    if cmd == "check":
        return PodCheckEvent(**common, ips=_ips(body))
    return PodDelEvent(**common)


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]


class PluginEventServer:
    def __init__(self, path: str, handler: PluginEventHandler) -> None:
        self._path = path
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._inode = 0
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("PluginEventServer already started")
        sock = _bind_unix(self._path)
        self._inode = os.stat(self._path).st_ino
        self._server = await asyncio.start_unix_server(self._on_client, sock=sock)
        logger.info("plugin event server listening", extra=log.fields(path=self._path))

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            if os.lstat(self._path).st_ino == self._inode:
                os.unlink(self._path)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            logger.exception("plugin event connection failed")
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        while True:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await _read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(conn, writer, _Reply(400, {"error": f"bad request: {exc}"}))
                return
            if request is None:
                return
            head, body = request
            reply = await self._respond_to(head, body)
            await _send(conn, writer, reply)
            if h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _respond_to(self, head: h11.Request, body: bytes) -> _Reply:
        path = head.target.decode("latin-1").split("?", 1)[0]
        method = head.method.decode("latin-1")
        if path == "/healthz":
            if method != "GET":
                return _Reply(405, {"error": f"{method} not allowed on /healthz"})
            return _Reply(200, {})
        if path != "/cmd":
            return _Reply(404, {"error": f"no such endpoint {path[:64]!r}"})
        if method != "POST":
            return _Reply(405, {"error": f"{method} not allowed on /cmd"})
        try:
            event = parse_event(body)
        except InvalidEventError as exc:
            logger.warning("malformed plugin event", extra=log.fields(error=str(exc)))
            return _Reply(400, {"error": str(exc)})
        pod = {
            "cmd": type(event).__name__,
            "pod": f"{event.pod_namespace}/{event.pod_name}",
            "container": event.container_id,
        }
        try:
            match event:
                case PodAddEvent():
                    await self._handler.on_add(event)
                case PodDelEvent():
                    await self._handler.on_del(event)
                case PodCheckEvent():
                    await self._handler.on_check(event)
        except Exception as exc:
            logger.warning("plugin event refused", extra=log.fields(**pod, error=str(exc)))
            return _Reply(500, {"error": str(exc) or type(exc).__name__})
        logger.info("plugin event handled", extra=log.fields(**pod))
        return _Reply(200, {})


def _bind_unix(path: str) -> socket.socket:
    """A listening stream socket at `path`, 0600 from the start; replaces a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise PluginEventError(f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)  # the socket file inherits this mode at bind
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request, bytes] | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and conn.their_state is h11.IDLE:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError(f"request body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply) -> None:
    payload = json.dumps(reply.body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
    if reply.status >= 400 and reply.status != 500:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=reply.status, headers=headers))
    data += conn.send(h11.Data(data=payload))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()
