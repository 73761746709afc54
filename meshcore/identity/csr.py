"""Keys and certificate signing requests for workload identities (ECDSA P-256, SHA-256).

`build_csr` is the client side (ztunnel); `parse_csr` is the CA side and checks everything the CA
relies on before it looks at who is asking: the signature (proof of possession), the key type,
and exactly one URI SAN holding a SPIFFE ID. Anything else in the CSR (subject, other SANs,
extensions) is ignored: the CA copies only the public key and sets every other field itself.
"""

from __future__ import annotations

import dataclasses

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.identity import certs, spiffe

# A P-256 CSR with one SAN is under 1 KiB; refuse to parse anything absurdly large.
MAX_CSR_BYTES = 16 << 10


class CsrError(certs.IdentityError):
    """A certificate signing request is unusable; the message names the problem."""


class CsrFormatError(CsrError):
    """Not a PEM-encoded PKCS#10 request."""


class CsrSignatureError(CsrError):
    """The request's self-signature does not verify (no proof of key possession)."""


class CsrKeyError(CsrError):
    """The request's public key is not ECDSA P-256."""


class CsrSubjectAltNameError(CsrError):
    """The request does not carry exactly one URI SAN holding a SPIFFE ID."""


class CsrIdentityMismatchError(CsrError):
    """The request names another identity than the one being issued."""

    def __init__(self, expected: spiffe.SpiffeId, got: spiffe.SpiffeId) -> None:
        super().__init__(f"CSR is for {got}, but the requested identity is {expected}")
        self.expected = expected
        self.got = got


@dataclasses.dataclass(frozen=True, slots=True)
class SigningRequest:
    """A CSR that passed `parse_csr`'s checks."""

    request: x509.CertificateSigningRequest
    identity: spiffe.SpiffeId
    public_key: ec.EllipticCurvePublicKey


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: spiffe.SpiffeId) -> bytes:
    """A PEM CSR with an empty subject and `identity` as its only (URI) SAN."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def parse_csr(csr_pem: bytes) -> SigningRequest:
    """Parse and check a PEM CSR; raises a CsrError subclass naming what is wrong."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrFormatError(f"CSR is {len(csr_pem)} bytes, more than {MAX_CSR_BYTES}")
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CsrFormatError(f"CSR is not a PEM certificate request: {exc}") from exc

    # Each accessor below parses lazily and may raise ValueError on malformed DER.
    try:
        signature_ok = request.is_signature_valid
    except (ValueError, exceptions.UnsupportedAlgorithm) as exc:
        raise CsrSignatureError(f"CSR signature cannot be checked: {exc}") from exc
    if not signature_ok:
        raise CsrSignatureError("CSR signature is invalid")

    try:
        public_key = request.public_key()
    except (ValueError, exceptions.UnsupportedAlgorithm) as exc:
        raise CsrKeyError(f"CSR public key cannot be read: {exc}") from exc
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrKeyError(f"CSR key must be ECDSA P-256, got {type(public_key).__name__}")
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise CsrKeyError(f"CSR key must be ECDSA P-256, got curve {public_key.curve.name}")

    return SigningRequest(request=request, identity=_identity_of(request), public_key=public_key)


def _identity_of(request: x509.CertificateSigningRequest) -> spiffe.SpiffeId:
    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrSubjectAltNameError("CSR has no subjectAltName extension") from None
    except (ValueError, x509.UnsupportedGeneralNameType, x509.DuplicateExtension) as exc:
        raise CsrSubjectAltNameError(f"CSR extensions are malformed: {exc}") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CsrSubjectAltNameError(f"CSR must have exactly one URI SAN, has {len(uris)}")
    try:
        return spiffe.SpiffeId.parse(uris[0])
    except spiffe.InvalidSpiffeIdError as exc:
        raise CsrSubjectAltNameError(f"CSR URI SAN is not a SPIFFE ID: {exc}") from exc
