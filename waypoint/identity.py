"""The waypoint's one certificate: its service account's SPIFFE identity, from the controller's
CA, renewed at half its life; the TLS contexts for both directions follow it.

A failed renewal keeps the current certificate while it is valid and retries with a backoff;
the listener and the connector ask for the current contexts on every new connection.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl

from meshcore import log
from meshcore.identity import ca_client, certs, csr, spiffe, tls

logger = logging.getLogger("waypoint.identity")

RETRY_MIN, RETRY_MAX = 0.5, 30.0


class WaypointIdentity:
    def __init__(
        self, client: ca_client.CaClient, identity: spiffe.SpiffeId, ttl: datetime.timedelta
    ) -> None:
        self.identity = identity
        self._client = client
        self._ttl_seconds = int(ttl.total_seconds())
        self._cert: certs.WorkloadCertificate | None = None
        self._server: ssl.SSLContext | None = None
        self._client_context: ssl.SSLContext | None = None
        self.ready = asyncio.Event()

    @property
    def certificate(self) -> certs.WorkloadCertificate | None:
        return self._cert

    def server_context(self) -> ssl.SSLContext:
        assert self._server is not None, "no certificate yet: wait for `ready`"
        return self._server

    def client_context(self) -> ssl.SSLContext:
        assert self._client_context is not None, "no certificate yet: wait for `ready`"
        return self._client_context

    async def fetch(self) -> certs.WorkloadCertificate:
        key = csr.generate_key()
        chain = await self._client.fetch_certificate(
            self.identity, csr.build_csr(key, self.identity), self._ttl_seconds
        )
        cert = certs.build_workload_certificate(self.identity, key, chain, trusted_root_pem=None)
        self._server = tls.server_context(cert)
        self._client_context = tls.client_context(cert)
        self._cert = cert
        self.ready.set()
        logger.info(
            "waypoint certificate installed",
            extra=log.fields(identity=self.identity.uri, expires=cert.not_after.isoformat()),
        )
        return cert

    async def run(self) -> None:
        """Fetch, then renew at half-life, until cancelled."""
        delay = RETRY_MIN
        while True:
            try:
                cert = await self.fetch()
            except (ca_client.CaRequestError, certs.IdentityError) as exc:
                logger.warning(
                    "waypoint certificate not obtained",
                    extra=log.fields(identity=self.identity.uri, error=str(exc), retry_in=delay),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            now = datetime.datetime.now(datetime.UTC)
            await asyncio.sleep(max(1.0, (cert.not_after - now).total_seconds() / 2))
