"""The mesh certificate authority: a self-signed ECDSA P-256 root that signs workload leaves.

Leaves follow the SPIFFE X.509-SVID profile as Istio issues it: empty subject, one critical URI
SAN, serverAuth + clientAuth, not a CA. `sign_csr` copies only the public key from the CSR; every
other field comes from here, so a CSR cannot smuggle in names or extensions. Both the root and the
leaves pass `openssl verify -x509_strict`.

Who may ask for which identity is not decided here (see controller/ca): `sign_csr` only checks
that the CSR is well formed and names the identity being issued, in this CA's trust domain.
"""

from __future__ import annotations

import datetime
import os
import tempfile

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.identity import certs, csr, spiffe

ROOT_COMMON_NAME = "ambient-mesh root CA"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
DEFAULT_ROOT_VALIDITY = datetime.timedelta(days=3650)
# Leaves start a little in the past so a peer whose clock runs behind still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=1)


class CaError(certs.IdentityError):
    """The CA cannot be built, loaded or asked to sign as requested."""


class CaFileError(CaError):
    """A CA file on disk is missing, unreadable or corrupt; `path` names it."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"CA file {path}: {problem}")
        self.path = path
        self.problem = problem


class CertificateAuthority:
    """A root certificate and its key. Immutable after construction."""

    __slots__ = ("_aki", "_cert", "_key", "_root_pem", "_trust_domain")

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        """Prefer `generate`, `from_pem` or `load_or_create`; this trusts its arguments."""
        self._cert = cert
        self._key = key
        self._root_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._trust_domain = _trust_domain_of(cert)
        self._aki = _authority_key_id(cert)

    def __repr__(self) -> str:
        return f"CertificateAuthority(trust_domain={self._trust_domain!r})"

    @property
    def root_pem(self) -> bytes:
        return self._root_pem

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @classmethod
    def generate(
        cls,
        trust_domain: str,
        *,
        now: datetime.datetime,
        validity: datetime.timedelta = DEFAULT_ROOT_VALIDITY,
    ) -> CertificateAuthority:
        """A fresh self-signed root for `trust_domain`."""
        _check_trust_domain(trust_domain)
        _check_aware(now)
        if validity <= datetime.timedelta(0):
            raise CaError(f"root validity must be positive, got {validity}")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Load a root; checks it is a CA certificate whose public key is `key_pem`'s."""
        cert, key = _parse_root_cert(cert_pem), _parse_root_key(key_pem)
        _check_pair(cert, key)
        return cls(cert, key)

    @classmethod
    def load_or_create(
        cls, directory: str, trust_domain: str, now: datetime.datetime
    ) -> CertificateAuthority:
        """Load `directory`/root-{cert,key}.pem, or create both if neither exists.

        Never replaces what is there: a corrupt, half-present or foreign-domain CA is an error,
        because silently minting a new root would cut every workload off from its peers.
        """
        cert_path = os.path.join(directory, ROOT_CERT_FILE)
        key_path = os.path.join(directory, ROOT_KEY_FILE)
        has_cert, has_key = os.path.exists(cert_path), os.path.exists(key_path)
        if has_cert != has_key:
            present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
            raise CaFileError(missing, f"missing while {present} exists; restore it or remove both")
        if has_cert:
            try:
                cert = _parse_root_cert(_read(cert_path))
            except CaError as exc:
                raise CaFileError(cert_path, str(exc)) from exc
            try:
                key = _parse_root_key(_read(key_path))
            except CaError as exc:
                raise CaFileError(key_path, str(exc)) from exc
            try:
                _check_pair(cert, key)
            except CaError as exc:
                raise CaFileError(cert_path, f"{exc} (key {key_path})") from exc
            ca = cls(cert, key)
            if ca.trust_domain != trust_domain:
                raise CaFileError(
                    cert_path,
                    f"root is for trust domain {ca.trust_domain!r}, configured {trust_domain!r}",
                )
            return ca

        ca = cls.generate(trust_domain, now=now)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key_pem = ca._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first: a crash in between leaves a key without a cert, which the check above
        # reports instead of regenerating.
        _write_new_file(key_path, key_pem, 0o600)
        _write_new_file(cert_path, ca.root_pem, 0o644)
        return ca

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        identity: spiffe.SpiffeId,
        ttl: datetime.timedelta,
        now: datetime.datetime,
    ) -> bytes:
        """Issue a leaf for `identity` over the CSR's key; returns the leaf PEM.

        Raises a csr.CsrError subclass for a bad CSR (including one naming another identity),
        certs.TrustDomainMismatchError for an identity outside this CA's domain, CaError else.
        """
        _check_aware(now)
        if ttl <= datetime.timedelta(0):
            raise CaError(f"certificate TTL must be positive, got {ttl}")
        if identity.trust_domain != self._trust_domain:
            raise certs.TrustDomainMismatchError(
                self._trust_domain, identity, "this CA does not issue the identity"
            )
        request = csr.parse_csr(csr_pem)
        if request.identity != identity:
            raise csr.CsrIdentityMismatchError(expected=identity, got=request.identity)

        # A leaf must not outlive the root that vouches for it.
        not_after = min(now + ttl, self._cert.not_valid_after_utc)
        if not_after <= now:
            raise CaError(f"CA root expired at {self._cert.not_valid_after_utc.isoformat()}")
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(request.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            # Critical because the subject is empty (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False
            )
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM)


def _parse_root_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CaError(f"CA certificate is not a PEM certificate: {exc}") from exc
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError("CA certificate has no basicConstraints extension") from None
    except ValueError as exc:
        raise CaError(f"CA certificate has malformed extensions: {exc}") from exc
    if not constraints.ca:
        raise CaError("CA certificate is not a CA (basicConstraints CA:FALSE)")
    _trust_domain_of(cert)
    return cert


def _parse_root_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, exceptions.UnsupportedAlgorithm) as exc:
        raise CaError(f"CA key is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError("CA key must be ECDSA P-256")
    return key


def _check_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CaError("CA certificate and key do not match")


def _authority_key_id(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Point at the root's own SKI (whatever method made it) so path building can match them.
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CaError("CA certificate key is not ECDSA")
    return key


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_trust_domain(trust_domain: str) -> None:
    if not trust_domain:
        raise CaError("trust domain is empty")
    # SpiffeId owns the trust-domain syntax; borrow it rather than copy its regex.
    try:
        spiffe.SpiffeId.for_workload("default", trust_domain=trust_domain)
    except spiffe.InvalidSpiffeIdError:
        raise CaError(f"invalid trust domain {trust_domain!r}") from None


def _check_aware(now: datetime.datetime) -> None:
    if now.tzinfo is None:
        raise CaError(f"time must be timezone-aware, got naive {now.isoformat()}")


def _trust_domain_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(names) != 1:
        raise CaError("CA certificate subject must have exactly one O (the trust domain)")
    value = names[0].value
    trust_domain = value if isinstance(value, str) else value.decode("utf-8", "replace")
    _check_trust_domain(trust_domain)
    return trust_domain


def _public_der(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b"not-ec"
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CaFileError(path, f"cannot read: {exc.strerror}") from exc


def _write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create `path` atomically with `mode`; fails if it already exists (no clobbering).

    The data goes to a temporary file in the same directory (created with `mode` from the
    start, so the key is never briefly world-readable), is fsynced, then hard-linked into place.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CaFileError(path, "appeared while the CA was being created") from None
    finally:
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
