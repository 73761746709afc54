"""CertManager against a CA client backed by a real CertificateAuthority, on a fake clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import pathlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from cryptography import x509

from controller.ca import service
from meshcore import rpc_server
from meshcore.identity import ca, certs, csr, spiffe, tokens
from meshcore.identity import ca_client as client
from ztunnel.identity import manager

START = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(hours=24)
WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
DEADLINE_SECONDS = 10.0


class FakeClock:
    """Time moves only when a test calls advance(); sleepers wake when their time comes."""

    def __init__(self, now: datetime.datetime) -> None:
        self._now = now
        self._sleepers: list[tuple[datetime.datetime, asyncio.Future[None]]] = []
        self.requested: list[float] = []  # every sleep() duration, in order

    def now(self) -> datetime.datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)
        entry = (
            self._now + datetime.timedelta(seconds=seconds),
            asyncio.get_running_loop().create_future(),
        )
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, delta: datetime.timedelta) -> None:
        self._now += delta
        for wake_at, future in self._sleepers:
            if wake_at <= self._now and not future.done():
                future.set_result(None)

    def advance_to(self, at: datetime.datetime) -> None:
        self.advance(at - self._now)

    @property
    def wake_times(self) -> list[datetime.datetime]:
        return sorted(wake_at for wake_at, future in self._sleepers if not future.done())


class FakeCa:
    """A CaClient that signs with a real CA at the fake clock's time; can fail or hold calls."""

    def __init__(self, authority: ca.CertificateAuthority, clock: FakeClock) -> None:
        self.authority = authority
        self.clock = clock
        self.calls: list[spiffe.SpiffeId] = []
        self.failure: str | None = None
        self.issue_as: spiffe.SpiffeId | None = None  # sign for this identity instead
        self.gate: asyncio.Event | None = None

    async def fetch_certificate(
        self, identity: spiffe.SpiffeId, csr_pem: bytes, ttl_seconds: int
    ) -> list[str]:
        self.calls.append(identity)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise client.CaRequestError(self.failure)
        if self.issue_as is not None:
            identity = self.issue_as
            csr_pem = csr.build_csr(csr.generate_key(), identity)
        leaf = self.authority.sign_csr(
            csr_pem,
            identity=identity,
            ttl=datetime.timedelta(seconds=ttl_seconds),
            now=self.clock.now(),
        )
        return [leaf.decode(), self.authority.root_pem.decode()]


@pytest.fixture(scope="module")
def authority() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.generate("cluster.local", now=START - TTL)


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait for `predicate` with a deadline, yielding to the event loop in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(
    cert_manager: manager.CertManager, *, alone: bool = True
) -> AsyncIterator[manager.CertManager]:
    """Run the manager; afterwards no task may be left (none of its own, if not `alone`)."""
    task = asyncio.create_task(cert_manager.run(), name="cert-manager-run")
    try:
        yield cert_manager
    finally:
        # Bounded, so that a worker that ignores close() fails the test instead of hanging it.
        await asyncio.wait_for(cert_manager.close(), DEADLINE_SECONDS)
        await asyncio.wait_for(task, DEADLINE_SECONDS)
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if not alone:  # other components (a gRPC server) run in this loop too
            left = {t for t in left if t.get_name().startswith(("certificate ", "cert-manager"))}
        assert left == set(), "tasks left after close()"


def _new(
    authority: ca.CertificateAuthority,
) -> tuple[FakeClock, FakeCa, manager.CertManager]:
    clock = FakeClock(START)
    fake_ca = FakeCa(authority, clock)
    cert_manager = manager.CertManager(fake_ca, trust_domain="cluster.local", ttl=TTL, clock=clock)
    return clock, fake_ca, cert_manager


def _state(cert_manager: manager.CertManager, identity: spiffe.SpiffeId) -> dict[str, object]:
    [entry] = [s for s in cert_manager.states() if s["identity"] == identity.uri]
    return entry


def test_first_fetch_and_config_dump(authority: ca.CertificateAuthority) -> None:
    _, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            cert = await cert_manager.fetch_certificate(WEB)
            assert cert.identity == WEB
            assert cert.not_after == START + TTL
            assert cert.root_pem == authority.root_pem
            assert await cert_manager.fetch_certificate(WEB) is cert
            assert fake_ca.calls == [WEB]

            [state] = cert_manager.states()
            assert state["identity"] == WEB.uri
            assert state["state"] == "Available"
            chain = state["certChain"]
            assert isinstance(chain, list)
            [leaf] = chain
            assert base64.b64decode(leaf["pem"]) == cert.chain_pem[0]
            assert leaf["serialNumber"] == str(cert.serial_number)
            assert leaf["validFrom"] == "2026-03-01T11:59:00Z"
            assert leaf["expirationTime"] == "2026-03-02T12:00:00Z"
            roots = state["rootCerts"]
            assert isinstance(roots, list)
            assert base64.b64decode(roots[0]["pem"]) == authority.root_pem

            client_context = await cert_manager.fetch_client_context(WEB)
            server_context = await cert_manager.fetch_server_context(WEB)
            assert await cert_manager.fetch_client_context(WEB) is client_context
            assert await cert_manager.fetch_server_context(WEB) is server_context
            assert client_context is not server_context

    asyncio.run(main())


def test_concurrent_callers_share_one_request(authority: ca.CertificateAuthority) -> None:
    _, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            fake_ca.gate = asyncio.Event()
            callers = [asyncio.create_task(cert_manager.fetch_certificate(WEB)) for _ in range(20)]
            await eventually(lambda: len(fake_ca.calls) == 1, "the CA call")
            assert _state(cert_manager, WEB)["state"] == "Initializing"
            # A cancelled caller must not cancel the shared request for the others.
            callers[0].cancel()
            fake_ca.gate.set()
            results = await asyncio.gather(*callers[1:])
            assert all(r is results[0] for r in results)
            assert fake_ca.calls == [WEB]
            with pytest.raises(asyncio.CancelledError):
                await callers[0]

    asyncio.run(main())


def test_acquire_prefetches_and_renews_at_half_life(authority: ca.CertificateAuthority) -> None:
    clock, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            cert_manager.acquire(WEB)
            await eventually(lambda: _state(cert_manager, WEB)["state"] == "Available", "prefetch")
            first = await cert_manager.fetch_certificate(WEB)
            first_context = await cert_manager.fetch_client_context(WEB)
            assert fake_ca.calls == [WEB]
            # The worker sleeps exactly until half-life.
            await eventually(lambda: clock.wake_times == [first.refresh_at], "renewal timer")

            clock.advance_to(first.refresh_at - datetime.timedelta(seconds=1))
            assert await cert_manager.fetch_certificate(WEB) is first
            clock.advance(datetime.timedelta(seconds=1))
            await eventually(lambda: len(fake_ca.calls) == 2, "renewal")
            await eventually(lambda: clock.wake_times != [], "next renewal timer")
            second = await cert_manager.fetch_certificate(WEB)
            assert second.serial_number != first.serial_number
            assert second.not_before == first.refresh_at - datetime.timedelta(minutes=1)
            assert clock.wake_times == [second.refresh_at]
            # A new certificate gets new contexts; a fresh key per request.
            assert await cert_manager.fetch_client_context(WEB) is not first_context
            assert second.key is not first.key
            assert second.key.private_numbers() != first.key.private_numbers()

    asyncio.run(main())


def test_failed_renewal_backs_off_and_keeps_old_cert(authority: ca.CertificateAuthority) -> None:
    clock, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            cert_manager.acquire(WEB)
            old = await cert_manager.fetch_certificate(WEB)
            await eventually(lambda: clock.wake_times == [old.refresh_at], "renewal timer")
            fake_ca.failure = "CA down"
            clock.advance_to(old.refresh_at)

            for attempt, backoff in enumerate([0.5, 1.0, 2.0, 4.0], start=2):
                await eventually(_calls_are(fake_ca, attempt), f"attempt {attempt}")
                wake = clock.now() + datetime.timedelta(seconds=backoff)
                await eventually(_sleeps_until(clock, wake), f"backoff {backoff}")
                # Meanwhile the still-valid certificate is served and reported.
                assert await cert_manager.fetch_certificate(WEB) is old
                assert _state(cert_manager, WEB)["state"] == "Available"
                if backoff < 4.0:
                    clock.advance(datetime.timedelta(seconds=backoff))

            fake_ca.failure = None
            clock.advance(datetime.timedelta(seconds=4))
            await eventually(lambda: len(fake_ca.calls) == 6, "recovery")
            await eventually(
                lambda: cert_manager.states()[0]["certChain"] != _state_chain(old), "new cert"
            )
            new = await cert_manager.fetch_certificate(WEB)
            assert new.serial_number != old.serial_number
            await eventually(lambda: clock.wake_times == [new.refresh_at], "renewal after recovery")

    asyncio.run(main())


def _calls_are(fake_ca: FakeCa, count: int) -> Callable[[], bool]:
    return lambda: len(fake_ca.calls) == count


def _sleeps_until(clock: FakeClock, wake: datetime.datetime) -> Callable[[], bool]:
    return lambda: clock.wake_times == [wake]


def _state_chain(cert: certs.WorkloadCertificate) -> list[dict[str, object]]:
    return [
        {
            "pem": base64.b64encode(pem).decode(),
            "serialNumber": str(cert.serial_number),
            "validFrom": cert.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expirationTime": cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for pem in cert.chain_pem
    ]


def test_unavailable_state_and_fail_fast_during_backoff(authority: ca.CertificateAuthority) -> None:
    clock, fake_ca, cert_manager = _new(authority)
    fake_ca.failure = "PERMISSION_DENIED: node may not"

    async def main() -> None:
        async with running(cert_manager):
            with pytest.raises(manager.CertificateUnavailableError) as raised:
                await cert_manager.fetch_certificate(WEB)
            assert "PERMISSION_DENIED: node may not" in str(raised.value)
            assert raised.value.identity == WEB
            assert _state(cert_manager, WEB) == {
                "identity": WEB.uri,
                "state": "Unavailable: PERMISSION_DENIED: node may not",
                "certChain": [],
                "rootCerts": [],
            }
            # Within the backoff, callers fail fast without another CA call.
            with pytest.raises(manager.CertificateUnavailableError):
                await cert_manager.fetch_certificate(WEB)
            assert fake_ca.calls == [WEB]
            # After it, a caller triggers a new attempt.
            fake_ca.failure = None
            clock.advance(datetime.timedelta(seconds=0.5))
            cert = await cert_manager.fetch_certificate(WEB)
            assert cert.identity == WEB
            assert fake_ca.calls == [WEB, WEB]

    asyncio.run(main())


def test_expired_cert_is_dropped_when_renewal_keeps_failing(
    authority: ca.CertificateAuthority,
) -> None:
    clock, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            cert_manager.acquire(WEB)
            old = await cert_manager.fetch_certificate(WEB)
            await eventually(lambda: clock.wake_times == [old.refresh_at], "renewal timer")
            fake_ca.failure = "CA down"
            clock.advance_to(old.not_after)  # the renewal runs only now: the cert just expired
            await eventually(lambda: len(fake_ca.calls) == 2, "renewal attempt")
            await eventually(lambda: clock.wake_times != [], "backoff timer")
            assert _state(cert_manager, WEB)["state"] == "Unavailable: CA down"
            with pytest.raises(manager.CertificateUnavailableError, match="CA down"):
                await cert_manager.fetch_certificate(WEB)

    asyncio.run(main())


@pytest.mark.parametrize("wrong", ["identity", "root"])
def test_bad_ca_response_is_rejected(authority: ca.CertificateAuthority, wrong: str) -> None:
    clock = FakeClock(START)
    other_root = ca.CertificateAuthority.generate("cluster.local", now=START - TTL)
    fake_ca = FakeCa(authority if wrong == "identity" else other_root, clock)
    if wrong == "identity":
        fake_ca.issue_as = DB
    cert_manager = manager.CertManager(
        fake_ca, trust_domain="cluster.local", clock=clock, trusted_root_pem=authority.root_pem
    )
    expected = "identity mismatch" if wrong == "identity" else "untrusted root"

    async def main() -> None:
        async with running(cert_manager):
            with pytest.raises(manager.CertificateUnavailableError, match=expected):
                await cert_manager.fetch_certificate(WEB)
            state = str(_state(cert_manager, WEB)["state"])
            assert state.startswith("Unavailable: ")
            assert expected in state

    asyncio.run(main())


def test_release_stops_renewal_and_forgets(authority: ca.CertificateAuthority) -> None:
    clock, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            cert_manager.acquire(WEB)
            cert_manager.acquire(WEB)
            cert_manager.acquire(DB)
            cert = await cert_manager.fetch_certificate(WEB)
            await cert_manager.fetch_certificate(DB)
            await eventually(lambda: len(clock.wake_times) == 2, "two renewal timers")

            cert_manager.release(WEB)  # one pod left with WEB: keeps renewing
            assert [s["identity"] for s in cert_manager.states()] == [DB.uri, WEB.uri]
            cert_manager.release(WEB)
            assert [s["identity"] for s in cert_manager.states()] == [DB.uri]
            await eventually(lambda: len(clock.wake_times) == 1, "WEB's worker to stop")
            clock.advance_to(cert.refresh_at)
            await eventually(lambda: len(fake_ca.calls) == 3, "DB's renewal")
            assert sorted(fake_ca.calls) == sorted([WEB, DB, DB])
            with pytest.raises(ValueError, match="without a matching acquire"):
                cert_manager.release(WEB)

    asyncio.run(main())


def test_release_while_fetching_fails_the_waiters(authority: ca.CertificateAuthority) -> None:
    _, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        async with running(cert_manager):
            fake_ca.gate = asyncio.Event()
            cert_manager.acquire(WEB)
            waiter = asyncio.create_task(cert_manager.fetch_certificate(WEB))
            await eventually(lambda: len(fake_ca.calls) == 1, "the CA call")
            cert_manager.release(WEB)
            with pytest.raises(manager.CertificateUnavailableError, match="released"):
                await waiter
            assert cert_manager.states() == []

    asyncio.run(main())


def test_close_fails_pending_fetches_and_leaves_no_task(authority: ca.CertificateAuthority) -> None:
    _, fake_ca, cert_manager = _new(authority)

    async def main() -> None:
        run = asyncio.create_task(cert_manager.run())
        fake_ca.gate = asyncio.Event()
        cert_manager.acquire(WEB)  # before run() is up: it starts the worker when it is
        waiter = asyncio.create_task(cert_manager.fetch_certificate(DB))
        await eventually(lambda: len(fake_ca.calls) == 2, "both CA calls")
        await cert_manager.close()
        await run
        with pytest.raises(manager.CertificateUnavailableError, match="closed"):
            await waiter
        with pytest.raises(manager.CertificateUnavailableError, match="closed"):
            await cert_manager.fetch_certificate(WEB)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_foreign_trust_domain_is_refused(authority: ca.CertificateAuthority) -> None:
    _, fake_ca, cert_manager = _new(authority)
    foreign = spiffe.SpiffeId.parse("spiffe://other.domain/ns/shop/sa/web")

    async def main() -> None:
        async with running(cert_manager):
            with pytest.raises(certs.TrustDomainMismatchError):
                cert_manager.acquire(foreign)
            with pytest.raises(manager.CertificateUnavailableError, match="outside trust domain"):
                await cert_manager.fetch_certificate(foreign)
            assert fake_ca.calls == []

    asyncio.run(main())


# -- against the real gRPC service -------------------------------------------------------------


class OnNode:
    def __init__(self, identities: set[spiffe.SpiffeId]) -> None:
        self.identities = identities

    def may_issue(self, caller: tokens.Caller, identity: spiffe.SpiffeId) -> bool:
        return caller == "node-1" and identity in self.identities


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_against_grpc_service(short_dir: pathlib.Path) -> None:
    def now() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    authority = ca.CertificateAuthority.generate("cluster.local", now=now())
    node_tokens = tokens.NodeTokens(tokens.load_or_create_secret(str(short_dir / "secret")))
    (short_dir / "token").write_text(node_tokens.mint("node-1"))

    async def main() -> None:
        server = rpc_server.new_server()
        address = f"unix://{short_dir}/ca.sock"
        rpc_server.add_listener(server, address)
        service.register(
            server,
            service.CertificateService(authority, node_tokens, OnNode({WEB}), clock=now),
        )
        await server.start()
        ca_client = client.GrpcCaClient(address, str(short_dir / "token"), "Kubernetes")
        cert_manager = manager.CertManager(
            ca_client,
            trust_domain="cluster.local",
            clock=manager.SystemClock(),
            trusted_root_pem=authority.root_pem,
        )
        try:
            async with running(cert_manager, alone=False):
                cert_manager.acquire(WEB)
                cert = await cert_manager.fetch_certificate(WEB)
                assert cert.identity == WEB
                assert cert.not_after - cert.not_before == TTL + datetime.timedelta(minutes=1)
                leaf = x509.load_pem_x509_certificate(cert.chain_pem[0])
                leaf.verify_directly_issued_by(authority.root_certificate)
                assert _state(cert_manager, WEB)["state"] == "Available"
                with pytest.raises(manager.CertificateUnavailableError, match="PERMISSION_DENIED"):
                    await cert_manager.fetch_certificate(DB)
                cert_manager.release(WEB)
        finally:
            await ca_client.close()
            await server.stop(grace=None)

    asyncio.run(main())
