"""The local API server: the Kubernetes REST wire protocol over HTTP/1.1 (h11) on a Unix socket.

It serves the store to the node agents, the playground kubelets and meshctl, which use the same
`meshcore.kube` client they would use against a real cluster (docs/internals.md, "Local API").

Shape of a request: `build_route` (pure) maps the path to a discovery document or a resource
route; `handle` (synchronous, so the store never changes between a check and its write) turns
the request into a `Reply` or a `WatchReply`; the connection loop only moves bytes. Every
`ApiError` becomes its `Status` in `handle`, the one place errors map to HTTP codes; anything
else is a 500 that is logged, and the server keeps serving.

A watch streams one JSON event per line in a chunked response, flushed per event, until
`timeoutSeconds`, the client leaving, or the server closing (which ends the stream cleanly).

Versions: a kind served in several versions is stored in its first one. A request to another
version has its body's `apiVersion` converted to the stored one on the way in, and every object
of the answer (and of a watch) converted back to the URL's version on the way out, as the
Kubernetes API server does for a CRD whose versions share one schema.

Warnings: a successful write of a kind with `find_warnings` answers with one
``Warning: 299 - "text"`` header per warning (non-fatal: the object is stored), which kubectl
and `meshcore.kube.client` show to the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import stat
import urllib.parse
from typing import Any

import h11

from controller.sources.local import errors as local_errors
from controller.sources.local import kinds, store, validation, watch
from meshcore import digits, log
from meshcore.kube import client as kube_client
from meshcore.kube import errors, objects, resources, selectors, yamljson

_LOG = logging.getLogger("controller.apiserver")

MAX_BODY_BYTES = kube_client.MAX_REQUEST_BODY_BYTES
MAX_BODY_DEPTH = 64
JSON = "application/json"
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
PATCH_TYPES = frozenset(
    {
        "application/merge-patch+json",
        # Accepted for kubectl's sake, and applied as a merge patch: lists are replaced whole
        # rather than merged by key.
        "application/strategic-merge-patch+json",
    }
)
_READ_SIZE = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_IDLE_TIMEOUT = 300.0
_BODY_TIMEOUT = 30.0
_WRITE_TIMEOUT = 60.0
_MAX_DISCARD_BYTES = 64 << 20
_INT_RE = re.compile(r"^-?[0-9]{1,10}$")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class WatchReply:
    """A watch to stream: `subscription`, or one ERROR event carrying `error` (a Status)."""

    subscription: watch.Subscription | None
    error: dict[str, Any] | None = None
    timeout: float | None = None
    # The apiVersion objects are streamed in, when the URL's version is not the stored one.
    api_version: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceRoute:
    served: kinds.ServedKind
    namespace: str | None
    name: str | None
    subresource: str | None
    rtype: resources.ResourceType  # as the URL names it: the stored type, or another version

    @property
    def is_converted(self) -> bool:
        """The URL's version is not the stored one: bodies and answers are converted."""
        return self.rtype != self.served.rtype


def _no_such_path() -> errors.NotFoundError:
    return errors.NotFoundError("the server could not find the requested resource")


def _not_allowed() -> errors.MethodNotAllowedError:
    return errors.MethodNotAllowedError(
        "the server does not allow this method on the requested resource"
    )


# Namespace subresources: /api/v1/namespaces/<ns>/status is the namespace's status, not a kind
# called "status" in namespace <ns>.
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def build_route(registry: kinds.KindRegistry, path: str) -> dict[str, Any] | ResourceRoute:
    """The discovery document or the resource a path names; NotFoundError otherwise."""
    parts = [urllib.parse.unquote(p) for p in path.rstrip("/").split("/")[1:]]
    if any(not p for p in parts):
        raise _no_such_path()
    if parts == ["api"]:
        return kinds.build_api_versions()
    if parts == ["apis"]:
        return kinds.build_api_group_list(registry)
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) == 2 and parts[0] == "apis":
        versions = registry.group_versions().get(parts[1])
        if not versions:
            raise _no_such_path()
        return kinds.build_api_group(parts[1], versions)
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise _no_such_path()
    if not registry.serves(group, version):
        raise _no_such_path()
    if not rest:
        return kinds.build_api_resource_list(registry, group, version)
    namespace = None
    if rest[0] == "namespaces" and len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        raise _no_such_path()
    served = registry.find_plural(group, version, rest[0])
    if served is None or (namespace is not None and not served.rtype.namespaced):
        raise _no_such_path()
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if subresource is not None and (subresource != "status" or not served.has_status):
        raise _no_such_path()
    return ResourceRoute(served, namespace, name, subresource, served.rtype_at(version))


# -- versions and warnings -------------------------------------------------------------------

# Kubernetes' own limits are of this order; they keep one answer's headers far below what a
# client buffers (meshcore.kube.client reads up to 64 KiB of headers).
MAX_WARNINGS = 32
MAX_WARNING_CHARS = 512
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def convert_body(route: ResourceRoute, body: dict[str, Any]) -> dict[str, Any]:
    """A request body (object or merge patch) in the stored version.

    An `apiVersion` or `kind` other than the URL's is refused here (the store would name the
    stored version in its message, not the one the client asked for).
    """
    if not route.is_converted:
        return body
    for field, expected in (("apiVersion", route.rtype.api_version), ("kind", route.rtype.kind)):
        if field in body and body[field] != expected:
            raise errors.BadRequestError(
                f"{field} {validation.render_value(body[field])} of the object does not match "
                f"the {route.rtype.kind} ({route.rtype.api_version}) expected at this URL"
            )
    if "apiVersion" not in body:
        return body
    return {**body, "apiVersion": route.served.rtype.api_version}


def convert_answer(route: ResourceRoute, obj: dict[str, Any]) -> dict[str, Any]:
    """A stored object as the URL's version shows it."""
    if route.is_converted and obj.get("apiVersion") == route.served.rtype.api_version:
        return {**obj, "apiVersion": route.rtype.api_version}
    return obj


def build_warnings(texts: list[str]) -> tuple[str, ...]:
    """What the answer's Warning headers say: duplicates dropped, control characters blanked,
    text that has no UTF-8 form replaced, each cut to `MAX_WARNING_CHARS`, at most
    `MAX_WARNINGS` (the last one says how many more)."""
    unique: list[str] = []
    for text in texts:
        # A lone surrogate (JSON allows "\ud800") has no UTF-8 form: no header could carry it.
        clean = _CONTROL_RE.sub(" ", text).encode("utf-8", "replace").decode("utf-8")
        if len(clean) > MAX_WARNING_CHARS:
            clean = clean[: MAX_WARNING_CHARS - 3] + "..."
        if clean not in unique:
            unique.append(clean)
    if len(unique) > MAX_WARNINGS:
        hidden = len(unique) - (MAX_WARNINGS - 1)
        unique = [*unique[: MAX_WARNINGS - 1], f"{hidden} more warnings not shown"]
    return tuple(unique)


def build_warning_header(text: str) -> bytes:
    """RFC 7234 warn-value with code 299 and no agent, as Kubernetes writes it; the text is a
    quoted-string in UTF-8 (Kubernetes escapes only the quote and the backslash)."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{quoted}"'.encode()


# -- bodies --------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_json_value(value: Any) -> None:
    """Only JSON types, string keys, finite numbers, text that is Unicode, bounded nesting
    (BadRequestError)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            raise errors.BadRequestError(f"the body nests deeper than {MAX_BODY_DEPTH} levels")
        if isinstance(current, dict):
            for k, v in current.items():
                if not isinstance(k, str):
                    raise errors.BadRequestError(f"object keys must be strings, not {k!r}")
                _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(current, str):
            _check_text(current)
        elif isinstance(current, list):
            stack.extend((v, depth + 1) for v in current)
        elif isinstance(current, float):
            if not math.isfinite(current):
                raise errors.BadRequestError("numbers must be finite")
        elif current is not None and not isinstance(current, str | int | bool):
            raise errors.BadRequestError(f"unsupported value of type {type(current).__name__}")


def _check_text(text: str) -> None:
    """JSON's \\u escapes can write half of a surrogate pair, which is no character at all:
    nothing downstream (hashes, files, ztunnel's config) could encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise errors.BadRequestError(
            f"the body has a string that is not valid Unicode ({exc.reason} at position "
            f"{exc.start}): {text[:64].encode('utf-8', 'backslashreplace').decode()!r}"
        ) from None


def _decode_yaml(body: bytes) -> Any:
    """One YAML document as JSON data, converted as kubectl converts a manifest (integer and
    boolean keys become strings: a PeerAuthentication's `portLevelMtls` is keyed by ports)."""
    try:
        docs = yamljson.load_documents(body)
    except yamljson.YamlDocumentError as exc:
        raise errors.BadRequestError(f"the request body is not valid YAML: {exc.detail}") from exc
    if len(docs) != 1:
        raise errors.BadRequestError(f"the request body must be one YAML document, not {len(docs)}")
    return docs[0]


def decode_body(body: bytes, content_type: str, *, patch: bool = False) -> Any:
    """The request body as JSON data; 400/415 `ApiError`s say what is wrong with it."""
    media = content_type.split(";", 1)[0].strip().lower()
    if patch:
        if media not in PATCH_TYPES:
            raise errors.UnsupportedMediaTypeError(
                f"unsupported patch type {media!r}: use application/merge-patch+json "
                "(application/strategic-merge-patch+json is applied as a merge patch)"
            )
    elif media not in ("", JSON, "*/*") and media not in YAML_TYPES:
        raise errors.UnsupportedMediaTypeError(
            f"unsupported media type {media!r}: the body must be application/json or "
            "application/yaml"
        )
    if not body.strip():
        raise errors.BadRequestError("the request body is empty")
    if media in YAML_TYPES:
        value = _decode_yaml(body)
    else:
        try:
            value = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise errors.BadRequestError(f"the request body is not valid JSON: {exc}") from exc
    check_json_value(value)
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else type(value).__name__
        raise errors.BadRequestError(f"the request body must be a JSON object, not {kind}")
    return value


def _int_param(query: dict[str, str], name: str) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    if not _INT_RE.match(text):
        raise errors.BadRequestError(f"{name} must be an integer, got {text!r}")
    return int(text)


def _is_true(text: str | None) -> bool:
    return text is not None and text.lower() in ("true", "1")


# -- the server ----------------------------------------------------------------------------


class LocalApiServer:
    def __init__(self, object_store: store.ObjectStore) -> None:
        self._store = object_store
        self._registry = object_store.registry
        self._server: asyncio.AbstractServer | None = None
        self._socket_path: str | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._busy: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()

    @property
    def socket_path(self) -> str | None:
        return self._socket_path

    async def start(self, socket_path: str) -> None:
        """Listen on `socket_path` (mode 0600). A stale socket file is replaced; a live one is
        an error, as is any other file there."""
        await _clear_stale_socket(socket_path)
        self._closing.clear()  # a closed server may be started again
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=socket_path)
        except OSError as exc:
            raise local_errors.ServerStartError(
                f"cannot listen on {socket_path}: {exc.strerror or exc}"
            ) from exc
        os.chmod(socket_path, 0o600)
        self._socket_path = socket_path
        _LOG.info("local API listening", extra=log.fields(socket=socket_path))

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, end watches cleanly, let requests in progress finish (up to
        `grace` seconds), then abort what is left and remove the socket file."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._connections.items()):
            if task not in self._busy:
                writer.close()  # idle keep-alive: its pending read sees EOF and the task ends
        pending = set(self._connections)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            stuck = self._connections.get(task)
            if stuck is not None:
                stuck.transport.abort()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
            self._socket_path = None

    # -- request handling (synchronous) ------------------------------------------------------

    def handle(self, request: Request) -> Reply | WatchReply:
        try:
            return self._dispatch(request)
        except errors.ApiError as exc:
            return Reply(exc.code, exc.status)
        except Exception as exc:
            _LOG.exception(
                "request failed", extra=log.fields(method=request.method, path=request.path)
            )
            failure = errors.ApiError(f"Internal error occurred: {type(exc).__name__}: {exc}")
            return Reply(failure.code, failure.status)

    def _dispatch(self, request: Request) -> Reply | WatchReply:
        route = build_route(self._registry, request.path)
        method = request.method
        if isinstance(route, dict):
            if method != "GET":
                raise _not_allowed()
            return Reply(200, route)
        if "dryRun" in request.query:
            raise errors.BadRequestError("dryRun is not supported by the local API server")
        rtype = route.served.rtype
        namespace, name = route.namespace, route.name
        content_type = request.headers.get("content-type", "")
        if name is None:
            if method == "GET":
                if _is_true(request.query.get("watch")):
                    return self._watch(route, request.query)
                return Reply(200, self._list(route, request.query))
            if method == "POST":
                if rtype.namespaced and namespace is None:
                    raise _not_allowed()
                body = convert_body(route, decode_body(request.body, content_type))
                return self._written(route, 201, self._store.create(rtype, body, namespace))
            raise _not_allowed()
        if method == "GET":
            if route.subresource is None and _is_true(request.query.get("watch")):
                return self._watch(route, request.query)
            return Reply(200, convert_answer(route, self._store.get(rtype, name, namespace)))
        if method == "PUT":
            body = convert_body(route, decode_body(request.body, content_type))
            replaced = self._store.replace(
                rtype, body, namespace, name, subresource=route.subresource
            )
            return self._written(route, 200, replaced)
        if method == "PATCH":
            patch = convert_body(route, decode_body(request.body, content_type, patch=True))
            patched = self._store.patch(
                rtype, name, namespace, patch, subresource=route.subresource
            )
            return self._written(route, 200, patched)
        if method == "DELETE" and route.subresource is None:
            grace, uid = self._delete_options(request, content_type)
            deleted = self._store.delete(
                rtype, name, namespace, grace_period_seconds=grace, precondition_uid=uid
            )
            return Reply(200, convert_answer(route, deleted))
        raise _not_allowed()

    def _written(self, route: ResourceRoute, status: int, obj: dict[str, Any]) -> Reply:
        """The answer to a write that succeeded, with its warnings (writes of the main resource
        only: a status writer is a controller, not a person to warn)."""
        find = route.served.find_warnings
        texts: list[str] = []
        if find is not None and route.subresource is None:
            try:
                texts = find(obj)
            except Exception:
                # The object is stored already: a bug in the analysis must not turn that
                # success into an error the client would retry or report as a failure.
                _LOG.exception(
                    "cannot compute the warnings of a write",
                    extra=log.fields(kind=route.rtype.kind, name=objects.name(obj)),
                )
        return Reply(status, convert_answer(route, obj), build_warnings(texts))

    def _delete_options(self, request: Request, content_type: str) -> tuple[int | None, str | None]:
        """gracePeriodSeconds (query, else the DeleteOptions body) and a UID precondition."""
        grace = _int_param(request.query, "gracePeriodSeconds")
        uid = None
        if request.body.strip():
            options = decode_body(request.body, content_type)
            body_grace = options.get("gracePeriodSeconds")
            if body_grace is not None:
                if not isinstance(body_grace, int) or isinstance(body_grace, bool):
                    raise errors.BadRequestError("gracePeriodSeconds must be an integer")
                grace = body_grace if grace is None else grace
            preconditions = options.get("preconditions")
            if preconditions is not None:
                if not isinstance(preconditions, dict) or not isinstance(
                    preconditions.get("uid", ""), str
                ):
                    raise errors.BadRequestError('preconditions must be {"uid": "..."}')
                uid = preconditions.get("uid") or None
        return grace, uid

    def _selectors(
        self, route: ResourceRoute, query: dict[str, str]
    ) -> tuple[selectors.LabelSelector, selectors.FieldSelector]:
        labels = selectors.parse_label_selector(query.get("labelSelector", ""))
        fields = selectors.parse_field_selector(
            query.get("fieldSelector", ""), route.served.supported_field_labels
        )
        if route.name is not None:
            by_name = selectors.FieldRequirement("metadata.name", selectors.EQUALS, route.name)
            fields = selectors.FieldSelector((*fields.requirements, by_name))
        return labels, fields

    def _list(self, route: ResourceRoute, query: dict[str, str]) -> dict[str, Any]:
        labels, fields = self._selectors(route, query)
        listed = self._store.list(
            route.served.rtype, route.namespace, label_selector=labels, field_selector=fields
        )
        return {
            "kind": f"{route.rtype.kind}List",
            "apiVersion": route.rtype.api_version,
            "metadata": {"resourceVersion": listed.resource_version},
            "items": [convert_answer(route, o) for o in listed.items],
        }

    def _watch(self, route: ResourceRoute, query: dict[str, str]) -> WatchReply:
        labels, fields = self._selectors(route, query)
        version = query.get("resourceVersion", "")
        if version and not digits.is_digits(version):
            raise errors.BadRequestError(f"invalid resourceVersion {version!r}")
        timeout = _int_param(query, "timeoutSeconds")
        if timeout is not None and timeout < 0:
            raise errors.BadRequestError("timeoutSeconds must be >= 0")
        try:
            subscription = self._store.subscribe(
                route.served.rtype,
                route.namespace,
                label_selector=labels,
                field_selector=fields,
                since=int(version) if version else None,
            )
        except errors.GoneError as exc:
            return WatchReply(None, exc.status)
        return WatchReply(
            subscription,
            None,
            float(timeout) if timeout else None,
            route.rtype.api_version if route.is_converted else None,
        )

    # -- connections -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            if not self._closing.is_set():
                await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            # Only a last resort of close() or the loop shutting down cancels a connection, and
            # this is the top of the connection's task. It must end normally: Python 3.11's
            # streams callback calls task.exception() and logs an error for a cancelled task.
            _LOG.debug("connection cancelled")
        except (h11.ProtocolError, OSError, TimeoutError) as exc:
            # Not HTTP, a client that went away, or one too slow: that connection ends, the
            # server does not.
            _LOG.debug("connection ended", extra=log.fields(error=repr(exc)))
        except Exception:
            _LOG.exception("connection failed")
        finally:
            self._connections.pop(task, None)
            self._busy.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        while not self._closing.is_set():
            request = await self._read_request(conn, reader, writer)
            if request is None:
                return
            self._busy.add(task)
            try:
                outcome = self.handle(request)
                if isinstance(outcome, WatchReply):
                    keep_open = await self._stream(conn, reader, writer, outcome)
                else:
                    await self._send_reply(conn, writer, outcome)
                    keep_open = True
            finally:
                self._busy.discard(task)
            if not keep_open or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _receive(
        self, conn: h11.Connection, reader: asyncio.StreamReader, timeout: float
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout(timeout):
                data = await reader.read(_READ_SIZE)
            conn.receive_data(data)
            event = conn.next_event()
        return event

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        """The next complete request, or None when the connection is done (EOF, body too big)."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            timeout = _IDLE_TIMEOUT if head is None else _BODY_TIMEOUT
            event = await self._receive(conn, reader, timeout)
            if event is h11.NEED_DATA:
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > MAX_BODY_BYTES:
                    await self._refuse_too_large(conn, reader, writer, int(length))
                    return None
                if conn.they_are_waiting_for_100_continue:
                    # curl asks before sending bodies over 1 KiB, and would wait a second.
                    interim = h11.InformationalResponse(status_code=100, headers=[])
                    await self._write(writer, conn.send(interim) or b"")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    await self._refuse_too_large(conn, reader, writer, 0)
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("latin-1")
                split = urllib.parse.urlsplit(target)
                query = {
                    k: v[-1]
                    for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()
                }
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                }
                return Request(
                    head.method.decode("latin-1"), split.path, query, headers, bytes(body)
                )

    async def _refuse_too_large(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        unread: int,
    ) -> None:
        """Answer 413 and end the connection (the body is not parsed, so it cannot be reused).

        Up to `unread` bytes still on their way are read and dropped first: closing a socket
        with unread data resets it, and the client would see the reset instead of the 413.
        """
        error = errors.RequestEntityTooLargeError(
            f"the request body is larger than {MAX_BODY_BYTES} bytes"
        )
        await self._send_reply(conn, writer, Reply(error.code, error.status), close=True)
        unread = min(unread, _MAX_DISCARD_BYTES)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_BODY_TIMEOUT):
                while unread > 0:
                    data = await reader.read(min(unread, _READ_SIZE))
                    if not data:
                        break
                    unread -= len(data)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(_WRITE_TIMEOUT):
            await writer.drain()

    async def _send_reply(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        close: bool = False,
    ) -> None:
        payload = json.dumps(reply.body, separators=(",", ":")).encode()
        headers = [
            (b"content-type", JSON.encode()),
            (b"content-length", str(len(payload)).encode()),
            (b"cache-control", b"no-cache, private"),
        ]
        headers += [(b"warning", build_warning_header(text)) for text in reply.warnings]
        if close or self._closing.is_set():
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._write(writer, data)

    async def _stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        watch: WatchReply,
    ) -> bool:
        """Stream a watch; True when the connection may serve another request."""
        head = h11.Response(
            status_code=200,
            headers=[("content-type", JSON), ("cache-control", "no-cache, private")],
        )
        await self._write(writer, conn.send(head) or b"")
        if watch.subscription is None:
            assert watch.error is not None
            await self._send_event(conn, writer, objects.WatchEvent(objects.ERROR, watch.error))
            await self._write(writer, conn.send(h11.EndOfMessage()) or b"")
            return True
        subscription = watch.subscription
        # Any byte (or EOF) from the client during a watch means it is done with it.
        client_done = asyncio.ensure_future(reader.read(1))
        closing = asyncio.ensure_future(self._closing.wait())
        loop = asyncio.get_running_loop()
        deadline = None if watch.timeout is None else loop.time() + watch.timeout
        next_event: asyncio.Future[objects.WatchEvent] | None = None
        try:
            while True:
                next_event = asyncio.ensure_future(anext(subscription))
                remaining = None if deadline is None else max(deadline - loop.time(), 0)
                done, _ = await asyncio.wait(
                    {next_event, client_done, closing},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_event in done:
                    try:
                        event = next_event.result()
                    except StopAsyncIteration:
                        break  # the store closed
                    if watch.api_version is not None and event.type != objects.ERROR:
                        event = objects.WatchEvent(
                            event.type, {**event.object, "apiVersion": watch.api_version}
                        )
                    await self._send_event(conn, writer, event)
                    if event.type == objects.ERROR:
                        break
                    continue
                if client_done in done:
                    return False
                break  # timeoutSeconds reached, or the server is closing
            await self._write(writer, conn.send(h11.EndOfMessage()) or b"")
            return not self._closing.is_set()
        finally:
            subscription.close()
            for future in (next_event, client_done, closing):
                if future is not None and not future.done():
                    future.cancel()
            await asyncio.gather(
                *(f for f in (next_event, client_done, closing) if f is not None),
                return_exceptions=True,
            )

    async def _send_event(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, event: objects.WatchEvent
    ) -> None:
        line = json.dumps({"type": event.type, "object": event.object}, separators=(",", ":"))
        await self._write(writer, conn.send(h11.Data(data=line.encode() + b"\n")) or b"")


async def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise local_errors.ServerStartError(f"{path} exists and is not a socket")
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a process that died
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise local_errors.ServerStartError(f"{path} is in use by another server")
