"""Hypothesis on HBONE's header blocks: our stateless encoding reads back exactly, through our
plain-block reader and through `hpack` alike, and the plain-block reader never disagrees with
`hpack` on any byte string it accepts."""

from __future__ import annotations

import hpack
from hypothesis import given
from hypothesis import strategies as st

from meshcore.wire import hbone_hpack
from tests.fuzz.test_hbone_fuzz import FUZZ

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=40)
_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=300
)
_fields = st.lists(st.tuples(_names, _values), max_size=8)


def _raw(fields: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in fields]


@FUZZ
@given(authority=_values.filter(bool), fields=_fields)
def test_our_request_blocks_read_back_exactly(
    authority: str, fields: list[tuple[str, str]]
) -> None:
    block = hbone_hpack.encode_request(authority, fields)
    expected = [(b":method", b"CONNECT"), (b":authority", authority.encode()), *_raw(fields)]
    assert hbone_hpack._decode_plain(block, 1 << 20) == expected
    assert [tuple(f) for f in hpack.Decoder(1 << 20).decode(block, raw=True)] == expected


@FUZZ
@given(status=st.integers(100, 999), fields=_fields)
def test_our_response_blocks_read_back_exactly(status: int, fields: list[tuple[str, str]]) -> None:
    block = hbone_hpack.encode_response(status, fields)
    expected = [(b":status", str(status).encode()), *_raw(fields)]
    assert hbone_hpack.BlockDecoder(1 << 20).decode(block) == expected
    assert [tuple(f) for f in hpack.Decoder(1 << 20).decode(block, raw=True)] == expected


@FUZZ
@given(fields=st.lists(_fields, min_size=1, max_size=4))
def test_blocks_from_a_stateful_encoder_go_through_hpack_in_order(
    fields: list[list[tuple[str, str]]],
) -> None:
    # Huffman coding and the dynamic table: the plain reader must step aside every time, and
    # the shared table must stay in step across blocks.
    encoder = hpack.Encoder()
    decoder = hbone_hpack.BlockDecoder(1 << 20)
    for block_fields in fields:
        assert decoder.decode(bytes(encoder.encode(block_fields))) == _raw(block_fields)


@FUZZ
@given(block=st.binary(max_size=200), limit=st.sampled_from([64, 4096]))
def test_the_plain_reader_agrees_with_hpack_on_whatever_it_accepts(
    block: bytes, limit: int
) -> None:
    plain = hbone_hpack._decode_plain(block, limit)
    if plain is None:
        return
    assert [tuple(f) for f in hpack.Decoder(limit).decode(block, raw=True)] == plain


def _string(raw: bytes) -> bytes:
    return hbone_hpack._string(raw)


_plain_piece = st.one_of(
    st.integers(1, 70).map(lambda i: hbone_hpack._integer(i, 7, 0x80)),  # 62+ is dynamic
    st.tuples(st.integers(0, 70), st.binary(max_size=200), st.sampled_from([0x00, 0x10])).map(
        lambda t: (
            hbone_hpack._integer(t[0], 4, t[2])
            + (_string(b"x-name") if t[0] == 0 else b"")
            + _string(t[1])
        )
    ),
)


@FUZZ
@given(pieces=st.lists(_plain_piece, max_size=6), limit=st.sampled_from([100, 4096]))
def test_representation_mixes_decode_as_hpack_does(pieces: list[bytes], limit: int) -> None:
    block = b"".join(pieces)
    decoder = hbone_hpack.BlockDecoder(limit)
    try:
        ours: object = decoder.decode(block)
    except hbone_hpack.HPACK_ERRORS as exc:
        ours = type(exc)
    try:
        theirs: object = [tuple(f) for f in hpack.Decoder(limit).decode(block, raw=True)]
    except hbone_hpack.HPACK_ERRORS as exc:
        theirs = type(exc)
    assert ours == theirs
