"""PROXY protocol v2 codec: exact bytes from the spec's layout, and every malformed header refused.

Byte strings are written out from HAProxy's proxy-protocol.txt section 2.2 (the signature, the
``struct proxy_hdr_v2`` prefix, the ``union proxy_addr`` blocks, ``struct pp2_tlv``) rather than
produced by the code under test.
"""

from __future__ import annotations

import ipaddress

import pytest

from meshcore.identity import spiffe
from meshcore.wire import proxyproto as pp

# The spec: "\x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A".
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
# The spec's test for "this is version 2": the signature followed by \x20 (or \x21).
V2_LOCAL = SIG + b"\x20"
V2_PROXY = SIG + b"\x21"
CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
CLIENT_URI = b"spiffe://cluster.local/ns/shop/sa/client"

V4_SRC = (ipaddress.IPv4Address("192.168.0.1"), 56324)
V4_DST = (ipaddress.IPv4Address("192.168.0.11"), 443)
# The v1 example's endpoints ("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443") in v2 form:
# fam 0x11, len 12, src addr, dst addr, src port, dst port.
V4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + bytes([0xDC, 0x04, 0x01, 0xBB])
V4_HEADER = V2_PROXY + b"\x11\x00\x0c" + V4_BLOCK

V6_SRC = (ipaddress.IPv6Address("2001:db8::1"), 1)
V6_DST = (ipaddress.IPv6Address("2001:db8::2"), 65535)
V6_BLOCK = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + b"\x00\x01\xff\xff"
)


def _tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def _proxy(fam: int, body: bytes) -> bytes:
    return V2_PROXY + bytes([fam]) + len(body).to_bytes(2, "big") + body


def test_signature_is_the_spec_block() -> None:
    assert pp.SIGNATURE == SIG
    assert len(pp.SIGNATURE) == 12
    assert pp.SIGNATURE[4] == 0  # "a null byte at the 5th position"


def test_ipv4_tcp_header_bytes() -> None:
    assert pp.build_header(V4_SRC, V4_DST) == V4_HEADER
    assert len(V4_HEADER) == 16 + 12  # "Address length is 2*4 + 2*2 = 12 bytes"


def test_ipv6_tcp_header_bytes() -> None:
    expected = V2_PROXY + b"\x21\x00\x24" + V6_BLOCK
    assert pp.build_header(V6_SRC, V6_DST) == expected
    assert len(expected) == 16 + 36  # "Address length is 2*16 + 2*2 = 36 bytes"


def test_udp_transport_byte() -> None:
    header = pp.build_header(V4_SRC, V4_DST, transport=pp.Transport.DGRAM)
    assert header == V2_PROXY + b"\x12\x00\x0c" + V4_BLOCK


def test_tlvs_follow_the_address_block() -> None:
    header = pp.build_header(
        V4_SRC, V4_DST, [pp.Tlv(pp.TLV_AUTHORITY, b"example.com"), pp.Tlv.for_identity(CLIENT)]
    )
    body = V4_BLOCK + _tlv(0x02, b"example.com") + _tlv(0xD0, CLIENT_URI)
    assert header == _proxy(0x11, body)
    assert header[14:16] == (12 + 3 + 11 + 3 + len(CLIENT_URI)).to_bytes(2, "big")


def test_local_header_bytes() -> None:
    # "When a sender presents a LOCAL connection ... it sets this field to zero."
    assert pp.build_local_header() == V2_LOCAL + b"\x00\x00\x00"


def test_crc32c_check_value() -> None:
    # CRC-32C check value (RFC 3720 B.4 / the usual "123456789" vector).
    assert pp.crc32c(b"123456789") == 0xE3069283
    assert pp.crc32c(b"") == 0


def test_crc32c_tlv_is_computed_over_the_zeroed_header() -> None:
    header = pp.build_header(V4_SRC, V4_DST, with_crc32c=True)
    zeroed = _proxy(0x11, V4_BLOCK + _tlv(0x03, bytes(4)))
    assert header[:-4] == zeroed[:-4]
    assert header[-4:] == pp.crc32c(zeroed).to_bytes(4, "big")


# --- parsing ------------------------------------------------------------------------------------


def test_parses_ipv4_header_and_keeps_what_follows() -> None:
    header, rest = pp.parse_header(V4_HEADER + b"GET / HTTP/1.1\r\n")
    assert header == pp.ProxyHeader(
        pp.Command.PROXY, pp.Family.INET, pp.Transport.STREAM, V4_SRC, V4_DST
    )
    assert rest == b"GET / HTTP/1.1\r\n"
    assert header.source_identity is None
    assert not header.is_local


def test_parses_ipv6_header_with_identity_tlv() -> None:
    data = _proxy(0x21, V6_BLOCK + _tlv(0x04, b"") + _tlv(0xD0, CLIENT_URI))
    header, rest = pp.parse_header(data)
    assert (header.source, header.destination) == (V6_SRC, V6_DST)
    assert header.tlvs == (pp.Tlv(pp.TLV_NOOP, b""), pp.Tlv(pp.TLV_SPIFFE_ID, CLIENT_URI))
    assert header.source_identity == CLIENT
    assert header.find_tlv(0xD0) == CLIENT_URI
    assert header.find_tlv(0x01) is None
    assert rest == b""


def test_unknown_and_custom_tlvs_are_kept() -> None:
    data = _proxy(0x11, V4_BLOCK + _tlv(0xE0, b"app") + _tlv(0xF8, b"\x00" * 5))
    header, _ = pp.parse_header(data)
    assert header.tlvs == (pp.Tlv(0xE0, b"app"), pp.Tlv(0xF8, b"\x00" * 5))


def test_local_ignores_family_and_body() -> None:
    # "The receiver must accept this connection as valid and must use the real connection
    # endpoints and discard the protocol block including the family which is ignored."
    data = V2_LOCAL + b"\xff\x00\x05" + b"junk!" + b"app"
    header, rest = pp.parse_header(data)
    assert header.is_local
    assert (header.source, header.destination, header.tlvs) == (None, None, ())
    assert rest == b"app"


@pytest.mark.parametrize(
    ("fam", "body", "family", "tlvs"),
    [
        pytest.param(0x00, b"whatever", pp.Family.UNSPEC, (), id="unspec-body-skipped"),
        pytest.param(
            0x31,
            bytes(216) + _tlv(0xD0, CLIENT_URI),
            pp.Family.UNIX,
            (pp.Tlv(0xD0, CLIENT_URI),),
            id="unix-stream",
        ),
        pytest.param(0x32, bytes(216), pp.Family.UNIX, (), id="unix-dgram"),
    ],
)
def test_families_without_ip_endpoints(
    fam: int, body: bytes, family: pp.Family, tlvs: tuple[pp.Tlv, ...]
) -> None:
    header, _ = pp.parse_header(_proxy(fam, body))
    assert header.family is family
    assert (header.source, header.destination) == (None, None)
    assert header.tlvs == tlvs


def test_udp_addresses_are_read() -> None:
    header, _ = pp.parse_header(_proxy(0x22, V6_BLOCK))
    assert header.transport is pp.Transport.DGRAM
    assert header.source == V6_SRC


def test_checksum_verified() -> None:
    good = pp.build_header(V4_SRC, V4_DST, [pp.Tlv.for_identity(CLIENT)], with_crc32c=True)
    header, _ = pp.parse_header(good)
    assert header.source_identity == CLIENT
    tampered = bytearray(good)
    tampered[16] ^= 1  # the source address
    with pytest.raises(pp.ProxyProtocolRemoteError, match="CRC32C"):
        pp.parse_header(bytes(tampered))


TOO_SHORT_V4 = _proxy(0x11, V4_BLOCK[:11])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "signature", id="http-request"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature", id="version-1-text"),
        pytest.param(SIG[:5] + b"\x01" + SIG[6:] + b"\x21", "signature", id="signature-byte-6"),
        pytest.param(SIG + b"\x11\x11\x00\x0c" + V4_BLOCK, "version 1", id="version-1-binary"),
        pytest.param(SIG + b"\x31\x11\x00\x0c" + V4_BLOCK, "version 3", id="version-3"),
        pytest.param(SIG + b"\x22\x11\x00\x0c" + V4_BLOCK, "command 2", id="command-2"),
        pytest.param(SIG + b"\x2f\x11\x00\x0c" + V4_BLOCK, "command 15", id="command-15"),
        pytest.param(_proxy(0x41, V4_BLOCK), "0x41", id="family-4"),
        pytest.param(_proxy(0x13, V4_BLOCK), "0x13", id="transport-3"),
        pytest.param(_proxy(0x10, V4_BLOCK), "0x10", id="inet-unspec-transport"),
        pytest.param(_proxy(0x01, V4_BLOCK), "0x01", id="unspec-family-stream"),
        pytest.param(TOO_SHORT_V4, "shorter than the 12-byte address block", id="short-v4"),
        pytest.param(_proxy(0x21, V4_BLOCK), "36-byte", id="v4-block-as-v6"),
        pytest.param(_proxy(0x31, bytes(215)), "216-byte", id="short-unix"),
        pytest.param(_proxy(0x11, V4_BLOCK + b"\xd0\x00"), "too short for a TLV", id="tlv-cut"),
        pytest.param(
            _proxy(0x11, V4_BLOCK + b"\xe0\x00\x05abc"), "runs past", id="tlv-length-past-end"
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0x03, b"abc")), "4-byte value", id="crc-wrong-size"
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0x03, bytes(4)) + _tlv(0x03, bytes(4))),
            "appear once",
            id="crc-twice",
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0x03, b"\xde\xad\xbe\xef")), "CRC32C", id="crc-wrong"
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0xD0, b"\xff\xfe")), "not a SPIFFE ID", id="id-not-utf8"
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0xD0, b"web")), "not a SPIFFE ID", id="id-not-spiffe"
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0xD0, CLIENT_URI + b"\n")),
            "bad service account",
            id="id-trailing-newline",
        ),
        pytest.param(
            _proxy(0x11, V4_BLOCK + _tlv(0xD0, CLIENT_URI) + _tlv(0xD0, CLIENT_URI)),
            "more than one",
            id="id-twice",
        ),
    ],
)
def test_malformed_headers_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(pp.ProxyProtocolRemoteError) as err:
        pp.parse_header(data)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("first", "offset"),
    [
        pytest.param(b"G", 0, id="first-byte"),
        pytest.param(b"\x16\x03\x01", 0, id="tls-client-hello"),
        pytest.param(SIG[:7] + b"X", 7, id="eighth-byte"),
    ],
)
def test_a_wrong_signature_fails_before_sixteen_bytes(first: bytes, offset: int) -> None:
    parser = pp.ProxyHeaderParser()
    with pytest.raises(pp.ProxyProtocolRemoteError) as err:
        parser.receive_data(first)
    assert err.value.offset == offset


def test_size_limit_is_enforced_from_the_length_field() -> None:
    parser = pp.ProxyHeaderParser(max_size=64)
    # The prefix alone announces 16 + 100 bytes: refused before the body arrives.
    with pytest.raises(pp.HeaderTooLargeError) as err:
        parser.receive_data(V2_PROXY + b"\x11\x00\x64")
    assert (err.value.size, err.value.limit) == (116, 64)
    assert isinstance(err.value, pp.ProxyProtocolRemoteError)


def test_default_limit_refuses_the_largest_header() -> None:
    with pytest.raises(pp.HeaderTooLargeError):
        pp.ProxyHeaderParser().receive_data(V2_PROXY + b"\x11\xff\xff")


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        pytest.param(b"", None, id="nothing"),
        pytest.param(SIG[:9], None, id="inside-signature"),
        pytest.param(V4_HEADER[:20], 28, id="inside-addresses"),
    ],
)
def test_end_of_stream_before_the_header_is_an_error(data: bytes, needed: int | None) -> None:
    parser = pp.ProxyHeaderParser()
    assert parser.receive_data(data) is None
    with pytest.raises(pp.TruncatedHeaderError) as err:
        parser.receive_eof()
    assert (err.value.received, err.value.needed) == (len(data), needed)


def test_parser_is_finished_after_a_header_or_an_error() -> None:
    parser = pp.ProxyHeaderParser()
    assert parser.receive_data(V4_HEADER) is not None
    assert parser.is_finished
    with pytest.raises(pp.ProxyProtocolLocalError):
        parser.receive_data(b"more")
    failed = pp.ProxyHeaderParser()
    with pytest.raises(pp.ProxyProtocolRemoteError):
        failed.receive_data(b"x")
    with pytest.raises(pp.ProxyProtocolLocalError):
        failed.receive_eof()


@pytest.mark.parametrize("max_size", [0, 15, 16 + 65536], ids=["zero", "below-prefix", "above"])
def test_parser_limit_must_be_sensible(max_size: int) -> None:
    with pytest.raises(pp.ProxyProtocolLocalError):
        pp.ProxyHeaderParser(max_size=max_size)


# --- building errors ------------------------------------------------------------------------------


V4 = ipaddress.IPv4Address("10.0.0.1")
V6 = ipaddress.IPv6Address("fd00::1")


@pytest.mark.parametrize(
    ("source", "destination", "tlvs", "reason"),
    [
        pytest.param((V4, 1), (V6, 2), (), "different address families", id="mixed-families"),
        pytest.param((V4, -1), (V4, 2), (), "source port", id="negative-port"),
        pytest.param((V4, 1), (V4, 65536), (), "destination port", id="port-too-big"),
        pytest.param((V4, 1), (V4, 2), (pp.Tlv(256, b""),), "tlvs[0]: type", id="tlv-type"),
        pytest.param(
            (V4, 1), (V4, 2), (pp.Tlv(1, bytes(65536)),), "too long", id="tlv-value-too-long"
        ),
        pytest.param(
            (V4, 1),
            (V4, 2),
            (pp.Tlv(0xE0, bytes(40000)), pp.Tlv(0xE1, bytes(40000))),
            "16-bit length",
            id="header-too-long",
        ),
        pytest.param((V4, 1), (V4, 2), (pp.Tlv(3, bytes(4)),), "with_crc32c", id="manual-crc"),
    ],
)
def test_build_refuses_what_cannot_be_encoded(
    source: pp.Endpoint, destination: pp.Endpoint, tlvs: tuple[pp.Tlv, ...], reason: str
) -> None:
    with pytest.raises(pp.ProxyProtocolLocalError) as err:
        pp.build_header(source, destination, tlvs)
    assert reason in str(err.value)


def test_build_refuses_unspec_transport() -> None:
    with pytest.raises(pp.ProxyProtocolLocalError):
        pp.build_header((V4, 1), (V4, 2), transport=pp.Transport.UNSPEC)
