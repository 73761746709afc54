from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshcore.identity import ca, certs, csr, spiffe

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(hours=24)
WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@pytest.fixture(scope="module")
def authority() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.generate("cluster.local", now=NOW)


def _issue(
    authority: ca.CertificateAuthority,
    identity: spiffe.SpiffeId = WEB,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, list[str]]:
    key = key or csr.generate_key()
    leaf = authority.sign_csr(csr.build_csr(key, identity), identity=identity, ttl=TTL, now=NOW)
    return key, [leaf.decode(), authority.root_pem.decode()]


def _self_signed(names: list[x509.GeneralName] | None) -> x509.Certificate:
    key = csr.generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + TTL)
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_build_workload_certificate(authority: ca.CertificateAuthority) -> None:
    key, chain = _issue(authority)
    cert = certs.build_workload_certificate(
        WEB, key, chain, trusted_root_pem=authority.root_pem, now=NOW
    )
    assert cert.identity == WEB
    assert cert.chain_pem == (chain[0].encode(),)
    assert cert.root_pem == authority.root_pem
    assert cert.key is key
    assert cert.not_before == NOW - datetime.timedelta(minutes=1)
    assert cert.not_after == NOW + TTL
    assert cert.serial_number == x509.load_pem_x509_certificate(cert.chain_pem[0]).serial_number
    assert "key" not in repr(cert)
    assert "PRIVATE" not in repr(cert)


def test_refresh_at_is_half_life(authority: ca.CertificateAuthority) -> None:
    key, chain = _issue(authority)
    cert = certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=None, now=NOW)
    lifetime = TTL + datetime.timedelta(minutes=1)
    assert cert.refresh_at == cert.not_before + lifetime / 2
    assert cert.refresh_at == NOW + datetime.timedelta(hours=11, minutes=59, seconds=30)


@pytest.mark.parametrize(
    ("at", "valid"),
    [
        (NOW - datetime.timedelta(minutes=2), False),
        (NOW - datetime.timedelta(minutes=1), True),
        (NOW + TTL - datetime.timedelta(seconds=1), True),
        (NOW + TTL, False),
    ],
    ids=["before", "not-before", "last-second", "not-after"],
)
def test_is_valid_at(
    authority: ca.CertificateAuthority, at: datetime.datetime, valid: bool
) -> None:
    key, chain = _issue(authority)
    cert = certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=None, now=NOW)
    assert cert.is_valid_at(at) is valid


def test_chain_with_intermediate_keeps_it_and_drops_root() -> None:
    root_key = csr.generate_key()
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - TTL)
        .not_valid_after(NOW + 10 * TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    inter_key = csr.generate_key()
    inter_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
            x509.NameAttribute(NameOID.COMMON_NAME, "intermediate"),
        ]
    )
    inter = (
        x509.CertificateBuilder()
        .subject_name(inter_name)
        .issuer_name(root_name)
        .public_key(inter_key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - TTL)
        .not_valid_after(NOW + 10 * TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    intermediate_ca = ca.CertificateAuthority(inter, inter_key)
    key = csr.generate_key()
    leaf = intermediate_ca.sign_csr(csr.build_csr(key, WEB), identity=WEB, ttl=TTL, now=NOW)
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in (inter, root)]

    cert = certs.build_workload_certificate(
        WEB, key, [leaf, *pems], trusted_root_pem=pems[1], now=NOW
    )
    assert cert.chain_pem == (leaf, pems[0])
    assert cert.root_pem == pems[1]

    # Without the intermediate the leaf does not chain to the root.
    with pytest.raises(certs.ChainError, match="does not verify"):
        certs.build_workload_certificate(WEB, key, [leaf, pems[1]], trusted_root_pem=None, now=NOW)


def test_rejects_other_identity(authority: ca.CertificateAuthority) -> None:
    key, chain = _issue(authority, DB)
    with pytest.raises(certs.IdentityMismatchError) as raised:
        certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=None, now=NOW)
    assert raised.value.got == DB
    assert raised.value.expected == {WEB}
    assert WEB.uri in str(raised.value)
    assert DB.uri in str(raised.value)


def test_rejects_other_key(authority: ca.CertificateAuthority) -> None:
    _, chain = _issue(authority)
    with pytest.raises(certs.KeyMismatchError, match="does not carry our public key"):
        certs.build_workload_certificate(
            WEB, csr.generate_key(), chain, trusted_root_pem=None, now=NOW
        )


def test_rejects_untrusted_root(authority: ca.CertificateAuthority) -> None:
    other = ca.CertificateAuthority.generate("cluster.local", now=NOW)
    key, chain = _issue(other)
    with pytest.raises(certs.UntrustedRootError, match="untrusted root"):
        certs.build_workload_certificate(
            WEB, key, chain, trusted_root_pem=authority.root_pem, now=NOW
        )
    # A trust bundle that holds the root is fine.
    bundle = authority.root_pem + other.root_pem
    cert = certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=bundle, now=NOW)
    assert cert.root_pem == other.root_pem


def test_rejects_leaf_not_signed_by_root(authority: ca.CertificateAuthority) -> None:
    other = ca.CertificateAuthority.generate("cluster.local", now=NOW)
    key, chain = _issue(other)
    spliced = [chain[0], authority.root_pem.decode()]
    with pytest.raises(certs.ChainError, match="does not verify"):
        certs.build_workload_certificate(WEB, key, spliced, trusted_root_pem=None, now=NOW)


@pytest.mark.parametrize(
    "at",
    [NOW + TTL + datetime.timedelta(seconds=1), NOW - datetime.timedelta(hours=1)],
    ids=["expired", "not-yet-valid"],
)
def test_rejects_outside_validity(
    authority: ca.CertificateAuthority, at: datetime.datetime
) -> None:
    key, chain = _issue(authority)
    with pytest.raises(certs.ChainError, match="does not verify"):
        certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=None, now=at)


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ([], "empty"),
        (["garbage"], r"cert_chain\[0\] is not a PEM certificate"),
        ("leaf-only", "must hold a leaf and a root, got 1"),
    ],
    ids=["empty", "garbage", "leaf-only"],
)
def test_rejects_malformed_chain(
    authority: ca.CertificateAuthority, chain: list[str] | str, message: str
) -> None:
    key, issued = _issue(authority)
    response = issued[:1] if chain == "leaf-only" else chain
    with pytest.raises(certs.ChainError, match=message):
        certs.build_workload_certificate(WEB, key, response, trusted_root_pem=None, now=NOW)


def test_split_pem_chain_accepts_bundles_and_bytes(authority: ca.CertificateAuthority) -> None:
    _, chain = _issue(authority)
    assert len(certs.split_pem_chain(["".join(chain)])) == 2
    assert len(certs.split_pem_chain([c.encode() for c in chain])) == 2


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (None, "no subjectAltName"),
        ([x509.DNSName("web")], "exactly one URI SAN, has 0"),
        (
            [x509.UniformResourceIdentifier(WEB.uri), x509.UniformResourceIdentifier(DB.uri)],
            "exactly one URI SAN, has 2",
        ),
        ([x509.UniformResourceIdentifier("https://web")], "not a SPIFFE ID"),
    ],
    ids=["no-san", "dns-only", "two-uris", "not-spiffe"],
)
def test_spiffe_id_of_rejects(names: list[x509.GeneralName] | None, message: str) -> None:
    with pytest.raises(certs.PeerIdentityError, match=message):
        certs.spiffe_id_of(_self_signed(names))


def test_spiffe_id_of_reads_uri_san() -> None:
    cert = _self_signed([x509.DNSName("web"), x509.UniformResourceIdentifier(WEB.uri)])
    assert certs.spiffe_id_of(cert) == WEB
