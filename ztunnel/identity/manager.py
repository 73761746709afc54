"""One certificate per local workload identity, fetched from the CA and renewed at half-life.

Invariants:
- At most one CA request per identity is in flight; concurrent callers join it (no storms).
- Every request uses a fresh key generated here; private keys never leave this process.
- A returned chain is installed only after certs.build_workload_certificate accepted it (leaf SAN
  is the identity, leaf key is ours, chain verifies to the root).
- A still-valid certificate is kept, and served, while renewals fail and back off
  (0.5 s doubling to 150 s); only an expired one is dropped.
- An identity is renewed in the background while `acquire` outnumbers `release` (local pods use
  it). When the count drops to zero the certificate is forgotten and its worker stops. An identity
  fetched without being acquired is fetched once and refreshed only on demand.
- Every task lives in `run()`'s TaskGroup; after `close()` none is left.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import ssl
from typing import Protocol

from cryptography import x509

from meshcore import errors, log
from meshcore.identity import ca_client as client
from meshcore.identity import certs, csr, spiffe, tls

DEFAULT_TTL = datetime.timedelta(hours=24)
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 150.0

_log = logging.getLogger("ztunnel.identity")


class CertificateUnavailableError(errors.MeshError):
    """No valid certificate for `identity` can be served now; `reason` says why."""

    def __init__(self, identity: spiffe.SpiffeId, reason: str) -> None:
        super().__init__(f"no certificate for {identity}: {reason}")
        self.identity = identity
        self.reason = reason


class Clock(Protocol):
    def now(self) -> datetime.datetime:
        """The current time, timezone-aware."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def backoff_seconds(failures: int) -> float:
    """Delay before the next attempt after `failures` consecutive failures (>= 1)."""
    return min(MAX_BACKOFF_SECONDS, INITIAL_BACKOFF_SECONDS * 2.0 ** min(failures - 1, 32))


@dataclasses.dataclass(eq=False)
class _Slot:
    """Mutable per-identity state; owned by the manager, touched only on the event loop."""

    identity: spiffe.SpiffeId
    refs: int = 0
    cert: certs.WorkloadCertificate | None = None
    error: str | None = None  # why the last attempt failed; None after a success
    failures: int = 0  # consecutive
    retry_at: datetime.datetime | None = None  # no new attempt before this
    worker: asyncio.Task[None] | None = None
    # The attempt in flight (or about to start); resolved, never failed, when it ends.
    pending: asyncio.Future[None] | None = None
    client_context: ssl.SSLContext | None = None  # built for `cert`, reset when it changes
    server_context: ssl.SSLContext | None = None


class CertManager:
    """Fetches, caches and renews workload certificates; see the module invariants.

    Start `run()` as a task first (the composition root does): fetches wait until it is up.
    `trusted_root_pem`, if given, pins the roots CA responses must chain to.
    """

    def __init__(
        self,
        client: client.CaClient,
        *,
        trust_domain: str,
        ttl: datetime.timedelta = DEFAULT_TTL,
        clock: Clock,
        trusted_root_pem: bytes | None = None,
    ) -> None:
        if ttl <= datetime.timedelta(0):
            raise ValueError(f"certificate TTL must be positive, got {ttl}")
        self._client = client
        self._trust_domain = trust_domain
        self._ttl_seconds = int(ttl.total_seconds())
        self._clock = clock
        self._trusted_root_pem = trusted_root_pem
        self._slots: dict[spiffe.SpiffeId, _Slot] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()  # set once run() is up, or on close
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the background workers until close(); fetches wait for this to start."""
        if self._closed:
            return
        if self._tg is not None:
            raise RuntimeError("CertManager.run() is already running")
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for slot in self._slots.values():
                    if slot.refs > 0 and slot.worker is None:
                        self._start_worker(slot)
                self._started.set()
                await self._closing.wait()
                self._stop_all()
        finally:
            self._tg = None
            self._closed = True
            self._stop_all()
            self._started.set()
            self._stopped.set()

    async def close(self) -> None:
        """Stop every worker; waits for run() to finish if it is running."""
        self._closed = True
        self._closing.set()
        self._started.set()
        if self._tg is not None:
            await self._stopped.wait()
        self._stop_all()

    def _stop_all(self) -> None:
        for slot in self._slots.values():
            self._stop(slot)

    def _stop(self, slot: _Slot) -> None:
        if slot.worker is not None:
            slot.worker.cancel()
            slot.worker = None
        # A worker cancelled before its first step never reaches its own cleanup.
        _resolve(slot.pending)

    # -- local workloads -------------------------------------------------------------------

    def acquire(self, identity: spiffe.SpiffeId) -> None:
        """A local pod runs as `identity`: prefetch its certificate and keep it renewed."""
        if identity.trust_domain != self._trust_domain:
            raise certs.TrustDomainMismatchError(
                self._trust_domain, identity, "cannot hold a certificate"
            )
        slot = self._slots.get(identity)
        if slot is None:
            slot = self._slots[identity] = _Slot(identity)
        slot.refs += 1
        if slot.worker is None:
            self._start_worker(slot)

    def release(self, identity: spiffe.SpiffeId) -> None:
        """Undo one acquire; the last one forgets the certificate and stops its renewal."""
        slot = self._slots.get(identity)
        if slot is None or slot.refs == 0:
            raise ValueError(f"release({identity}) without a matching acquire")
        slot.refs -= 1
        if slot.refs == 0:
            del self._slots[identity]
            self._stop(slot)

    # -- lookups ---------------------------------------------------------------------------

    async def fetch_certificate(self, identity: spiffe.SpiffeId) -> certs.WorkloadCertificate:
        """The current certificate, fetching it first if there is none yet."""
        await self._started.wait()
        if identity.trust_domain != self._trust_domain:
            raise CertificateUnavailableError(
                identity, f"outside trust domain {self._trust_domain!r}"
            )
        while True:
            if self._closed:
                raise CertificateUnavailableError(identity, "certificate manager is closed")
            slot = self._slots.get(identity)
            if slot is None:
                slot = self._slots[identity] = _Slot(identity)
            now = self._clock.now()
            cert = slot.cert
            if cert is not None and cert.is_valid_at(now):
                if slot.worker is None and now >= cert.refresh_at:
                    self._start_worker(slot)  # not acquired: refresh on demand
                return cert
            if slot.pending is None or slot.pending.done():
                if slot.retry_at is not None and now < slot.retry_at:
                    # Fail fast while backing off rather than pile onto a failing CA.
                    raise CertificateUnavailableError(identity, slot.error or "backing off")
                if slot.worker is not None:
                    # Asleep until a refresh point that came too late (clock jump): wake it
                    # by starting over.
                    self._stop(slot)
                self._start_worker(slot)
            pending = slot.pending
            if pending is None or pending.done():  # run() is gone: no worker could start
                raise CertificateUnavailableError(identity, "certificate manager is not running")
            await asyncio.shield(pending)
            if self._slots.get(identity) is not slot:
                raise CertificateUnavailableError(identity, "identity released while fetching")
            cert = slot.cert
            if cert is not None and cert.is_valid_at(self._clock.now()):
                return cert
            if slot.error is not None or self._closed:
                raise CertificateUnavailableError(
                    identity, slot.error or "certificate manager is closed"
                )

    async def fetch_client_context(self, identity: spiffe.SpiffeId) -> ssl.SSLContext:
        """A TLS client context presenting `identity`'s current certificate (cached per cert)."""
        cert = await self.fetch_certificate(identity)
        slot = self._slots.get(identity)
        if slot is None or slot.cert is not cert:
            return tls.client_context(cert)
        if slot.client_context is None:
            slot.client_context = tls.client_context(cert)
        return slot.client_context

    async def fetch_server_context(self, identity: spiffe.SpiffeId) -> ssl.SSLContext:
        """A TLS server context presenting `identity`'s current certificate (cached per cert)."""
        cert = await self.fetch_certificate(identity)
        slot = self._slots.get(identity)
        if slot is None or slot.cert is not cert:
            return tls.server_context(cert)
        if slot.server_context is None:
            slot.server_context = tls.server_context(cert)
        return slot.server_context

    def states(self) -> list[dict[str, object]]:
        """The `certificates` section of /config_dump (spec section 1), sorted by identity."""
        now = self._clock.now()
        result: list[dict[str, object]] = []
        for identity in sorted(self._slots):
            slot = self._slots[identity]
            entry: dict[str, object] = {"identity": identity.uri}
            cert = slot.cert
            if cert is not None and cert.is_valid_at(now):
                entry["state"] = "Available"
                entry["certChain"] = [_dump_cert(pem) for pem in cert.chain_pem]
                entry["rootCerts"] = [_dump_cert(cert.root_pem)]
            else:
                entry["state"] = (
                    "Initializing" if slot.error is None else f"Unavailable: {slot.error}"
                )
                entry["certChain"] = []
                entry["rootCerts"] = []
            result.append(entry)
        return result

    # -- workers ---------------------------------------------------------------------------

    def _start_worker(self, slot: _Slot) -> None:
        """Start `slot`'s worker if run() is up; opens the attempt now if one is due now."""
        if self._tg is None or self._closed:
            return  # run() starts workers for acquired identities when it comes up
        if self._next_delay(slot, self._clock.now()) == 0:
            # Open the attempt before the task first runs so that concurrent callers join it.
            _open_attempt(slot)
        slot.worker = self._tg.create_task(self._work(slot), name=f"certificate {slot.identity}")

    async def _work(self, slot: _Slot) -> None:
        try:
            while True:
                delay = self._next_delay(slot, self._clock.now())
                if delay > 0:
                    await self._clock.sleep(delay)
                await self._attempt(slot, _open_attempt(slot))
                if slot.refs == 0:
                    return  # fetched on demand for an identity no local pod holds
        finally:
            if slot.worker is asyncio.current_task():
                slot.worker = None

    def _next_delay(self, slot: _Slot, now: datetime.datetime) -> float:
        if slot.retry_at is not None and now < slot.retry_at:
            return (slot.retry_at - now).total_seconds()
        if slot.cert is not None and now < slot.cert.refresh_at:
            return (slot.cert.refresh_at - now).total_seconds()
        return 0.0

    async def _attempt(self, slot: _Slot, pending: asyncio.Future[None]) -> None:
        identity = slot.identity
        try:
            cert = await self._request(identity)
        except Exception as exc:  # task boundary: any failure is logged and retried
            now = self._clock.now()
            slot.failures += 1
            delay = backoff_seconds(slot.failures)
            slot.retry_at = now + datetime.timedelta(seconds=delay)
            slot.error = str(exc) or type(exc).__name__
            if slot.cert is not None and not slot.cert.is_valid_at(now):
                self._install(slot, None)
            _log.warning(
                "certificate fetch failed",
                extra=log.fields(
                    identity=identity.uri,
                    error=slot.error,
                    failures=slot.failures,
                    retry_in_seconds=delay,
                    has_valid_certificate=slot.cert is not None,
                ),
            )
        else:
            now = self._clock.now()
            self._install(slot, cert)
            slot.failures = 0
            slot.error = None
            slot.retry_at = None
            if cert.refresh_at <= now:
                # Already due (tiny TTL or a CA clock ahead of ours): without this floor the
                # worker would ask again at once, forever.
                slot.retry_at = now + datetime.timedelta(seconds=INITIAL_BACKOFF_SECONDS)
            _log.info(
                "certificate installed",
                extra=log.fields(
                    identity=identity.uri,
                    serial=str(cert.serial_number),
                    not_after=cert.not_after.isoformat(),
                    refresh_at=cert.refresh_at.isoformat(),
                ),
            )
        finally:
            _resolve(pending)

    async def _request(self, identity: spiffe.SpiffeId) -> certs.WorkloadCertificate:
        key = csr.generate_key()  # fresh per request; never leaves this process
        chain = await self._client.fetch_certificate(
            identity, csr.build_csr(key, identity), self._ttl_seconds
        )
        return certs.build_workload_certificate(
            identity, key, chain, trusted_root_pem=self._trusted_root_pem, now=self._clock.now()
        )

    def _install(self, slot: _Slot, cert: certs.WorkloadCertificate | None) -> None:
        slot.cert = cert
        slot.client_context = None
        slot.server_context = None


def _open_attempt(slot: _Slot) -> asyncio.Future[None]:
    """The attempt callers can wait on: the open one, or a new one."""
    if slot.pending is None or slot.pending.done():
        slot.pending = asyncio.get_running_loop().create_future()
    return slot.pending


def _resolve(pending: asyncio.Future[None] | None) -> None:
    if pending is not None and not pending.done():
        pending.set_result(None)


def _dump_cert(pem: bytes) -> dict[str, object]:
    cert = x509.load_pem_x509_certificate(pem)
    return {
        "pem": base64.b64encode(pem).decode("ascii"),
        "serialNumber": str(cert.serial_number),
        "validFrom": _rfc3339(cert.not_valid_before_utc),
        "expirationTime": _rfc3339(cert.not_valid_after_utc),
    }


def _rfc3339(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
