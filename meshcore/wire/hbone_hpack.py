"""Header blocks for HBONE (RFC 7541 HPACK, RFC 9113 section 8): encoding ours, decoding and
checking the peer's.

Encoding is deliberately minimal and stateless: ``:status 200`` as its static-table index, other
pseudo-headers as literals with an indexed name, everything else as literals without indexing
and without Huffman coding. Any HPACK decoder reads that, our own decoder state never depends
on what we sent, and encoding a CONNECT costs a few byte joins instead of a Huffman pass.

Decoding uses `hpack.Decoder` (python-hyper), which keeps the peer's dynamic table: every block
the peer sends must go through it in order, including blocks for streams we refuse or reset.
The checks on a decoded block are RFC 9113 section 8.2 and 8.3: a malformed request or response
is a stream error, reported as a reason string for the codec to act on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import hpack
import hpack.exceptions
import hpack.table

from meshcore.wire import hbone_headers

RawHeaders = list[tuple[bytes, bytes]]

# Static table indexes (RFC 7541 appendix A).
_AUTHORITY_INDEX: Final = 1
_METHOD_INDEX: Final = 2
_STATUS_INDEX: Final = 8
_STATUS_200: Final = b"\x88"  # indexed field 8, ":status: 200"

# The rules our own fields follow (hbone_headers), as bytes; te is allowed as "trailers".
_CONNECTION_SPECIFIC: Final = frozenset(
    name.encode() for name in hbone_headers.CONNECTION_SPECIFIC if name != "te"
)
_REQUEST_PSEUDO: Final = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
_UPPER: Final = bytes(range(ord("A"), ord("Z") + 1))
_BAD_VALUE: Final = re.compile(hbone_headers.BAD_FIELD_VALUE_PATTERN.encode())

HPACK_ERRORS: Final = (hpack.exceptions.HPACKError,)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1) whose first byte carries `first`'s high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(raw: bytes) -> bytes:
    """A string literal without Huffman coding (RFC 7541 section 5.2)."""
    return _integer(len(raw), 7, 0) + raw


def _literal_indexed_name(index: int, value: str) -> bytes:
    """Literal header field without indexing, indexed name (RFC 7541 section 6.2.2)."""
    return _integer(index, 4, 0) + _string(value.encode())


def _literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name."""
    return b"\x00" + _string(name.encode()) + _string(value.encode())


def encode_request(authority: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """``CONNECT authority`` plus `headers` (already checked by the caller)."""
    parts = [
        _literal_indexed_name(_METHOD_INDEX, "CONNECT"),
        _literal_indexed_name(_AUTHORITY_INDEX, authority),
    ]
    parts += [_literal(name, value) for name, value in headers]
    return b"".join(parts)


def encode_response(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    first = _STATUS_200 if status == 200 else _literal_indexed_name(_STATUS_INDEX, str(status))
    if not headers:
        return first
    return first + b"".join(_literal(name, value) for name, value in headers)


class BlockDecoder:
    """The peer's HPACK state. `decode` raises one of `HPACK_ERRORS` on a bad block: that is a
    connection error (COMPRESSION_ERROR), since the shared table may now disagree.

    Blocks made only of static-table references and literals without indexing and without
    Huffman coding (what `encode_request` and `encode_response` produce) are read by
    `_decode_plain`; they cannot touch the dynamic table, so any other block is handed whole
    to `hpack`, which keeps the table.
    """

    __slots__ = ("_decoder", "_max_list")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._max_list = max_header_list_size

    def decode(self, block: bytes) -> RawHeaders:
        fields = _decode_plain(block, self._max_list)
        if fields is not None:
            return fields
        decoded = self._decoder.decode(block, raw=True)
        return [(bytes(name), bytes(value)) for name, value in decoded]


_STATIC: Final = hpack.table.HeaderTable.STATIC_TABLE


def _plain_integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at `pos`; (-1, pos) when it runs past the block or is absurdly long."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    end = len(block)
    while pos < end and shift <= 28:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _plain_string(block: bytes, pos: int) -> tuple[bytes | None, int]:
    """A string literal without Huffman coding at `pos`; None for anything else."""
    if pos >= len(block) or block[pos] & 0x80:
        return None, pos
    length, pos = _plain_integer(block, pos, 7)
    if length < 0 or pos + length > len(block):
        return None, pos
    return block[pos : pos + length], pos + length


def _decode_plain(block: bytes, max_list: int) -> RawHeaders | None:
    """The fields of a block that cannot change the dynamic table; None to let `hpack` read it
    (which also reports the errors)."""
    fields: RawHeaders = []
    pos = 0
    end = len(block)
    size = 0
    while pos < end:
        first = block[pos]
        if first & 0x80:  # indexed field
            index, pos = _plain_integer(block, pos, 7)
            if not 1 <= index <= len(_STATIC):
                return None
            name, value = _STATIC[index - 1]
        elif first & 0xE0:  # incremental indexing or a table size update
            return None
        else:  # literal without indexing (0x00) or never indexed (0x10)
            index, pos = _plain_integer(block, pos, 4)
            if index == 0:
                literal_name, pos = _plain_string(block, pos)
                if literal_name is None:
                    return None
                name = literal_name
            elif 1 <= index <= len(_STATIC):
                name = _STATIC[index - 1][0]
            else:
                return None
            literal_value, pos = _plain_string(block, pos)
            if literal_value is None:
                return None
            value = literal_value
        size += len(name) + len(value) + 32
        if size > max_list:
            return None
        fields.append((name, value))
    return fields


def _field_problem(name: bytes, value: bytes) -> str | None:
    if not name:
        return "an empty field name"
    if name.translate(None, _UPPER) != name:
        return f"field name {name!r} has uppercase characters"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific field {name.decode('latin-1')!r}"
    if name == b"te" and value != b"trailers":
        return "te other than 'trailers'"
    bad = _BAD_VALUE.search(value)
    if bad is None:
        return None
    if bad.group() in (b" ", b"\t"):
        return f"field {name!r} has surrounding whitespace in its value"
    return f"field {name!r} has NUL, CR or LF in its value"


def _split(fields: RawHeaders, allowed: frozenset[bytes]) -> tuple[dict[bytes, bytes], str | None]:
    """The pseudo-header fields of a block, or why the block is malformed."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                return pseudo, f"pseudo-header {name!r} after a regular field"
            if name not in allowed:
                return pseudo, f"pseudo-header {name!r} is not allowed here"
            if name in pseudo:
                return pseudo, f"pseudo-header {name!r} appears twice"
            pseudo[name] = value
            continue
        regular = True
        problem = _field_problem(name, value)
        if problem is not None:
            return pseudo, problem
    return pseudo, None


def request_problem(fields: RawHeaders) -> str | None:
    """Why a request block is malformed (RFC 9113 section 8.3.1 and 8.5), or None."""
    pseudo, problem = _split(fields, _REQUEST_PSEUDO)
    if problem is not None:
        return problem
    method = pseudo.get(b":method")
    if not method:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if not pseudo.get(b":authority"):
            return "CONNECT without :authority"
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
        return None
    if not pseudo.get(b":scheme") or not pseudo.get(b":path"):
        return "a request without :scheme or :path"
    return None


def response_status(fields: RawHeaders) -> tuple[int, str | None]:
    """The :status of a response block (RFC 9113 section 8.3.2), or (0, why it is malformed)."""
    pseudo, problem = _split(fields, frozenset((b":status",)))
    if problem is not None:
        return 0, problem
    text = pseudo.get(b":status", b"")
    if len(text) != 3 or not text.isdigit():
        return 0, f"bad :status {text!r}"
    return int(text), None


def trailers_problem(fields: RawHeaders) -> str | None:
    """Why a trailer block is malformed (no pseudo-headers allowed), or None."""
    return _split(fields, frozenset())[1]
