"""Pure helpers for the HBONE CONNECT request headers (spec section 2).

A CONNECT names its target in ``:authority`` as ``ip:port`` (``[v6]:port`` for IPv6) and carries
three informational headers: ``forwarded`` (the original client address and, when a Service was
targeted, its hostname), ``baggage`` (W3C baggage describing the source workload) and
``traceparent`` (W3C trace context, random per connection).

Builders are strict: they raise on input that would put a malformed header on the wire. Parsers
of what a peer sent are tolerant where the value is only informational (``forwarded``,
``baggage``): garbage yields ``None`` or an empty result instead of an error, because a bad
telemetry header must never fail a tunnel. ``parse_authority`` is strict: the authority decides
where bytes go.

This module also holds the HBONE error hierarchy, so that ``meshcore.wire.hbone`` can import it
without a cycle; ``meshcore.wire.hbone`` re-exports every public name.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from meshcore import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Headers: TypeAlias = tuple[tuple[str, str], ...]

# Patterns are used with fullmatch() (never match() with "$", which accepts a trailing newline).
# RFC 9110 token characters; header names, Forwarded parameter names and baggage keys are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header fields we put on the wire: lowercase tokens; values without CR, LF, NUL or
# surrounding whitespace (RFC 9113 section 8.2.1); no connection-specific fields.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9113 section 8.2.1, for our fields here and, as bytes, for the peer's in hbone_hpack.
BAD_FIELD_VALUE_PATTERN = r"[\r\n\x00]|\A[ \t]|[ \t]\Z"
_BAD_FIELD_VALUE = re.compile(BAD_FIELD_VALUE_PATTERN)
CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)
PROTOCOL_ERROR = 0x1  # HTTP/2 error code (RFC 9113 section 7)
_PORT = re.compile(r"[0-9]{1,5}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# W3C baggage-octet: printable US-ASCII except space, DQUOTE, comma, semicolon and backslash.
# '%' is legal on the wire but we escape it so that parsing our own output round-trips.
_BAGGAGE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')


class HboneError(errors.MeshError):
    """Root of every error raised by the HBONE codec and its header helpers."""


class InvalidHeaderError(HboneError, ValueError):
    """A value cannot be put into (or was required from) an HBONE header; `value` is the input."""

    def __init__(self, header: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {header} {value!r}: {reason}")
        self.header = header
        self.value = value
        self.reason = reason


class InvalidAuthorityError(InvalidHeaderError):
    """A CONNECT ``:authority`` is not ``ip:port`` with a port in 1..65535."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(":authority", value, reason)


class InvalidSettingsError(HboneError, ValueError):
    """An `HboneSettings` field is outside what HTTP/2 allows; names the field and value."""


class LocalProtocolError(HboneError):
    """We (the caller) asked for something HBONE or HTTP/2 does not allow right now."""


class UnknownStreamError(LocalProtocolError):
    """The stream id was never opened on this connection."""

    def __init__(self, stream_id: int) -> None:
        super().__init__(f"stream {stream_id} does not exist on this connection")
        self.stream_id = stream_id


class StreamStateError(LocalProtocolError):
    """The stream does not allow this operation now (gone, ended, not yet established...)."""

    def __init__(self, stream_id: int, reason: str) -> None:
        super().__init__(f"stream {stream_id}: {reason}")
        self.stream_id = stream_id
        self.reason = reason


class TooManyStreamsError(LocalProtocolError):
    """`open_tunnel()` while `can_open_tunnel()` is false (stream limit reached or GOAWAY)."""


class RemoteProtocolError(HboneError):
    """The peer violated HTTP/2 or HBONE; a GOAWAY carrying `error_code` is queued to send."""

    def __init__(self, message: str, error_code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


def parse_authority(authority: str) -> tuple[IPAddress, int]:
    """Split ``1.2.3.4:80`` or ``[::1]:80`` into (address, port).

    Hostnames, missing or out-of-range ports, unbracketed IPv6, bracketed IPv4, zone ids and
    surrounding whitespace are all rejected: the result decides which address receives the bytes.
    """
    host, sep, port_text = authority.rpartition(":")
    if not sep:
        raise InvalidAuthorityError(authority, "missing :port")
    if not _PORT.fullmatch(port_text):
        raise InvalidAuthorityError(authority, f"port {port_text!r} is not a decimal number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidAuthorityError(authority, f"port {port} is outside 1..65535")
    ip: IPAddress
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidAuthorityError(
                authority, f"{host!r} is not a bracketed IPv6 address"
            ) from None
        if ip.scope_id is not None:
            raise InvalidAuthorityError(authority, "IPv6 zone ids are not allowed")
        return ip, port
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        if ":" in host:
            reason = "an IPv6 address must be written in brackets, as [addr]:port"
        else:
            reason = f"{host!r} is not an IP address"
        raise InvalidAuthorityError(authority, reason) from None
    return ip, port


def format_authority(ip: IPAddress | str, port: int) -> str:
    """The ``:authority`` for an address: ``1.2.3.4:80`` or ``[::1]:80``."""
    try:
        host = _authority_host(ip)
    except ValueError:
        raise InvalidAuthorityError(ip, "not an IP address") from None
    if not 1 <= port <= 65535:
        raise InvalidAuthorityError(f"{ip}:{port}", f"port {port} is outside 1..65535")
    if host is None:
        raise InvalidAuthorityError(f"{ip}:{port}", "IPv6 zone ids are not allowed")
    return f"{host}:{port}"


# Memoised: every connection formats one of a node's few addresses (errors are not cached).
@functools.lru_cache(maxsize=4096)
def _authority_host(ip: IPAddress | str) -> str | None:
    """``1.2.3.4`` or ``[::1]``; None for an IPv6 address with a zone id; ValueError if not
    an address."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        return None if address.scope_id is not None else f"[{address}]"
    return str(address)


def forwarded_header(src_ip: IPAddress | str, src_port: int, host: str | None = None) -> str:
    """The RFC 7239 ``forwarded`` value ztunnel sends: ``for="ip:port"`` [``;host=name``]."""
    try:
        node = format_authority(src_ip, src_port)
    except InvalidAuthorityError as exc:
        raise InvalidHeaderError("forwarded for=", exc.value, exc.reason) from None
    if host is None:
        return f'for="{node}"'
    return f'for="{node}"{_forwarded_host(host)}'


@functools.lru_cache(maxsize=4096)
def _forwarded_host(host: str) -> str:
    if not host or any(ord(c) < 0x20 or ord(c) == 0x7F for c in host):
        raise InvalidHeaderError("forwarded host=", host, "empty or has control characters")
    return f";host={host if _TOKEN.fullmatch(host) else _quote(host)}"


def parse_forwarded(value: str) -> tuple[str | None, str | None]:
    """The ``for`` and ``host`` parameters of the first element of a ``forwarded`` value.

    Never raises: a malformed parameter is skipped, so ``garbage`` gives ``(None, None)``.
    The ``for`` value is returned as written (``1.2.3.4:5``, ``[::1]:5`` or an obfuscated id);
    use :func:`parse_authority` on it when an address is needed.
    """
    params = _split_params(value)
    return params.get("for"), params.get("host")


def baggage_header(fields: Mapping[str, str]) -> str:
    """A W3C ``baggage`` value: ``k=v`` members joined by commas, values percent-encoded."""
    members = []
    for key, val in fields.items():
        if not _TOKEN.fullmatch(key):
            raise InvalidHeaderError("baggage key", key, "must be an RFC 9110 token")
        members.append(f"{key}={urllib.parse.quote(val, safe=_BAGGAGE_SAFE)}")
    return ",".join(members)


def parse_baggage(value: str) -> dict[str, str]:
    """The members of a ``baggage`` value; properties after ``;`` are dropped.

    Never raises: members without ``=`` or with a non-token key are skipped; the last duplicate
    key wins (as in ztunnel); values are percent-decoded.
    """
    fields: dict[str, str] = {}
    for member in value.split(","):
        key, sep, val = member.partition(";")[0].partition("=")
        key = key.strip(" \t")
        if not sep or not _TOKEN.fullmatch(key):
            continue
        fields[key] = urllib.parse.unquote(val.strip(" \t"))
    return fields


class _RandomPool:
    """os.urandom drawn 4 KiB at a time: one getrandom(2) per 170 traceparents instead of one
    per connection. Emptied in a forked child, which must not reuse its parent's bytes."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self.clear)

    def clear(self) -> None:
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf, pos = os.urandom(max(self._SIZE, n)), 0
        self._pos = pos + n
        return self._buf[pos : pos + n]


_random_pool = _RandomPool()


def new_traceparent(random_bytes: Callable[[int], bytes] = _random_pool.take) -> str:
    """A fresh W3C ``traceparent`` (``00-<trace id>-<parent id>-00``) from 24 random bytes."""
    raw = random_bytes(24)
    if len(raw) != 24:
        raise InvalidHeaderError("traceparent", raw, "random_bytes(24) returned the wrong length")
    # An all-zero id is invalid; rather than draw again (a fake source could loop forever),
    # set the lowest bit, which costs one bit of randomness in a 2**-128 case.
    trace = raw[:16] if any(raw[:16]) else raw[:15] + b"\x01"
    parent = raw[16:] if any(raw[16:]) else raw[16:23] + b"\x01"
    return f"00-{trace.hex()}-{parent.hex()}-00"


def is_valid_traceparent(value: str) -> bool:
    """True for a well-formed 55-character traceparent with non-zero ids and version != ff."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None or len(value) != 55:
        return False
    version, trace, parent, _flags = match.groups()
    return version != "ff" and trace != "0" * 32 and parent != "0" * 16


def find_field_problem(name: str, value: str) -> str | None:
    """Why (name, value) cannot be sent as an HTTP/2 header field we add, or None if it can."""
    problem = _name_problem(name)
    if problem is not None:
        return problem
    if _BAD_FIELD_VALUE.search(value):
        return "the value has CR, LF, NUL or surrounding whitespace"
    return None


@functools.lru_cache(maxsize=256)  # a handful of names, checked on every tunnel
def _name_problem(name: str) -> str | None:
    if not _FIELD_NAME.fullmatch(name):
        return "the name must be a lowercase token (pseudo-headers are set by the codec)"
    if name in CONNECTION_SPECIFIC:
        return "connection-specific fields are forbidden in HTTP/2"
    return None


def split_header_block(raw: Sequence[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    """Split a received header block into its pseudo-headers and the regular fields, as str.

    Values are opaque octets in HTTP/2 and the ones HBONE uses are ASCII; decoding must never
    fail on hostile input, so invalid UTF-8 becomes U+FFFD.
    """
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in raw:
        if name.startswith(b":"):
            pseudo[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        else:
            regular.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return pseudo, tuple(regular)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _split_params(value: str) -> dict[str, str]:
    """Parse ``k=v;k="quoted";...`` up to the first top-level comma; skip malformed pairs.

    A small scanner rather than ``split``: quoted strings may contain ``;`` and ``,``.
    Keys are case-insensitive (RFC 7239) and are returned lowercased; the first occurrence wins.
    """
    params: dict[str, str] = {}
    i, n = 0, len(value)
    while i < n:
        # One pair: key up to '=', ';' or ','.
        start = i
        while i < n and value[i] not in "=;,":
            i += 1
        key = value[start:i].strip(" \t").lower()
        val: str | None = None
        if i < n and value[i] == "=":
            i += 1
            while i < n and value[i] in " \t":
                i += 1
            if i < n and value[i] == '"':
                val, i = _scan_quoted(value, i)
            else:
                start = i
                while i < n and value[i] not in ";,":
                    i += 1
                val = value[start:i].strip(" \t")
                if not _TOKEN.fullmatch(val):
                    val = None
            # Anything between the value and the next separator makes the pair malformed.
            while i < n and value[i] not in ";,":
                if value[i] not in " \t":
                    val = None
                i += 1
        if val is not None and _TOKEN.fullmatch(key) and key not in params:
            params[key] = val
        if i < n and value[i] == ",":
            break
        i += 1
    return params


def _scan_quoted(value: str, i: int) -> tuple[str | None, int]:
    """Scan a quoted-string starting at ``value[i] == '"'``; None if it is unterminated."""
    out: list[str] = []
    i += 1
    n = len(value)
    while i < n:
        c = value[i]
        if c == "\\" and i + 1 < n:
            out.append(value[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return None, n
