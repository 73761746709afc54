"""PROXY protocol version 2 (HAProxy ``proxy-protocol.txt`` section 2.2), sans-I/O.

The receiving ztunnel uses it to hand a tunnelled connection to an app that asked for it
(`Workload.application_tunnel`, spec section 2 item 6): before the first app byte it writes one
header naming the client (source), the HBONE target (destination) and, in TLV 0xD0, the client's
SPIFFE ID, which an L4 app could not learn any other way.

Layout (integers big-endian)::

    12  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1  version (high nibble, always 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1  family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) | transport (low: 0 UNSPEC, 1 STREAM,
        2 DGRAM)
     2  length of what follows: the address block, then TLVs
     -  addresses: INET src(4) dst(4) sport(2) dport(2) = 12 bytes, INET6 16+16+2+2 = 36,
        UNIX 108+108 = 216
     -  TLVs: type(1) length(2) value(length)

What a receiver accepts. The spec's MUSTs, and where it leaves a choice we fail closed, because
this header carries an identity the app may act on:

- only the signature, version 2, commands LOCAL and PROXY, and the seven family/transport bytes
  the spec lists (00 11 12 21 22 31 32);
- LOCAL (a health check by the proxy itself): the bytes after the first 16 are skipped unread,
  "including the family which is ignored"; the connection's own endpoints apply;
- PROXY over UNSPEC or UNIX: accepted without addresses (the spec's fallback to UNSPEC); after
  UNSPEC nothing can tell addresses from TLVs, so the body is skipped as for LOCAL;
- the length must cover the family's address block, and what follows must be whole TLVs;
- a CRC32C TLV must be 4 bytes and match (RFC 4960 appendix B, over the header with the checksum
  zeroed);
- TLV 0xD0 at most once, holding exactly a SPIFFE ID in UTF-8;
- a header longer than the parser's `max_size` is refused as soon as its length field is read;
  a connection that ends before the header does is refused too.

Errors follow h11: `ProxyProtocolRemoteError` and its subclasses for bytes the peer sent (drop
the connection), `ProxyProtocolLocalError` for our own misuse of this module.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Sequence
from typing import NoReturn, TypeAlias

from meshcore import errors
from meshcore.identity import spiffe

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint: TypeAlias = tuple[IPAddress, int]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_SIZE = 16  # signature, version/command, family/transport, length
MAX_LENGTH = 0xFFFF  # the length field is 16 bits

# Registered TLV types (spec 2.2.1 - 2.2.7).
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20
TLV_NETNS = 0x30
# Istio's: the source workload's SPIFFE ID (ztunnel src/proxy.rs PROXY_PROTOCOL_AUTHORITY_TLV).
TLV_SPIFFE_ID = 0xD0

# Room for the largest address block (UNIX, 216 bytes) and a few kilobytes of TLVs; ztunnel's
# headers are about 100 bytes.
DEFAULT_MAX_SIZE = 4096

_VERSION = 2
_ADDRESS_SIZES = {1: 4, 2: 16}  # family -> bytes per address
_BLOCK_SIZES = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_TLV_HEADER_SIZE = 3
_VISIBLE_ASCII = re.compile(r"[!-~]+")


class ProxyProtocolError(errors.MeshError):
    """Root of every PROXY protocol error."""


class ProxyProtocolRemoteError(ProxyProtocolError):
    """The peer sent something that is not a valid PROXY v2 header; drop the connection.

    `reason` says what was wrong; `offset` is where in the header, when known."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        where = f" (at byte {offset})" if offset is not None else ""
        super().__init__(f"invalid PROXY protocol v2 header: {reason}{where}")
        self.reason = reason
        self.offset = offset


class HeaderTooLargeError(ProxyProtocolRemoteError):
    """The header announces more bytes than the parser accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header of {size} bytes exceeds the limit of {limit}", 14)
        self.size = size
        self.limit = limit


class TruncatedHeaderError(ProxyProtocolRemoteError):
    """The connection ended before the whole header arrived."""

    def __init__(self, received: int, needed: int | None) -> None:
        want = f"of {needed}" if needed is not None else "of at least 16"
        super().__init__(f"connection ended after {received} bytes {want}")
        self.received = received
        self.needed = needed


class ProxyProtocolLocalError(ProxyProtocolError, ValueError):
    """We asked for a header that cannot be encoded, or misused the parser."""


class Command(enum.IntEnum):
    LOCAL = 0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 1  # relayed on behalf of a client: the addresses below are the real ones


class Family(enum.IntEnum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(enum.IntEnum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Tlv:
    type: int
    value: bytes

    @classmethod
    def for_identity(cls, identity: spiffe.SpiffeId) -> Tlv:
        """Istio's TLV naming the source workload."""
        return cls(TLV_SPIFFE_ID, identity.uri.encode())


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source`/`destination` are None when the header carries no IP endpoints
    (LOCAL, UNSPEC, UNIX): the connection's own endpoints apply then."""

    command: Command
    family: Family
    transport: Transport
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: tuple[Tlv, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.command is Command.LOCAL

    def find_tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of `tlv_type`, or None."""
        for tlv in self.tlvs:
            if tlv.type == tlv_type:
                return tlv.value
        return None

    @property
    def source_identity(self) -> spiffe.SpiffeId | None:
        """The client's SPIFFE ID from TLV 0xD0 (checked when parsed), or None without one."""
        raw = self.find_tlv(TLV_SPIFFE_ID)
        return None if raw is None else _parse_identity(raw, None)


# --- building ---------------------------------------------------------------------------------


def build_header(
    source: Endpoint,
    destination: Endpoint,
    tlvs: Sequence[Tlv] = (),
    *,
    transport: Transport = Transport.STREAM,
    with_crc32c: bool = False,
) -> bytes:
    """A PROXY command header for a connection from `source` to `destination`.

    Both addresses must be of one family. With `with_crc32c` a CRC32C TLV is appended, filled
    in over the finished header as spec 2.2.3 describes."""
    if transport is Transport.UNSPEC:
        raise ProxyProtocolLocalError("a header with addresses needs a STREAM or DGRAM transport")
    (src_ip, src_port), (dst_ip, dst_port) = source, destination
    for what, ip in (("source", src_ip), ("destination", dst_ip)):
        if not isinstance(ip, IPAddress):
            raise ProxyProtocolLocalError(f"{what} address {ip!r} is not an IP address")
    for what, port in (("source", src_port), ("destination", dst_port)):
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ProxyProtocolLocalError(f"{what} port {port!r} is outside 0..65535")
    if src_ip.version != dst_ip.version:
        raise ProxyProtocolLocalError(
            f"source {src_ip} and destination {dst_ip} are of different address families"
        )
    family = Family.INET if src_ip.version == 4 else Family.INET6
    block = (
        src_ip.packed + dst_ip.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    )
    body = block + _encode_tlvs(tlvs)
    if with_crc32c:
        body += bytes([TLV_CRC32C, 0, 4]) + bytes(4)
    header = bytearray(_prefix(Command.PROXY, family << 4 | transport, len(body)) + body)
    if with_crc32c:
        header[-4:] = crc32c(bytes(header)).to_bytes(4, "big")
    return bytes(header)


def build_local_header() -> bytes:
    """A LOCAL header: the proxy's own connection, no addresses (spec: length zero)."""
    return _prefix(Command.LOCAL, 0x00, 0)


def _prefix(command: Command, family_byte: int, length: int) -> bytes:
    if length > MAX_LENGTH:
        raise ProxyProtocolLocalError(
            f"header body of {length} bytes does not fit the 16-bit length field"
        )
    return SIGNATURE + bytes([_VERSION << 4 | command, family_byte]) + length.to_bytes(2, "big")


def _encode_tlvs(tlvs: Sequence[Tlv]) -> bytes:
    out = bytearray()
    for i, tlv in enumerate(tlvs):
        if not isinstance(tlv.type, int) or not 0 <= tlv.type <= 0xFF:
            raise ProxyProtocolLocalError(f"tlvs[{i}]: type {tlv.type!r} is outside 0..255")
        if not isinstance(tlv.value, bytes):
            raise ProxyProtocolLocalError(f"tlvs[{i}]: value must be bytes")
        if len(tlv.value) > MAX_LENGTH:
            raise ProxyProtocolLocalError(f"tlvs[{i}]: value of {len(tlv.value)} bytes is too long")
        if tlv.type == TLV_CRC32C:
            raise ProxyProtocolLocalError(f"tlvs[{i}]: use with_crc32c=True for a checksum")
        out += bytes([tlv.type]) + len(tlv.value).to_bytes(2, "big") + tlv.value
    return bytes(out)


# --- parsing ----------------------------------------------------------------------------------


class ProxyHeaderParser:
    """Reads one header from the start of a connection, fed bytes as they arrive.

    `receive_data` returns None until the header is complete, then ``(header, leftover)``:
    leftover is whatever followed the header in the same reads, the app's first bytes. A
    malformed header raises as early as the bytes allow (a non-PROXY first byte fails at once).
    After a header or an error the parser is finished; feeding it more is a local error."""

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if not PREFIX_SIZE <= max_size <= PREFIX_SIZE + MAX_LENGTH:
            raise ProxyProtocolLocalError(
                f"max_size {max_size} is outside {PREFIX_SIZE}..{PREFIX_SIZE + MAX_LENGTH}"
            )
        self._max_size = max_size
        self._buffer = bytearray()
        self._is_finished = False

    @property
    def is_finished(self) -> bool:
        return self._is_finished

    def receive_data(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        if self._is_finished:
            raise ProxyProtocolLocalError("the parser already returned a header or failed")
        self._buffer += data
        try:
            size = self._check_prefix()
            if size is None or len(self._buffer) < size:
                return None
            header = _parse_complete(bytes(self._buffer[:size]))
        except ProxyProtocolRemoteError:
            self._is_finished = True
            self._buffer.clear()
            raise
        leftover = bytes(self._buffer[size:])
        self._is_finished = True
        self._buffer.clear()
        return header, leftover

    def receive_eof(self) -> NoReturn:
        """The peer closed the connection: before a complete header that is always an error."""
        if self._is_finished:
            raise ProxyProtocolLocalError("the parser already returned a header or failed")
        self._is_finished = True
        received = len(self._buffer)
        needed = self._declared_size()
        self._buffer.clear()
        raise TruncatedHeaderError(received, needed)

    def _declared_size(self) -> int | None:
        if len(self._buffer) < PREFIX_SIZE:
            return None
        return PREFIX_SIZE + int.from_bytes(self._buffer[14:16], "big")

    def _check_prefix(self) -> int | None:
        """Validate what has arrived of the first 16 bytes; the whole header's size once known."""
        buf = self._buffer
        head = bytes(buf[: len(SIGNATURE)])
        if head != SIGNATURE[: len(head)]:
            offset = next(i for i, b in enumerate(head) if b != SIGNATURE[i])
            raise ProxyProtocolRemoteError("no PROXY protocol v2 signature", offset)
        if len(buf) > 12:
            _check_version_command(buf[12])
        if len(buf) > 13 and buf[12] & 0x0F == Command.PROXY:
            _check_family(buf[13])
        size = self._declared_size()
        if size is None:
            return None
        if size > self._max_size:
            raise HeaderTooLargeError(size, self._max_size)
        if buf[12] & 0x0F == Command.PROXY and size - PREFIX_SIZE < _BLOCK_SIZES[buf[13]]:
            raise ProxyProtocolRemoteError(
                f"length {size - PREFIX_SIZE} is shorter than the {_BLOCK_SIZES[buf[13]]}-byte"
                f" address block of family/transport 0x{buf[13]:02x}",
                14,
            )
        return size


def parse_header(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> tuple[ProxyHeader, bytes]:
    """Parse a header from `data`, which must hold all of it; ``(header, leftover)``."""
    parser = ProxyHeaderParser(max_size=max_size)
    result = parser.receive_data(data)
    if result is None:
        parser.receive_eof()
    return result


def _check_version_command(byte: int) -> None:
    if byte >> 4 != _VERSION:
        raise ProxyProtocolRemoteError(f"version {byte >> 4} is not 2", 12)
    if byte & 0x0F not in (Command.LOCAL, Command.PROXY):
        raise ProxyProtocolRemoteError(f"unknown command {byte & 0x0F}", 12)


def _check_family(byte: int) -> None:
    if byte not in _BLOCK_SIZES:
        raise ProxyProtocolRemoteError(f"unknown family/transport byte 0x{byte:02x}", 13)


def _parse_complete(data: bytes) -> ProxyHeader:
    """A header whose prefix `_check_prefix` accepted and whose bytes have all arrived."""
    if data[12] & 0x0F == Command.LOCAL:
        # The spec: accept, use the real endpoints, ignore the protocol block and the family.
        return ProxyHeader(Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None)
    family, transport = Family(data[13] >> 4), Transport(data[13] & 0x0F)
    if family is Family.UNSPEC:
        # Addresses of an unknown kind may fill the body, so no TLV boundary can be trusted.
        return ProxyHeader(Command.PROXY, family, transport, None, None)
    block_end = PREFIX_SIZE + _BLOCK_SIZES[data[13]]
    source = destination = None
    if family in (Family.INET, Family.INET6):
        width = _ADDRESS_SIZES[family]
        ips = data[PREFIX_SIZE : PREFIX_SIZE + 2 * width]
        ports = data[PREFIX_SIZE + 2 * width : block_end]
        src_ip, dst_ip = _ip(ips[:width]), _ip(ips[width:])
        source = (src_ip, int.from_bytes(ports[:2], "big"))
        destination = (dst_ip, int.from_bytes(ports[2:], "big"))
    tlvs = _parse_tlvs(data, block_end)
    return ProxyHeader(Command.PROXY, family, transport, source, destination, tlvs)


def _ip(raw: bytes) -> IPAddress:
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


def _parse_tlvs(data: bytes, offset: int) -> tuple[Tlv, ...]:
    tlvs: list[Tlv] = []
    crc_at: int | None = None
    has_identity = False
    while offset < len(data):
        if len(data) - offset < _TLV_HEADER_SIZE:
            raise ProxyProtocolRemoteError(
                f"{len(data) - offset} trailing bytes are too short for a TLV", offset
            )
        tlv_type = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + _TLV_HEADER_SIZE
        if start + length > len(data):
            raise ProxyProtocolRemoteError(
                f"TLV 0x{tlv_type:02x} of {length} bytes runs past the header's end", offset
            )
        value = data[start : start + length]
        if tlv_type == TLV_CRC32C:
            if length != 4 or crc_at is not None:
                raise ProxyProtocolRemoteError(
                    "a CRC32C TLV must appear once, with a 4-byte value", offset
                )
            crc_at = start
        elif tlv_type == TLV_SPIFFE_ID:
            if has_identity:
                raise ProxyProtocolRemoteError("more than one SPIFFE ID TLV (0xD0)", offset)
            has_identity = True
            _parse_identity(value, offset)
        tlvs.append(Tlv(tlv_type, value))
        offset = start + length
    if crc_at is not None:
        zeroed = data[:crc_at] + bytes(4) + data[crc_at + 4 :]
        expected = int.from_bytes(data[crc_at : crc_at + 4], "big")
        if crc32c(zeroed) != expected:
            raise ProxyProtocolRemoteError("CRC32C checksum does not match", crc_at)
    return tuple(tlvs)


def _parse_identity(raw: bytes, offset: int | None) -> spiffe.SpiffeId:
    try:
        text = raw.decode("utf-8")
        identity = spiffe.SpiffeId.parse(text)
    except (UnicodeDecodeError, spiffe.InvalidSpiffeIdError) as exc:
        raise ProxyProtocolRemoteError(f"TLV 0xD0 is not a SPIFFE ID: {exc}", offset) from None
    # A value the app may log or compare must be exactly the canonical text (SpiffeId accepts
    # no stray characters itself; this keeps the check local and explicit).
    if identity.uri != text or not _VISIBLE_ASCII.fullmatch(text):
        raise ProxyProtocolRemoteError(f"TLV 0xD0 {text!r} is not a canonical SPIFFE ID", offset)
    return identity


# --- CRC32C (Castagnoli, RFC 4960 appendix B) ---------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
