"""TLS contexts for HBONE (spec section 2) and the identity checks done after the handshake.

Both sides: TLS 1.3 only, ALPN h2, a certificate chaining to the mesh root is required.
SPIFFE certificates carry no DNS names, so hostname checking is off and identity is checked
after the handshake: the client calls `check_server_identity` with the SANs it expects, the
server calls `check_peer_trust_domain` (it checks no specific identity; that is RBAC's job).

Python's ssl module can only load a private key from a file path. The key must never touch a
disk, so it goes through an anonymous in-memory file (memfd) opened via /proc/self/fd, closed as
soon as OpenSSL has read it.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Collection, Iterator

from meshcore.identity import certs, spiffe

ALPN_H2 = "h2"


def server_context(cert: certs.WorkloadCertificate) -> ssl.SSLContext:
    """What an inbound (15008) listener presents for `cert.identity`; requires a client cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, cert)
    # Tickets would let a client resume without presenting its certificate again; ztunnel
    # disables resumption, and so do we.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


def client_context(cert: certs.WorkloadCertificate) -> ssl.SSLContext:
    """What an outbound HBONE connection presents. Use with server_hostname=None (no SNI)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # SPIFFE certs have no DNS SAN: identity is checked with check_server_identity instead.
    context.check_hostname = False
    _configure(context, cert)
    return context


def _configure(context: ssl.SSLContext, cert: certs.WorkloadCertificate) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    context.load_verify_locations(cadata=cert.root_pem.decode("ascii"))
    # One file holding chain then key: load_cert_chain reads the key from certfile too.
    with _memory_file(b"".join(cert.chain_pem) + cert.key_pem()) as path:
        context.load_cert_chain(certfile=path)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that lives only in this process's memory until the block ends."""
    fd = os.memfd_create("mesh-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> spiffe.SpiffeId:
    """The SPIFFE ID of the verified peer certificate of a finished handshake.

    Uses the parsed form of getpeercert(), which is empty unless OpenSSL verified the chain,
    so an identity is never read from an unverified certificate.
    """
    peer = ssl_object.getpeercert()
    if not peer:
        raise certs.PeerIdentityError("peer presented no verified certificate")
    san = peer.get("subjectAltName", ())
    uris = [
        value
        for kind, value in (san if isinstance(san, tuple) else ())
        if kind == "URI" and isinstance(value, str)
    ]
    if len(uris) != 1:
        raise certs.PeerIdentityError(
            f"peer certificate must have exactly one URI SAN, has {len(uris)}"
        )
    try:
        return spiffe.SpiffeId.parse(uris[0])
    except spiffe.InvalidSpiffeIdError as exc:
        raise certs.PeerIdentityError(f"peer URI SAN is not a SPIFFE ID: {exc}") from exc


def check_server_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Collection[spiffe.SpiffeId]
) -> spiffe.SpiffeId:
    """Client side: the server must be one of `expected` (an empty set matches nothing)."""
    got = peer_identity(ssl_object)
    if got not in expected:
        raise certs.IdentityMismatchError(expected, got)
    return got


def check_peer_trust_domain(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str
) -> spiffe.SpiffeId:
    """Server side: the client's certificate must be in our own trust domain (spec section 2)."""
    got = peer_identity(ssl_object)
    if got.trust_domain != trust_domain:
        raise certs.TrustDomainMismatchError(trust_domain, got, "peer refused")
    return got


def alpn_ok(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bool:
    return ssl_object.selected_alpn_protocol() == ALPN_H2
