"""Real TLS 1.3 handshakes on 127.0.0.1 between tls.server_context and tls.client_context."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshcore.identity import ca, certs, csr, spiffe, tls
from tests.direct import workload_certs

TTL = datetime.timedelta(hours=1)
SERVER = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def authority() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.generate("cluster.local", now=_now())


@dataclasses.dataclass
class Accepted:
    """What the server saw of each connection that reached the handler."""

    identities: list[spiffe.SpiffeId] = dataclasses.field(default_factory=list)
    alpn: list[bool] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(server_cert: certs.WorkloadCertificate) -> AsyncIterator[tuple[int, Accepted]]:
    """An HBONE-like server: checks the client's trust domain, then echoes its identity."""
    accepted = Accepted()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        ssl_object = writer.get_extra_info("ssl_object")
        accepted.alpn.append(tls.alpn_ok(ssl_object))
        try:
            peer = tls.check_peer_trust_domain(ssl_object, SERVER.trust_domain)
        except certs.IdentityError as exc:
            accepted.refused.append(str(exc))
            writer.close()
            return
        accepted.identities.append(peer)
        writer.write(peer.uri.encode() + b"\n")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server_context(server_cert))
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def _connect(
    port: int, client_cert: certs.WorkloadCertificate
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client_context(client_cert), server_hostname=None
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


def _assert_no_tasks_left() -> None:
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_mutual_tls_reads_both_identities(authority: ca.CertificateAuthority, runner: str) -> None:
    server_cert, client_cert = (
        workload_certs.issue(authority, SERVER),
        workload_certs.issue(authority, CLIENT),
    )

    async def main() -> None:
        async with serving(server_cert) as (port, accepted):
            reader, writer = await _connect(port, client_cert)
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
            assert tls.alpn_ok(ssl_object)
            assert ssl_object.selected_alpn_protocol() == "h2"
            assert tls.check_server_identity(ssl_object, {SERVER, CLIENT}) == SERVER
            assert tls.peer_identity(ssl_object) == SERVER
            # The server read our identity from our certificate and echoed it.
            assert await reader.readline() == CLIENT.uri.encode() + b"\n"
            await _close(writer)
            assert accepted.identities == [CLIENT]
            assert accepted.alpn == [True]
        _assert_no_tasks_left()

    RUNNERS[runner](main())


def test_client_cert_from_another_ca_is_refused(authority: ca.CertificateAuthority) -> None:
    rogue = ca.CertificateAuthority.generate("cluster.local", now=_now())
    server_cert, rogue_client = (
        workload_certs.issue(authority, SERVER),
        workload_certs.issue(rogue, CLIENT),
    )
    # The rogue client trusts our root, so only the server's check can refuse it.
    rogue_client = dataclasses.replace(rogue_client, root_pem=authority.root_pem)

    async def main() -> None:
        async with serving(server_cert) as (port, accepted):
            reader, writer = await _connect(port, rogue_client)
            # TLS 1.3: the client's handshake "succeeds" before the server has judged its
            # certificate; the refusal shows up on the first read.
            try:
                first = await asyncio.wait_for(reader.read(100), timeout=10)
            except (ssl.SSLError, ConnectionError):
                first = b""  # an alert instead of a plain EOF is a refusal too
            assert first == b""
            await _close(writer)
            assert accepted.identities == []
            assert accepted.alpn == []  # the handler never ran

    asyncio.run(main())


def test_client_without_certificate_is_refused(authority: ca.CertificateAuthority) -> None:
    server_cert = workload_certs.issue(authority, SERVER)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=authority.root_pem.decode())
    anonymous.set_alpn_protocols(["h2"])

    async def main() -> None:
        async with serving(server_cert) as (port, accepted):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=anonymous, server_hostname=None
            )
            try:
                first = await asyncio.wait_for(reader.read(100), timeout=10)
            except (ssl.SSLError, ConnectionError):
                first = b""
            assert first == b""
            await _close(writer)
            assert accepted.alpn == []  # the handler never ran

    asyncio.run(main())


def test_server_cert_from_another_ca_is_refused(authority: ca.CertificateAuthority) -> None:
    rogue = ca.CertificateAuthority.generate("cluster.local", now=_now())
    rogue_server = dataclasses.replace(
        workload_certs.issue(rogue, SERVER), root_pem=authority.root_pem
    )
    client_cert = workload_certs.issue(authority, CLIENT)

    async def main() -> None:
        async with serving(rogue_server) as (port, accepted):
            with pytest.raises(ssl.SSLCertVerificationError):
                await _connect(port, client_cert)
            assert accepted.identities == []

    asyncio.run(main())


def test_unexpected_server_identity_is_refused(authority: ca.CertificateAuthority) -> None:
    server_cert, client_cert = (
        workload_certs.issue(authority, SERVER),
        workload_certs.issue(authority, CLIENT),
    )
    other = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cache")

    async def main() -> None:
        async with serving(server_cert) as (port, _):
            _, writer = await _connect(port, client_cert)
            ssl_object = writer.get_extra_info("ssl_object")
            with pytest.raises(certs.IdentityMismatchError) as raised:
                tls.check_server_identity(ssl_object, {other})
            assert raised.value.got == SERVER
            assert other.uri in str(raised.value)
            assert SERVER.uri in str(raised.value)
            with pytest.raises(certs.IdentityMismatchError):
                tls.check_server_identity(ssl_object, set())
            await _close(writer)

    asyncio.run(main())


def test_other_trust_domain_from_same_ca_is_refused(tmp_path: pathlib.Path) -> None:
    # One root (same key, same cert) that has signed a leaf in another trust domain: the chain
    # verifies, so only check_peer_trust_domain stands between it and the server.
    authority = ca.CertificateAuthority.load_or_create(str(tmp_path), "cluster.local", _now())
    root_key = serialization.load_pem_private_key(
        (tmp_path / "root-key.pem").read_bytes(), password=None
    )
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    foreign = spiffe.SpiffeId.parse("spiffe://evil.domain/ns/shop/sa/web")
    key = csr.generate_key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.root_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=1))
        .not_valid_after(_now() + TTL)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(foreign.uri)]),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                authority.root_certificate.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier
                ).value
            ),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    foreign_cert = certs.build_workload_certificate(
        foreign,
        key,
        [leaf.public_bytes(serialization.Encoding.PEM), authority.root_pem],
        trusted_root_pem=authority.root_pem,
    )
    server_cert = workload_certs.issue(authority, SERVER)

    async def main() -> None:
        async with serving(server_cert) as (port, accepted):
            reader, writer = await _connect(port, foreign_cert)
            assert await reader.read() == b""  # the server closed without serving
            await _close(writer)
            assert accepted.identities == []
            assert len(accepted.refused) == 1
            assert "evil.domain" in accepted.refused[0]
            assert "'cluster.local'" in accepted.refused[0]

    asyncio.run(main())


def _memfds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/memfd:mesh-tls"):
                found.append(target)
    return found


def _files_containing(roots: list[pathlib.Path], needle: bytes, since: float) -> list[str]:
    hits = []
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if st.st_mtime >= since and st.st_size < (1 << 20):
                        with open(path, "rb") as f:
                            if needle in f.read():
                                hits.append(path)
    return hits


def test_private_key_never_touches_disk(authority: ca.CertificateAuthority) -> None:
    since = time.time() - 1
    cert = workload_certs.issue(authority, SERVER)
    before = _memfds()
    contexts = [tls.server_context(cert), tls.client_context(cert)]
    assert len(contexts) == 2
    # The in-memory files are closed as soon as OpenSSL has read them.
    assert _memfds() == before == []
    # The key's base64 body appears in no file written during the test, in /tmp or the cwd.
    body = b"\n".join(cert.key_pem().splitlines()[1:3])
    assert len(body) > 60
    assert _files_containing([pathlib.Path("/tmp"), pathlib.Path.cwd()], body, since) == []
