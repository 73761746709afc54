"""Workload certificates for tests that run real TLS: issued by a test CA exactly as the
controller's CA issues them, and a certificate source that serves one of them."""

from __future__ import annotations

import datetime
import ssl

from meshcore.identity import ca as ca_mod
from meshcore.identity import certs, csr, spiffe, tls

TTL = datetime.timedelta(hours=1)


def issue(
    authority: ca_mod.CertificateAuthority,
    identity: spiffe.SpiffeId,
    *,
    now: datetime.datetime | None = None,
) -> certs.WorkloadCertificate:
    """A fresh key and a leaf for `identity`, valid from `now` (default: now) for `TTL`."""
    key = csr.generate_key()
    issued_at = now or datetime.datetime.now(datetime.UTC)
    leaf = authority.sign_csr(
        csr.build_csr(key, identity), identity=identity, ttl=TTL, now=issued_at
    )
    return certs.build_workload_certificate(
        identity,
        key,
        [leaf.decode(), authority.root_pem.decode()],
        trusted_root_pem=authority.root_pem,
    )


class StaticServerCerts:
    """ztunnel's certificate source for inbound, serving one already-issued certificate."""

    def __init__(self, cert: certs.WorkloadCertificate) -> None:
        self._identity = cert.identity
        self._context = tls.server_context(cert)

    async def fetch_server_context(self, identity: spiffe.SpiffeId) -> ssl.SSLContext:
        assert identity == self._identity
        return self._context
