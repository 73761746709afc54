"""Hypothesis over the identity parsers: only the documented IdentityError subclasses get out."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.identity import ca, certs, csr, spiffe, tokens

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
AUTHORITY = ca.CertificateAuthority.generate("cluster.local", now=NOW)
KEY = csr.generate_key()
CSR_DER = x509.load_pem_x509_csr(csr.build_csr(KEY, WEB)).public_bytes(serialization.Encoding.DER)
LEAF_PEM = AUTHORITY.sign_csr(
    csr.build_csr(KEY, WEB), identity=WEB, ttl=datetime.timedelta(hours=1), now=NOW
)
LEAF_DER = x509.load_pem_x509_certificate(LEAF_PEM).public_bytes(serialization.Encoding.DER)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n".encode()


@st.composite
def mutated(draw: st.DrawFn, der: bytes) -> bytes:
    """`der` with a few bytes replaced, inserted or cut: mostly-valid structure, bad details."""
    data = bytearray(der)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        value = draw(st.integers(0, 255))
        if action == "replace":
            data[index] = value
        elif action == "insert":
            data.insert(index, value)
        elif action == "delete" and len(data) > 1:
            del data[index]
        elif action == "truncate":
            del data[max(index, 1) :]
    return bytes(data)


def _sign(csr_pem: bytes) -> None:
    try:
        AUTHORITY.sign_csr(csr_pem, identity=WEB, ttl=datetime.timedelta(hours=1), now=NOW)
    except certs.IdentityError:
        pass  # the only error a bad CSR may produce


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_csr(data: bytes) -> None:
    _sign(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_der_in_pem_armour(data: bytes) -> None:
    _sign(_pem("CERTIFICATE REQUEST", data))


@FUZZ
@given(mutated(CSR_DER))
def test_mutated_csr(der: bytes) -> None:
    _sign(_pem("CERTIFICATE REQUEST", der))


@FUZZ
@given(mutated(LEAF_DER))
def test_mutated_ca_response(der: bytes) -> None:
    try:
        certs.build_workload_certificate(
            WEB, KEY, [_pem("CERTIFICATE", der), AUTHORITY.root_pem], trusted_root_pem=None, now=NOW
        )
    except certs.IdentityError:
        pass


def test_a_ca_response_with_a_duplicate_extension_is_an_identity_error() -> None:
    # Found by test_mutated_ca_response: the SAN's OID turned into the authority key id's, so
    # the certificate holds that extension twice, which cryptography reports on first read.
    san_oid, aki_oid = bytes.fromhex("0603551d11"), bytes.fromhex("0603551d23")
    assert LEAF_DER.count(san_oid) == 1
    der = LEAF_DER.replace(san_oid, aki_oid)
    with pytest.raises(certs.PeerIdentityError, match="malformed extension"):
        certs.build_workload_certificate(
            WEB, KEY, [_pem("CERTIFICATE", der), AUTHORITY.root_pem], trusted_root_pem=None, now=NOW
        )


def test_a_ca_response_with_a_negative_serial_number_is_refused() -> None:
    # Found by test_mutated_ca_response: RFC 5280 wants a positive serial; cryptography only
    # warns about it today and will refuse it later. The first byte after the serial's
    # INTEGER header gets its sign bit set.
    tbs = LEAF_DER.index(bytes.fromhex("a003020102")) + 5  # the version, then the serial
    assert LEAF_DER[tbs] == 0x02
    der = bytearray(LEAF_DER)
    der[tbs + 2] |= 0x80
    with pytest.raises(certs.ChainError, match=r"cert_chain\[0\] breaks RFC 5280: .*serial"):
        certs.build_workload_certificate(
            WEB,
            KEY,
            [_pem("CERTIFICATE", bytes(der)), AUTHORITY.root_pem],
            trusted_root_pem=None,
            now=NOW,
        )


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300)), max_size=4))
def test_arbitrary_ca_response(chain: list[str | bytes]) -> None:
    try:
        certs.build_workload_certificate(WEB, KEY, chain, trusted_root_pem=None, now=NOW)
    except certs.IdentityError:
        pass


@FUZZ
@given(st.text(max_size=600))
def test_token_verify_never_raises(token: str) -> None:
    issuer = tokens.NodeTokens(b"k" * 32)
    node = issuer.verify(token)
    assert node is None or issuer.mint(node) == token
