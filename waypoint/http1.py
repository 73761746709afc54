"""HTTP/1.1 message heads as the waypoint handles them, and their serialization.

Names are kept lower-case (HTTP field names are case-insensitive and HTTP/2 requires lower
case). Hop-by-hop fields (RFC 9110 section 7.6.1) never cross the proxy: each side's framing
(Content-Length or chunked) and persistence are the proxy's own business on that side.
"""

from __future__ import annotations

import dataclasses
import http

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


@dataclasses.dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # origin-form path with query, as received
    version: str  # "1.1" or "1.0"
    headers: list[tuple[str, str]]
    keep_alive: bool
    content_length: int | None  # None: chunked, or no body at all (see `has_body`)
    is_chunked: bool

    @property
    def has_body(self) -> bool:
        return self.is_chunked or bool(self.content_length)

    @property
    def authority(self) -> str:
        """The Host field without its port."""
        for name, value in self.headers:
            if name == "host":
                host = value.strip()
                if host.startswith("["):
                    return host.partition("]")[0] + "]"
                return host.rpartition(":")[0] if host.count(":") == 1 else host
        return ""

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


@dataclasses.dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    is_chunked: bool


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The fields forwarded as they are: not the hop-by-hop ones, nor those the Connection
    field names, nor Content-Length (each side's framing is written by the proxy)."""
    named: set[str] = {"content-length"}
    for name, value in headers:
        if name == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def _fields(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers)


def encode_request(
    method: str, target: str, headers: list[tuple[str, str]], framing: list[tuple[str, str]]
) -> bytes:
    """An HTTP/1.1 request head; `framing` holds content-length or transfer-encoding."""
    line = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    return line + _fields(headers) + _fields(framing) + CRLF


def encode_response(
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    framing: list[tuple[str, str]],
    *,
    close: bool = False,
) -> bytes:
    line = f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n".encode("latin-1")
    tail = b"connection: close\r\n" if close else b""
    return line + _fields(headers) + _fields(framing) + tail + CRLF


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def local_response(status: int, body: str, *, close: bool = False) -> bytes:
    """A response the waypoint makes itself (no route, fault abort, timeout, denial ...)."""
    data = body.encode()
    head = encode_response(
        status,
        "",
        [("content-type", "text/plain")],
        [("content-length", str(len(data)))],
        close=close,
    )
    return head + data
