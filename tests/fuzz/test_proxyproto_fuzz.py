"""Arbitrary bytes into the PROXY v2 parser: only ProxyProtocolRemoteError may come out, and
whatever parses is consistent with the bytes it came from."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.identity import spiffe
from meshcore.wire import proxyproto as pp

_CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
_V4 = (ipaddress.IPv4Address("10.0.0.1"), 1234), (ipaddress.IPv4Address("10.0.0.2"), 80)
_V6 = (ipaddress.IPv6Address("fd00::1"), 1234), (ipaddress.IPv6Address("fd00::2"), 80)
_VALID = [
    pp.build_header(*_V4),
    pp.build_header(*_V4, [pp.Tlv.for_identity(_CLIENT)]),
    pp.build_header(*_V6, [pp.Tlv(pp.TLV_AUTHORITY, b"x"), pp.Tlv.for_identity(_CLIENT)]),
    pp.build_header(*_V4, [pp.Tlv.for_identity(_CLIENT)], with_crc32c=True),
    pp.build_header(*_V6, transport=pp.Transport.DGRAM),
    pp.build_local_header(),
    pp.SIGNATURE + b"\x21\x31\x00\xdb" + bytes(216) + b"\x04\x00\x00",  # UNIX + NOOP TLV
    pp.SIGNATURE + b"\x21\x00\x00\x03abc",  # PROXY over UNSPEC
]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes replaced, inserted or cut, and maybe app bytes after."""
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["replace", "insert", "cut"])):
            case "replace" if pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            case "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
            case _:
                del data[pos:]
    return bytes(data) + draw(st.binary(max_size=8))


_inputs = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: pp.SIGNATURE + b),  # past the signature check
    st.binary(max_size=300).map(lambda b: pp.SIGNATURE + b"\x21" + b),
    _mutated(),
)


@settings(max_examples=1000)
@given(
    data=_inputs,
    cuts=st.lists(st.integers(0, 320), max_size=5),
    max_size=st.sampled_from([16, 64, pp.DEFAULT_MAX_SIZE]),
    eof=st.booleans(),
)
def test_parser_raises_only_remote_errors(
    data: bytes, cuts: list[int], max_size: int, eof: bool
) -> None:
    parser = pp.ProxyHeaderParser(max_size=max_size)
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    result = None
    fed = 0
    try:
        for a, b in itertools.pairwise(points):
            fed = b
            result = parser.receive_data(data[a:b])
            if result is not None:
                break
        if result is None and eof:
            parser.receive_eof()
    except pp.ProxyProtocolRemoteError:
        return
    if result is None:
        return
    header, leftover = result
    # The header and the leftover are exactly the bytes fed, split at the declared size.
    size = 16 + int.from_bytes(data[14:16], "big")
    assert size <= max_size
    assert data[:size] + leftover == data[:fed]
    if header.command is pp.Command.PROXY and header.source is not None:
        assert header.destination is not None
        assert header.source[0].version == header.destination[0].version
    identity = header.source_identity  # never raises: checked when parsed
    assert identity is None or identity.uri.encode() == header.find_tlv(pp.TLV_SPIFFE_ID)


@settings(max_examples=500)
@given(data=_inputs)
def test_one_shot_parse_matches_byte_at_a_time(data: bytes) -> None:
    whole: tuple[pp.ProxyHeader, bytes] | None = None
    try:
        whole = pp.parse_header(data)
    except pp.ProxyProtocolRemoteError:
        pass
    parser = pp.ProxyHeaderParser()
    stepwise = None
    try:
        for i in range(len(data)):
            stepwise = parser.receive_data(data[i : i + 1])
            if stepwise is not None:
                break
        if stepwise is None:
            parser.receive_eof()
    except pp.ProxyProtocolRemoteError:
        stepwise = None
    # Both ways fail (maybe at different bytes of the same flawed header), or both parse.
    assert (whole is None) == (stepwise is None)
    if whole is None or stepwise is None:
        return
    header, leftover = stepwise
    # Byte-at-a-time completes on the header's last byte, so the rest is still unread.
    assert (header, leftover) == (whole[0], b"")
    assert data.endswith(whole[1])
