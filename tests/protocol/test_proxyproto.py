"""PROXY v2 sender and receiver piped together: what the builder writes the parser reads back,
however the bytes are split on the way, and the app's first bytes are never lost."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.identity import spiffe
from meshcore.wire import proxyproto as pp

CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SRC = (ipaddress.IPv4Address("10.244.1.7"), 41234)
DST = (ipaddress.IPv4Address("10.244.2.9"), 8080)
APP = b"GET /products HTTP/1.1\r\nhost: product-catalog.shop\r\n\r\n"


def _feed(chunks: list[bytes]) -> tuple[pp.ProxyHeader, bytes]:
    """Feed chunks the way a socket delivers them; after the header, the rest is app data."""
    parser = pp.ProxyHeaderParser()
    app = bytearray()
    header: pp.ProxyHeader | None = None
    for chunk in chunks:
        if header is not None:
            app += chunk
            continue
        result = parser.receive_data(chunk)
        if result is not None:
            header, leftover = result
            app += leftover
    assert header is not None, "the header never completed"
    return header, bytes(app)


def test_byte_at_a_time() -> None:
    wire = pp.build_header(SRC, DST, [pp.Tlv.for_identity(CLIENT)]) + APP
    header, app = _feed([wire[i : i + 1] for i in range(len(wire))])
    assert (header.source, header.destination, header.source_identity) == (SRC, DST, CLIENT)
    assert app == APP


@pytest.mark.parametrize("split", [0, 1, 12, 13, 15, 16, 27, 28, 29, 40], ids=str)
def test_every_split_point(split: int) -> None:
    """Two reads, cut at the boundaries that matter: inside the signature, after the version
    byte, after the length field, inside the addresses, at the header's end, inside the TLV."""
    wire = pp.build_header(SRC, DST, [pp.Tlv.for_identity(CLIENT)]) + APP
    header, app = _feed([wire[:split], wire[split:]])
    assert header.source_identity == CLIENT
    assert app == APP


def test_local_then_app_data() -> None:
    wire = pp.build_local_header() + APP
    header, app = _feed([wire[:5], wire[5:20], wire[20:]])
    assert header.is_local
    assert app == APP


def test_checksummed_header_round_trip() -> None:
    wire = pp.build_header(SRC, DST, [pp.Tlv.for_identity(CLIENT)], with_crc32c=True)
    header, app = _feed([wire])
    assert header.source_identity == CLIENT
    assert header.tlvs[-1].type == pp.TLV_CRC32C
    assert app == b""


_ipv4 = st.ip_addresses(v=4)
_ipv6 = st.ip_addresses(v=6)
_port = st.integers(0, 65535)
_tlv = st.builds(
    pp.Tlv,
    st.integers(0, 255).filter(lambda t: t not in (pp.TLV_CRC32C, pp.TLV_SPIFFE_ID)),
    st.binary(max_size=64),
)


@st.composite
def _endpoints(draw: st.DrawFn) -> tuple[pp.Endpoint, pp.Endpoint]:
    ips = draw(st.sampled_from([_ipv4, _ipv6]))
    return (draw(ips), draw(_port)), (draw(ips), draw(_port))


@settings(max_examples=300)
@given(
    endpoints=_endpoints(),
    tlvs=st.lists(_tlv, max_size=4),
    with_identity=st.booleans(),
    with_crc=st.booleans(),
    transport=st.sampled_from([pp.Transport.STREAM, pp.Transport.DGRAM]),
    app=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_round_trip(
    endpoints: tuple[pp.Endpoint, pp.Endpoint],
    tlvs: list[pp.Tlv],
    with_identity: bool,
    with_crc: bool,
    transport: pp.Transport,
    app: bytes,
    cuts: list[int],
) -> None:
    source, destination = endpoints
    sent = [*tlvs, pp.Tlv.for_identity(CLIENT)] if with_identity else tlvs
    wire = pp.build_header(source, destination, sent, transport=transport, with_crc32c=with_crc)
    stream = wire + app
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    header, got_app = _feed([stream[a:b] for a, b in itertools.pairwise(points)])
    assert header.command is pp.Command.PROXY
    assert header.transport is transport
    assert (header.source, header.destination) == (source, destination)
    received = [t for t in header.tlvs if t.type != pp.TLV_CRC32C]
    assert received == sent
    assert header.source_identity == (CLIENT if with_identity else None)
    assert got_app == app
