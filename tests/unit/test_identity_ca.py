from __future__ import annotations

import base64
import datetime
import os
import pathlib
import stat
import subprocess
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.identity import ca, certs, csr, spiffe

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(hours=24)
WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")


@pytest.fixture(scope="module")
def authority() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.generate("cluster.local", now=NOW)


def _sign(authority: ca.CertificateAuthority, identity: spiffe.SpiffeId) -> x509.Certificate:
    pem = authority.sign_csr(
        csr.build_csr(csr.generate_key(), identity), identity=identity, ttl=TTL, now=NOW
    )
    return x509.load_pem_x509_certificate(pem)


# -- root ------------------------------------------------------------------------------------


def test_root_profile(authority: ca.CertificateAuthority) -> None:
    root = x509.load_pem_x509_certificate(authority.root_pem)
    assert authority.trust_domain == "cluster.local"
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "ambient-mesh root CA"
    )
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert root.not_valid_after_utc - NOW == datetime.timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.signature_hash_algorithm, hashes.SHA256)


@pytest.mark.parametrize(
    ("trust_domain", "now", "validity"),
    [
        ("", NOW, datetime.timedelta(days=1)),
        ("Bad Domain", NOW, datetime.timedelta(days=1)),
        ("cluster.local", NOW.replace(tzinfo=None), datetime.timedelta(days=1)),
        ("cluster.local", NOW, datetime.timedelta(0)),
    ],
    ids=["empty-domain", "invalid-domain", "naive-time", "zero-validity"],
)
def test_generate_rejects(
    trust_domain: str, now: datetime.datetime, validity: datetime.timedelta
) -> None:
    with pytest.raises(ca.CaError):
        ca.CertificateAuthority.generate(trust_domain, now=now, validity=validity)


# -- leaf ------------------------------------------------------------------------------------


def test_leaf_profile(authority: ca.CertificateAuthority) -> None:
    key = csr.generate_key()
    pem = authority.sign_csr(csr.build_csr(key, WEB), identity=WEB, ttl=TTL, now=NOW)
    leaf = x509.load_pem_x509_certificate(pem)
    root = x509.load_pem_x509_certificate(authority.root_pem)

    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert leaf.not_valid_before_utc == NOW - datetime.timedelta(minutes=1)
    assert leaf.not_valid_after_utc == NOW + TTL
    assert leaf.public_key() == key.public_key()
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    leaf.verify_directly_issued_by(root)


def test_serials_are_random(authority: ca.CertificateAuthority) -> None:
    serials = {_sign(authority, WEB).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_leaf_never_outlives_root() -> None:
    short = ca.CertificateAuthority.generate(
        "cluster.local", now=NOW, validity=datetime.timedelta(hours=2)
    )
    leaf = _sign(short, WEB)
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(hours=2)


def _openssl_verify(root_file: pathlib.Path, target: pathlib.Path, *extra: str) -> str:
    # Verify at NOW: the openssl CLI would otherwise use the wall clock.
    result = subprocess.run(
        [
            *("openssl", "verify", "-x509_strict", "-attime", str(int(NOW.timestamp()))),
            *extra,
            *("-CAfile", str(root_file), str(target)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr if result.returncode else result.stdout.strip()


@pytest.mark.parametrize(
    ("target", "purpose"),
    [("root", ()), ("leaf", ("-purpose", "sslserver")), ("leaf", ("-purpose", "sslclient"))],
    ids=["root", "leaf-as-server", "leaf-as-client"],
)
def test_openssl_x509_strict_accepts(
    authority: ca.CertificateAuthority,
    tmp_path: pathlib.Path,
    target: str,
    purpose: tuple[str, ...],
) -> None:
    root_file = tmp_path / "root.pem"
    leaf_file = tmp_path / "leaf.pem"
    root_file.write_bytes(authority.root_pem)
    leaf_file.write_bytes(_sign(authority, WEB).public_bytes(serialization.Encoding.PEM))
    checked = root_file if target == "root" else leaf_file
    assert _openssl_verify(root_file, checked, *purpose) == f"{checked}: OK"


def test_openssl_refuses_leaf_of_other_root(
    authority: ca.CertificateAuthority, tmp_path: pathlib.Path
) -> None:
    # The check above must be able to fail.
    other = ca.CertificateAuthority.generate("cluster.local", now=NOW)
    (tmp_path / "root.pem").write_bytes(authority.root_pem)
    (tmp_path / "leaf.pem").write_bytes(_sign(other, WEB).public_bytes(serialization.Encoding.PEM))
    output = _openssl_verify(tmp_path / "root.pem", tmp_path / "leaf.pem")
    assert "unable to get local issuer certificate" in output


# -- CSR rejection paths ---------------------------------------------------------------------


def _csr_with(
    key: object,
    names: list[x509.GeneralName] | None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _tampered_signature() -> bytes:
    der = x509.load_pem_x509_csr(csr.build_csr(csr.generate_key(), WEB)).public_bytes(
        serialization.Encoding.DER
    )
    # The DER ends with the signature's last INTEGER byte: flipping it keeps the structure.
    bad = der[:-1] + bytes([der[-1] ^ 0x01])
    return x509.load_der_x509_csr(bad).public_bytes(serialization.Encoding.PEM)


def _bad_version() -> bytes:
    der = x509.load_pem_x509_csr(csr.build_csr(csr.generate_key(), WEB)).public_bytes(
        serialization.Encoding.DER
    )
    # The first INTEGER is the CSR version (v1 = 0); 1 is not a defined version.
    bad = der.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1)
    body = base64.encodebytes(bad).decode()
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()
    )


def _uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


CSR_CASES: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    ("garbage", lambda: b"not a csr", csr.CsrFormatError, "not a PEM certificate request"),
    ("empty", lambda: b"", csr.CsrFormatError, "not a PEM certificate request"),
    (
        "certificate-not-csr",
        lambda: ca.CertificateAuthority.generate("cluster.local", now=NOW).root_pem,
        csr.CsrFormatError,
        "not a PEM certificate request",
    ),
    ("oversized", lambda: b"A" * (csr.MAX_CSR_BYTES + 1), csr.CsrFormatError, "more than"),
    ("bad-version", _bad_version, csr.CsrFormatError, "not a valid CSR version"),
    ("bad-signature", _tampered_signature, csr.CsrSignatureError, "signature is invalid"),
    (
        "rsa-key",
        lambda: _csr_with(rsa.generate_private_key(65537, 2048), [_uri(WEB.uri)]),
        csr.CsrKeyError,
        "must be ECDSA P-256, got",
    ),
    (
        "p384-key",
        lambda: _csr_with(ec.generate_private_key(ec.SECP384R1()), [_uri(WEB.uri)]),
        csr.CsrKeyError,
        "curve secp384r1",
    ),
    (
        "ed25519-key",
        lambda: _csr_with(ed25519.Ed25519PrivateKey.generate(), [_uri(WEB.uri)]),
        csr.CsrKeyError,
        "must be ECDSA P-256",
    ),
    (
        "no-san",
        lambda: _csr_with(csr.generate_key(), None),
        csr.CsrSubjectAltNameError,
        "no subjectAltName",
    ),
    (
        "dns-san-only",
        lambda: _csr_with(csr.generate_key(), [x509.DNSName("web.shop")]),
        csr.CsrSubjectAltNameError,
        "exactly one URI SAN, has 0",
    ),
    (
        "two-uri-sans",
        lambda: _csr_with(csr.generate_key(), [_uri(WEB.uri), _uri(DB.uri)]),
        csr.CsrSubjectAltNameError,
        "exactly one URI SAN, has 2",
    ),
    (
        "non-spiffe-uri",
        lambda: _csr_with(csr.generate_key(), [_uri("https://shop.example/web")]),
        csr.CsrSubjectAltNameError,
        "not a SPIFFE ID",
    ),
    (
        "other-identity",
        lambda: csr.build_csr(csr.generate_key(), DB),
        csr.CsrIdentityMismatchError,
        f"CSR is for {DB.uri}, but the requested identity is {WEB.uri}",
    ),
]


@pytest.mark.parametrize(
    ("make_csr", "error", "message"),
    [case[1:] for case in CSR_CASES],
    ids=[case[0] for case in CSR_CASES],
)
def test_sign_csr_rejects(
    authority: ca.CertificateAuthority,
    make_csr: Callable[[], bytes],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error) as raised:
        authority.sign_csr(make_csr(), identity=WEB, ttl=TTL, now=NOW)
    assert isinstance(raised.value, certs.IdentityError)
    assert isinstance(raised.value, csr.CsrError)
    assert message in str(raised.value)


def test_sign_csr_rejects_foreign_trust_domain(authority: ca.CertificateAuthority) -> None:
    foreign = spiffe.SpiffeId.parse("spiffe://other.domain/ns/shop/sa/web")
    with pytest.raises(certs.TrustDomainMismatchError) as raised:
        authority.sign_csr(
            csr.build_csr(csr.generate_key(), foreign), identity=foreign, ttl=TTL, now=NOW
        )
    assert "other.domain" in str(raised.value)
    assert "'cluster.local'" in str(raised.value)


@pytest.mark.parametrize(
    ("ttl", "now"),
    [
        (datetime.timedelta(0), NOW),
        (datetime.timedelta(seconds=-5), NOW),
        (TTL, NOW.replace(tzinfo=None)),
    ],
    ids=["zero-ttl", "negative-ttl", "naive-time"],
)
def test_sign_csr_rejects_bad_arguments(
    authority: ca.CertificateAuthority, ttl: datetime.timedelta, now: datetime.datetime
) -> None:
    with pytest.raises(ca.CaError):
        authority.sign_csr(csr.build_csr(csr.generate_key(), WEB), identity=WEB, ttl=ttl, now=now)


def test_sign_csr_refuses_after_root_expiry() -> None:
    short = ca.CertificateAuthority.generate(
        "cluster.local", now=NOW, validity=datetime.timedelta(hours=1)
    )
    with pytest.raises(ca.CaError, match="expired"):
        short.sign_csr(
            csr.build_csr(csr.generate_key(), WEB),
            identity=WEB,
            ttl=TTL,
            now=NOW + datetime.timedelta(hours=2),
        )


def test_build_csr_names_identity() -> None:
    request = csr.parse_csr(csr.build_csr(csr.generate_key(), WEB))
    assert request.identity == WEB
    assert isinstance(request.public_key.curve, ec.SECP256R1)


# -- loading and persisting ------------------------------------------------------------------


def _key_pem(directory: pathlib.Path) -> bytes:
    return (directory / "root-key.pem").read_bytes()


def test_load_or_create_creates_then_loads(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "ca"
    first = ca.CertificateAuthority.load_or_create(str(directory), "cluster.local", NOW)
    key_mode = stat.S_IMODE(os.stat(directory / "root-key.pem").st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert (directory / "root-cert.pem").read_bytes() == first.root_pem
    assert sorted(p.name for p in directory.iterdir()) == ["root-cert.pem", "root-key.pem"]

    second = ca.CertificateAuthority.load_or_create(str(directory), "cluster.local", NOW)
    assert second.root_pem == first.root_pem
    # The loaded CA signs leaves that chain to the same root.
    leaf = _sign(second, WEB)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(first.root_pem))


def test_from_pem_roundtrip(tmp_path: pathlib.Path) -> None:
    made = ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    loaded = ca.CertificateAuthority.from_pem(made.root_pem, _key_pem(tmp_path))
    assert loaded.root_pem == made.root_pem
    assert loaded.trust_domain == "cluster.local"


def test_from_pem_rejects_mismatched_key(tmp_path: pathlib.Path) -> None:
    made = ca.CertificateAuthority.load_or_create(str(tmp_path / "a"), "cluster.local", NOW)
    ca.CertificateAuthority.load_or_create(str(tmp_path / "b"), "cluster.local", NOW)
    with pytest.raises(ca.CaError, match="do not match"):
        ca.CertificateAuthority.from_pem(made.root_pem, _key_pem(tmp_path / "b"))


def test_from_pem_rejects_leaf_as_ca(
    authority: ca.CertificateAuthority, tmp_path: pathlib.Path
) -> None:
    key = csr.generate_key()
    leaf_pem = authority.sign_csr(csr.build_csr(key, WEB), identity=WEB, ttl=TTL, now=NOW)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ca.CaError, match="not a CA"):
        ca.CertificateAuthority.from_pem(leaf_pem, key_pem)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("root-cert.pem", b"-----BEGIN CERTIFICATE-----\nnope\n", "not a PEM certificate"),
        ("root-key.pem", b"garbage", "not an unencrypted PEM private key"),
        ("root-cert.pem", b"", "not a PEM certificate"),
    ],
    ids=["corrupt-cert", "corrupt-key", "empty-cert"],
)
def test_load_or_create_never_replaces_corrupt_files(
    tmp_path: pathlib.Path, file: str, content: bytes, message: str
) -> None:
    ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    (tmp_path / file).write_bytes(content)
    with pytest.raises(ca.CaFileError) as raised:
        ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    assert raised.value.path == str(tmp_path / file)
    assert str(tmp_path / file) in str(raised.value)
    assert message in str(raised.value)
    assert (tmp_path / file).read_bytes() == content


@pytest.mark.parametrize("missing", ["root-cert.pem", "root-key.pem"])
def test_load_or_create_refuses_half_a_ca(tmp_path: pathlib.Path, missing: str) -> None:
    ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    (tmp_path / missing).unlink()
    with pytest.raises(ca.CaFileError, match="missing while") as raised:
        ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    assert raised.value.path == str(tmp_path / missing)
    assert not (tmp_path / missing).exists()


def test_load_or_create_refuses_foreign_trust_domain(tmp_path: pathlib.Path) -> None:
    ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", NOW)
    with pytest.raises(ca.CaFileError, match=r"'cluster\.local', configured 'other\.domain'"):
        ca.CertificateAuthority.load_or_create(str(tmp_path), "other.domain", NOW)
