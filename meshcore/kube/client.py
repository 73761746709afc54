"""An async Kubernetes API client over HTTP/1.1 (h11) on a Unix socket or TCP.

The same client talks to the controller's local API server (playground) and, later, to a real
cluster: requests and answers are the Kubernetes REST wire protocol with JSON bodies, errors are
`Status` objects turned into `errors.ApiError`, and a watch is a chunked response with one JSON
event per line.

Connections: request/response calls share a small pool of keep-alive connections; each watch
owns a connection of its own for as long as it streams. A pooled connection that the server
closed while idle fails before any answer byte arrives; such a request is retried once on a fresh
connection (the server never saw it).

Warnings: the API server's non-fatal warnings (``Warning: 299 - "text"`` headers, e.g. a policy
field ztunnel does not enforce) go to the `on_warning` callback, as client-go's WarningHandler,
and to every `collect_warnings()` block active in the calling task.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from typing import Any

import h11

from meshcore import digits
from meshcore.kube import errors, objects, resources
from meshcore.kube.objects import ObjectList, WatchEvent

__all__ = ["ApiClient", "ObjectList", "WatchEvent"]

USER_AGENT = "meshcore-kube/0.1"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
# The largest request body an API server takes (kube-apiserver's limit, and the local one's):
# refused here, before sending, because a server that stops reading a body it will not take
# makes the client see a reset connection instead of its 413.
MAX_REQUEST_BODY_BYTES = 3 << 20

_READ_SIZE = 256 * 1024
_MAX_IDLE_CONNECTIONS = 4
# A watch line holds one object; anything this big is a broken server, not a big pod.
_MAX_EVENT_BYTES = 64 << 20
_MAX_HEADER_BYTES = 64 * 1024


class InvalidObjectError(errors.KubeError, ValueError):
    """An object passed to create/replace/apply lacks what its URL is built from."""


class _Address:
    """Where the server listens: ``unix:///abs/path.sock`` or ``http://host:port``."""

    def __init__(self, server: str) -> None:
        self.text = server
        self.unix_path: str | None = None
        self.host = "localhost"
        self.port = 0
        if server.startswith("unix://"):
            path = server.removeprefix("unix://")
            if not path.startswith("/"):
                raise errors.KubeConfigError(f"unix socket address must be absolute: {server!r}")
            self.unix_path = path
            return
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme == "https":
            raise errors.KubeConfigError(f"https API servers are not supported yet: {server!r}")
        if parsed.scheme != "http" or not parsed.hostname:
            raise errors.KubeConfigError(
                f"API server must be unix:///path or http://host:port, got {server!r}"
            )
        self.host = parsed.hostname
        self.port = parsed.port or 80

    @property
    def host_header(self) -> str:
        return "localhost" if self.unix_path else f"{self.host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_path is not None:
            return await asyncio.open_unix_connection(self.unix_path, limit=_READ_SIZE)
        return await asyncio.open_connection(self.host, self.port, limit=_READ_SIZE)


# One warn-value of a Warning header (RFC 7234): code, agent, quoted text, optional quoted date.
_WARN_CODE_LEN = 3
KUBERNETES_WARNING_CODE = "299"


def _read_quoted(value: str, start: int) -> tuple[str, int] | None:
    """The quoted-string at `start` (unescaped) and the index after it; None if malformed."""
    if start >= len(value) or value[start] != '"':
        return None
    out: list[str] = []
    i = start + 1
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    return None


def parse_warning_header(value: str) -> list[str]:
    """The texts of the code-299 warnings in one Warning header value (several may be joined
    with commas); other codes are skipped, and parsing stops at the first malformed part."""
    texts: list[str] = []
    i = 0
    while i < len(value):
        while i < len(value) and value[i] in " ,":
            i += 1
        code = value[i : i + _WARN_CODE_LEN]
        if i >= len(value) or len(code) != _WARN_CODE_LEN or not digits.is_digits(code):
            break
        agent_end = value.find(" ", i + _WARN_CODE_LEN + 1)
        if value[i + _WARN_CODE_LEN : i + _WARN_CODE_LEN + 1] != " " or agent_end < 0:
            break
        quoted = _read_quoted(value, agent_end + 1)
        if quoted is None:
            break
        text, i = quoted
        if value[i : i + 2] == ' "':  # an optional warn-date
            date = _read_quoted(value, i + 1)
            if date is None:
                break
            i = date[1]
        if code == KUBERNETES_WARNING_CODE:
            texts.append(text)
    return texts


def _warnings_of(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    texts: list[str] = []
    for name, value in headers:
        if name.lower() == b"warning":
            texts += parse_warning_header(value.decode("utf-8", "replace"))
    return texts


class _StaleConnectionError(Exception):
    """A reused connection failed before the server answered anything: safe to retry."""


class _Connection:
    def __init__(
        self, address: _Address, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
        self.received_any = False

    @property
    def is_reusable(self) -> bool:
        return (
            self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            and not self._writer.is_closing()
            and not self._reader.at_eof()
        )

    def start_next_cycle(self) -> None:
        self._h11.start_next_cycle()
        self.received_any = False

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self._h11.send(event) or b"" for event in events)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise errors.ApiConnectionError(self.address.text, f"send failed: {exc}") from exc

    async def next_event(self, idle_timeout: float | None = None) -> h11.Event:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._h11.their_state is h11.ERROR and self._reader.at_eof():
                    raise errors.ApiConnectionError(
                        self.address.text, "the server closed the connection mid-answer"
                    ) from exc
                raise errors.ApiProtocolError(self.address.text, str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(idle_timeout):
                        data = await self._reader.read(_READ_SIZE)
                except TimeoutError as exc:
                    raise errors.ApiConnectionError(
                        self.address.text, f"no data for {idle_timeout:.0f} s"
                    ) from exc
                except OSError as exc:
                    raise errors.ApiConnectionError(self.address.text, str(exc)) from exc
                if data:
                    self.received_any = True
                self._h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise errors.ApiConnectionError(
                    self.address.text, "the server closed the connection"
                )
            assert isinstance(event, h11.Event)
            return event

    async def read_response(self, idle_timeout: float | None = None) -> h11.Response:
        while True:
            event = await self.next_event(idle_timeout)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise errors.ApiProtocolError(self.address.text, f"unexpected {event!r}")

    async def read_body(self) -> bytes:
        chunks = []
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _decode_json(address: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise errors.ApiProtocolError(address, f"body is not JSON: {exc}") from exc


def _error_from_response(address: str, status_code: int, data: bytes) -> errors.ApiError:
    with contextlib.suppress(ValueError, RecursionError):
        body = json.loads(data)
        if isinstance(body, dict) and body.get("kind") == "Status":
            return errors.ApiError.from_status(body, status_code)
    text = data[:200].decode("utf-8", "replace").strip()
    return errors.ApiError.from_status(
        {"code": status_code, "message": f"{address} answered {status_code}: {text}"}
    )


def _decode_event(address: str, line: bytes) -> WatchEvent:
    body = _decode_json(address, line)
    if not isinstance(body, dict):
        raise errors.ApiProtocolError(address, "watch event is not a JSON object")
    kind, obj = body.get("type"), body.get("object")
    if kind not in objects.EVENT_TYPES or not isinstance(obj, dict):
        raise errors.ApiProtocolError(address, f"malformed watch event {line[:200]!r}")
    return WatchEvent(kind, obj)


def _namespace_of(rtype: resources.ResourceType, obj: Mapping[str, Any]) -> str | None:
    if not rtype.namespaced:
        return None
    # kubectl's default when the manifest names no namespace.
    return objects.namespace(obj) or "default"


class ApiClient:
    """One API server. Safe to share between tasks; `close()` ends pooled and watch connections."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self._address = _Address(server)
        self._token = token
        self._timeout = timeout
        self._on_warning = on_warning
        self._idle: list[_Connection] = []
        self._watches: set[_Connection] = set()
        self._kinds: dict[tuple[str, str], resources.ResourceType] = {}
        self._closed = False
        # The collect_warnings() lists of the current task (a context variable per client, so
        # tasks sharing the client do not see each other's warnings).
        self._collectors: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar(
            f"kube-warnings-{id(self)}", default=()
        )

    @property
    def server(self) -> str:
        return self._address.text

    @contextlib.contextmanager
    def collect_warnings(self) -> Iterator[list[str]]:
        """The warnings the server answers requests made by this task inside the block with,
        in order (e.g. ``with api.collect_warnings() as warnings: await api.apply(obj)``)."""
        found: list[str] = []
        token = self._collectors.set((*self._collectors.get(), found))
        try:
            yield found
        finally:
            self._collectors.reset(token)

    def _report_warnings(self, texts: list[str]) -> None:
        for text in texts:
            if self._on_warning is not None:
                self._on_warning(text)
            for found in self._collectors.get():
                found.append(text)

    async def close(self) -> None:
        self._closed = True
        conns = self._idle + list(self._watches)
        self._idle.clear()
        self._watches.clear()
        for conn in conns:
            await conn.close()

    # -- transport ---------------------------------------------------------------------------

    async def _open(self) -> _Connection:
        if self._closed:
            raise errors.ApiConnectionError(self._address.text, "the client is closed")
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await self._address.connect()
        except TimeoutError as exc:
            raise errors.ApiConnectionError(self._address.text, "connect timed out") from exc
        except OSError as exc:
            raise errors.ApiConnectionError(self._address.text, exc.strerror or str(exc)) from exc
        return _Connection(self._address, reader, writer)

    def _headers(self, body: bytes | None, content_type: str | None) -> list[tuple[str, str]]:
        headers = [
            ("host", self._address.host_header),
            ("user-agent", USER_AGENT),
            ("accept", JSON),
        ]
        if self._token:
            headers.append(("authorization", f"Bearer {self._token}"))
        if body is not None:
            headers.append(("content-type", content_type or JSON))
            headers.append(("content-length", str(len(body))))
        return headers

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        body: bytes | None,
        content_type: str | None,
    ) -> tuple[int, bytes, list[str]]:
        events: list[h11.Event] = [
            h11.Request(method=method, target=target, headers=self._headers(body, content_type))
        ]
        if body is not None:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await conn.send(*events)
        response = await conn.read_response()
        data = await conn.read_body()
        return response.status_code, data, _warnings_of(response.headers)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        if payload is not None and len(payload) > MAX_REQUEST_BODY_BYTES:
            limit = MAX_REQUEST_BODY_BYTES
            raise errors.RequestEntityTooLargeError(
                f"the request body is {len(payload)} bytes, larger than the {limit} bytes an API"
                " server accepts"
            )
        try:
            async with asyncio.timeout(self._timeout):
                status, data, warnings = await self._request_once(
                    method, target, payload, content_type
                )
        except TimeoutError as exc:
            raise errors.ApiConnectionError(
                self._address.text, f"{method} {path}: no answer within {self._timeout:g} s"
            ) from exc
        self._report_warnings(warnings)
        if status >= 400:
            raise _error_from_response(self._address.text, status, data)
        return _decode_json(self._address.text, data)

    async def _request_once(
        self, method: str, target: str, payload: bytes | None, content_type: str | None
    ) -> tuple[int, bytes, list[str]]:
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._open()
            try:
                result = await self._exchange(conn, method, target, payload, content_type)
            except errors.ApiConnectionError:
                await conn.close()
                if reused and not conn.received_any:
                    continue  # the server closed an idle connection before reading this request
                raise
            except BaseException:
                await conn.close()
                raise
            if conn.is_reusable and not self._closed and len(self._idle) < _MAX_IDLE_CONNECTIONS:
                conn.start_next_cycle()
                self._idle.append(conn)
            else:
                await conn.close()
            return result

    async def _request_object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = await self._request(method, path, **kwargs)
        if not isinstance(body, dict):
            raise errors.ApiProtocolError(self._address.text, f"{method} {path}: not an object")
        return body

    # -- discovery ---------------------------------------------------------------------------

    async def resolve(self, api_version: str, kind: str) -> resources.ResourceType:
        """The resource type serving `kind` in `api_version`, from discovery (cached)."""
        found = self._kinds.get((api_version, kind))
        if found is not None:
            return found
        group, version = resources.split_api_version(api_version)
        if not version or "/" in group or not kind:
            raise errors.UnknownKindError(api_version, kind)
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        try:
            doc = await self._request_object("GET", path)
        except errors.NotFoundError as exc:
            raise errors.UnknownKindError(api_version, kind) from exc
        for entry in doc.get("resources") or []:
            if not isinstance(entry, dict):
                continue
            plural, found_kind = entry.get("name"), entry.get("kind")
            if not isinstance(plural, str) or "/" in plural or not isinstance(found_kind, str):
                continue  # subresources ("pods/status") share the kind of their parent
            rtype = resources.ResourceType(
                group, version, found_kind, plural, bool(entry.get("namespaced"))
            )
            self._kinds[(api_version, found_kind)] = rtype
        found = self._kinds.get((api_version, kind))
        if found is None:
            raise errors.UnknownKindError(api_version, kind)
        return found

    async def _rtype_of(self, obj: Mapping[str, Any]) -> resources.ResourceType:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            raise InvalidObjectError("object has no apiVersion and kind strings")
        return await self.resolve(api_version, kind)

    # -- verbs -------------------------------------------------------------------------------

    async def get(
        self, rtype: resources.ResourceType, name: str, namespace: str | None = None
    ) -> dict[str, Any]:
        return await self._request_object("GET", rtype.path(namespace, name))

    async def list(
        self,
        rtype: resources.ResourceType,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ObjectList:
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        body = await self._request_object("GET", rtype.path(namespace), query=query)
        items = body.get("items")
        if items is None:
            items = []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise errors.ApiProtocolError(self._address.text, "list items are not objects")
        for item in items:
            # Real servers leave kind out of list items; handlers want whole objects.
            item.setdefault("apiVersion", rtype.api_version)
            item.setdefault("kind", rtype.kind)
        return ObjectList(items, objects.resource_version(body))

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        rtype = await self._rtype_of(obj)
        return await self._request_object("POST", rtype.path(_namespace_of(rtype, obj)), body=obj)

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        rtype = await self._rtype_of(obj)
        name = objects.name(obj)
        if not name:
            raise InvalidObjectError(f"{rtype.kind} has no metadata.name to replace")
        return await self._request_object(
            "PUT", rtype.path(_namespace_of(rtype, obj), name), body=obj
        )

    async def patch(
        self,
        rtype: resources.ResourceType,
        name: str,
        namespace: str | None,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386): null deletes a key, lists are replaced whole."""
        return await self._request_object(
            "PATCH",
            rtype.path(namespace, name, subresource),
            body=patch,
            content_type=MERGE_PATCH,
        )

    async def delete(
        self,
        rtype: resources.ResourceType,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_seconds: int | None = None,
        precondition_uid: str | None = None,
    ) -> dict[str, Any] | None:
        """The object as deletion left it (terminating, or gone), or None for a bare Status.

        `precondition_uid` deletes only that incarnation of the name (409 Conflict otherwise).
        """
        query = {}
        if grace_period_seconds is not None:
            query["gracePeriodSeconds"] = str(grace_period_seconds)
        options = None
        if precondition_uid is not None:
            options = {
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "preconditions": {"uid": precondition_uid},
            }
        body = await self._request_object(
            "DELETE", rtype.path(namespace, name), query=query, body=options
        )
        return None if body.get("kind") == "Status" else body

    async def apply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """kubectl-style client-side apply: create, or three-way merge onto the live object.

        The last applied configuration is kept in the `kubectl.kubernetes.io/last-applied-
        configuration` annotation, so fields removed from the manifest are removed from the
        object while server-owned fields (uid, resourceVersion, status, clusterIP, nodeName) and
        labels or annotations written by other components stay. Returns the object and
        "created", "configured" or "unchanged".
        """
        rtype = await self._rtype_of(obj)
        name = objects.name(obj)
        if not name:
            raise InvalidObjectError(f"{rtype.kind} has no metadata.name to apply")
        namespace = _namespace_of(rtype, obj)
        desired = objects.merge_patch(
            obj,
            {"metadata": {"annotations": {objects.LAST_APPLIED: objects.build_last_applied(obj)}}},
        )
        try:
            live = await self.get(rtype, name, namespace)
        except errors.NotFoundError:
            return await self.create(desired), "created"
        patch = objects.build_apply_patch(objects.find_last_applied(live), desired, live)
        if not patch:
            return live, "unchanged"
        patched = await self.patch(rtype, name, namespace, patch)
        # A patch that only restates server defaults (protocol: TCP in a replaced list) changes
        # nothing, and the server then keeps the resourceVersion.
        same = objects.resource_version(patched) == objects.resource_version(live)
        return patched, "unchanged" if same else "configured"

    async def watch(
        self,
        rtype: resources.ResourceType,
        namespace: str | None = None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Stream changes after `resource_version` ("" or "0": from now).

        ERROR events (a 410 Status when the version is too old) are yielded, not raised; the
        iteration ends when the server ends the stream. A dropped connection raises
        `ApiConnectionError`. Close the iterator (``contextlib.aclosing``) to stop early.
        """
        query = {"watch": "true", "allowWatchBookmarks": "true"}
        if resource_version:
            query["resourceVersion"] = resource_version
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        idle_timeout = None
        if timeout_seconds is not None:
            query["timeoutSeconds"] = str(timeout_seconds)
            idle_timeout = timeout_seconds + self._timeout
        target = rtype.path(namespace) + "?" + urllib.parse.urlencode(query)
        conn = await self._open()
        self._watches.add(conn)
        try:
            await conn.send(
                h11.Request(method="GET", target=target, headers=self._headers(None, None)),
                h11.EndOfMessage(),
            )
            response = await conn.read_response(self._timeout)
            self._report_warnings(_warnings_of(response.headers))
            if response.status_code != 200:
                raise _error_from_response(
                    self._address.text, response.status_code, await conn.read_body()
                )
            buffer = bytearray()
            while True:
                event = await conn.next_event(idle_timeout)
                if isinstance(event, h11.EndOfMessage):
                    break
                if not isinstance(event, h11.Data):
                    continue
                buffer += event.data
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if line.strip():
                        yield _decode_event(self._address.text, line)
                if len(buffer) > _MAX_EVENT_BYTES:
                    raise errors.ApiProtocolError(self._address.text, "watch event too large")
            if bytes(buffer).strip():
                yield _decode_event(self._address.text, bytes(buffer))
        finally:
            self._watches.discard(conn)
            await conn.close()
