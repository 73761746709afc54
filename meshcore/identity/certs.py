"""Workload certificates: the checks a CA response must pass and the SPIFFE ID of a certificate.

Invariants of a `WorkloadCertificate` (enforced by `build_workload_certificate`, the only
constructor callers should use): the leaf's single URI SAN is `identity`, the leaf's public key is
`key`'s, and leaf + intermediates chain up to `root_pem`, valid at the time of the check. The
private key lives only in this process's memory.

This module also holds the root of the identity errors (`IdentityError`) and the peer-identity
errors shared with `meshcore.identity.tls`.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from collections.abc import Collection, Sequence

from cryptography import exceptions, utils, x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from meshcore.identity import errors as identity_errors
from meshcore.identity import spiffe

IdentityError = identity_errors.IdentityError


class PeerIdentityError(IdentityError):
    """A certificate (ours from the CA, or a peer's from a handshake) has no usable SPIFFE ID."""


class IdentityMismatchError(IdentityError):
    """A certificate names another identity than the one(s) expected."""

    def __init__(self, expected: Collection[spiffe.SpiffeId], got: spiffe.SpiffeId) -> None:
        wanted = ", ".join(sorted(str(e) for e in expected)) or "<none>"
        super().__init__(f"identity mismatch: expected one of [{wanted}], got {got}")
        self.expected = frozenset(expected)
        self.got = got


class TrustDomainMismatchError(IdentityError):
    """An identity belongs to another trust domain than ours."""

    def __init__(self, expected: str, got: spiffe.SpiffeId, what: str) -> None:
        super().__init__(f"{what}: {got} is not in trust domain {expected!r}")
        self.expected = expected
        self.got = got


class ChainError(IdentityError):
    """A certificate chain is malformed or does not verify."""


class KeyMismatchError(ChainError):
    """The leaf certificate does not carry the public key of the key we generated."""


class UntrustedRootError(ChainError):
    """The chain ends in a root other than the trusted one."""


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A verified leaf certificate for one identity with its private key and trust anchor."""

    identity: spiffe.SpiffeId
    # Leaf first, then intermediates; never the root. PEM is left out of repr to keep logs short.
    chain_pem: tuple[bytes, ...] = dataclasses.field(repr=False)
    root_pem: bytes = dataclasses.field(repr=False)
    key: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False, compare=False)
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial_number: int

    @property
    def refresh_at(self) -> datetime.datetime:
        """Half-life, as ztunnel and istio-agent do: renew well before expiry."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8; for in-memory use only (see tls.py), never for a file."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def split_pem_chain(pems: Sequence[str | bytes]) -> list[x509.Certificate]:
    """Parse a CA response: one PEM per element (an element may also hold several)."""
    result: list[x509.Certificate] = []
    for index, pem in enumerate(pems):
        data = pem.encode("utf-8", "replace") if isinstance(pem, str) else pem
        try:
            with warnings.catch_warnings():
                # What cryptography only warns about (a serial number that is not positive)
                # it will refuse in a later release; a CA that sends it is refused now.
                warnings.simplefilter("error", utils.CryptographyDeprecationWarning)
                result.extend(x509.load_pem_x509_certificates(data))
        except utils.CryptographyDeprecationWarning as exc:
            raise ChainError(f"cert_chain[{index}] breaks RFC 5280: {exc}") from exc
        except (ValueError, x509.InvalidVersion) as exc:
            raise ChainError(f"cert_chain[{index}] is not a PEM certificate: {exc}") from exc
    if not result:
        raise ChainError("certificate chain is empty")
    return result


def spiffe_id_of(cert: x509.Certificate) -> spiffe.SpiffeId:
    """The SPIFFE ID in the certificate's only URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerIdentityError("certificate has no subjectAltName extension") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # A malformed extension is only reported when it is read (as in csr.py).
        raise PeerIdentityError(f"certificate has a malformed extension: {exc}") from exc
    return _spiffe_id_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))


def _spiffe_id_from_uris(uris: Sequence[str]) -> spiffe.SpiffeId:
    if len(uris) != 1:
        raise PeerIdentityError(f"certificate must have exactly one URI SAN, has {len(uris)}")
    try:
        return spiffe.SpiffeId.parse(uris[0])
    except spiffe.InvalidSpiffeIdError as exc:
        raise PeerIdentityError(f"certificate URI SAN is not a SPIFFE ID: {exc}") from exc


def build_workload_certificate(
    identity: spiffe.SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    response_chain: Sequence[str | bytes],
    *,
    trusted_root_pem: bytes | None,
    now: datetime.datetime | None = None,
) -> WorkloadCertificate:
    """Check a CA response for `identity` and bundle it with `key`; fail closed on any doubt.

    `response_chain` is leaf first, root last. If `trusted_root_pem` (one or more PEM roots) is
    given, the response's root must be one of them; otherwise the response's root is the anchor
    (the CA channel is already authenticated). `now` is the verification time (default: the
    system clock); callers with an injected clock pass it.
    """
    certs = split_pem_chain(response_chain)
    if len(certs) < 2:
        raise ChainError(f"certificate chain must hold a leaf and a root, got {len(certs)} cert")
    leaf, intermediates, root = certs[0], certs[1:-1], certs[-1]

    got = spiffe_id_of(leaf)
    if got != identity:
        raise IdentityMismatchError([identity], got)
    try:
        leaf_key = leaf.public_key()
    except (ValueError, exceptions.UnsupportedAlgorithm) as exc:
        raise KeyMismatchError(
            f"leaf certificate for {identity} has an unusable key: {exc}"
        ) from exc
    if _spki(leaf_key) != _spki(key.public_key()):
        raise KeyMismatchError(f"leaf certificate for {identity} does not carry our public key")

    if trusted_root_pem is not None:
        trusted = split_pem_chain([trusted_root_pem])
        if root not in trusted:
            raise UntrustedRootError(f"certificate chain for {identity} ends in an untrusted root")
    at = now if now is not None else datetime.datetime.now(datetime.UTC)
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([root]))
            .time(at)
            .build_client_verifier()
        )
        verifier.verify(leaf, intermediates)
    except (verification.VerificationError, ValueError) as exc:
        raise ChainError(f"certificate chain for {identity} does not verify: {exc}") from exc

    return WorkloadCertificate(
        identity=identity,
        chain_pem=tuple(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *intermediates)),
        root_pem=root.public_bytes(serialization.Encoding.PEM),
        key=key,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial_number=leaf.serial_number,
    )


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""  # never equal to an EC key's encoding
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
