"""CertificateService on a real grpc.aio server over a Unix socket, called by GrpcCaClient."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import grpc.aio
import grpclib.const
import pytest
from cryptography import x509

from controller.ca import authz, service
from meshcore import rpc, rpc_server
from meshcore.identity import ca, certs, csr, spiffe, tokens
from meshcore.identity import ca_client as client
from meshcore.proto import ca_pb2, ca_pb2_grpc

WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
NODE = "node-1"
SECRET = b"s" * 32


class NodePods:
    """Authorizer fake: the identities whose pods run on each node."""

    def __init__(self, pods: dict[str, set[spiffe.SpiffeId]]) -> None:
        self.pods = pods
        self.asked: list[tuple[str, spiffe.SpiffeId]] = []

    def may_issue(self, node: str, identity: spiffe.SpiffeId) -> bool:
        self.asked.append((node, identity))
        return identity in self.pods.get(node, set())


@dataclasses.dataclass
class Harness:
    address: str
    directory: pathlib.Path
    authority: ca.CertificateAuthority
    authorizer: NodePods
    token_file: str
    pods: dict[tuple[str, str], dict[str, object]]

    def client(self, token_file: str | None = None) -> client.GrpcCaClient:
        return client.GrpcCaClient(self.address, token_file or self.token_file, "Kubernetes")

    def write_token(self, name: str, token: str) -> str:
        path = self.directory / name
        path.write_text(token + "\n")
        return str(path)


@pytest.fixture(scope="module")
def authority() -> ca.CertificateAuthority:
    return ca.CertificateAuthority.generate("cluster.local", now=_now())


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be too long.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@contextlib.asynccontextmanager
async def running(
    directory: pathlib.Path,
    authority: ca.CertificateAuthority,
    *,
    default_ttl: datetime.timedelta = service.DEFAULT_TTL,
    max_ttl: datetime.timedelta = service.MAX_TTL,
) -> AsyncIterator[Harness]:
    node_tokens = tokens.NodeTokens(SECRET)
    authorizer = NodePods({NODE: {WEB, DB}, "node-2": set()})
    pods: dict[tuple[str, str], dict[str, object]] = {}
    callers = authz.CallerAuthorizer(
        authorizer.may_issue, lambda ns, name: pods.get((ns, name)), "cluster.local"
    )
    servicer = service.CertificateService(
        authority, node_tokens, callers, default_ttl=default_ttl, max_ttl=max_ttl, clock=_now
    )
    server = rpc_server.new_server()
    address = f"unix://{directory}/ca.sock"
    rpc_server.add_listener(server, address)
    service.register(server, servicer)
    await server.start()
    token_file = directory / "token"
    token_file.write_text(node_tokens.mint(NODE) + "\n")
    try:
        yield Harness(address, directory, authority, authorizer, str(token_file), pods)
    finally:
        await server.stop(grace=None)


async def _fetch(
    ca_client: client.GrpcCaClient, identity: spiffe.SpiffeId, csr_pem: bytes, ttl: int = 3600
) -> list[str]:
    try:
        return await ca_client.fetch_certificate(identity, csr_pem, ttl)
    finally:
        await ca_client.close()


async def _raw_call(
    address: str, request: ca_pb2.IstioCertificateRequest, metadata: tuple[tuple[str, str], ...]
) -> ca_pb2.IstioCertificateResponse:
    """A call GrpcCaClient would never make (missing token, missing metadata)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        response: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
            request, metadata=metadata, timeout=10
        )
        return response


def _lifetime(pem: str) -> datetime.timedelta:
    leaf = x509.load_pem_x509_certificate(pem.encode())
    return leaf.not_valid_after_utc - leaf.not_valid_before_utc


def _issuance_logs(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, object]]:
    return [
        getattr(r, "fields", {})
        for r in caplog.records
        if r.name == "controller.ca" and r.getMessage() == message
    ]


def test_issues_a_chain_that_verifies(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.ca")
    key = csr.generate_key()

    async def main() -> list[str]:
        async with running(short_dir, authority) as harness:
            return await _fetch(harness.client(), WEB, csr.build_csr(key, WEB), ttl=3600)

    chain = asyncio.run(main())
    assert len(chain) == 2
    assert all(pem.endswith("-----END CERTIFICATE-----\n") for pem in chain)
    assert chain[1] == authority.root_pem.decode()
    cert = certs.build_workload_certificate(WEB, key, chain, trusted_root_pem=authority.root_pem)
    assert cert.identity == WEB
    assert _lifetime(chain[0]) == datetime.timedelta(hours=1, minutes=1)  # TTL + clock skew

    [issued] = _issuance_logs(caplog, "certificate issued")
    assert issued["caller"] == f"node {NODE!r}"
    assert issued["identity"] == WEB.uri
    assert issued["serial"] == str(cert.serial_number)
    assert issued["not_after"] == cert.not_after.isoformat()


@pytest.mark.parametrize(
    ("ttl_seconds", "expected"),
    [
        (0, datetime.timedelta(hours=1)),
        (-5, datetime.timedelta(hours=1)),
        (600, datetime.timedelta(minutes=10)),
        (7200, datetime.timedelta(hours=2)),
        (10 * 86400, datetime.timedelta(hours=2)),
        (2**63 - 1, datetime.timedelta(hours=2)),
    ],
    ids=["zero-is-default", "negative-is-default", "requested", "at-max", "capped", "int64-max"],
)
def test_ttl(
    short_dir: pathlib.Path,
    authority: ca.CertificateAuthority,
    ttl_seconds: int,
    expected: datetime.timedelta,
) -> None:
    async def main() -> list[str]:
        async with running(
            short_dir,
            authority,
            default_ttl=datetime.timedelta(hours=1),
            max_ttl=datetime.timedelta(hours=2),
        ) as harness:
            pem = csr.build_csr(csr.generate_key(), WEB)
            return await _fetch(harness.client(), WEB, pem, ttl=ttl_seconds)

    chain = asyncio.run(main())
    assert _lifetime(chain[0]) == expected + datetime.timedelta(minutes=1)


@pytest.mark.parametrize(
    "token",
    ["v1.node-1.forged", tokens.NodeTokens(b"o" * 32).mint(NODE), "garbage"],
    ids=["forged-mac", "other-secret", "garbage"],
)
def test_bad_token_is_unauthenticated(
    short_dir: pathlib.Path,
    authority: ca.CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
    token: str,
) -> None:
    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            ca_client = harness.client(harness.write_token("bad-token", token))
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(ca_client, WEB, csr.build_csr(csr.generate_key(), WEB))
            assert harness.authorizer.asked == []  # refused before any policy lookup
            return raised.value

    error = asyncio.run(main())
    assert error.code is grpclib.const.Status.UNAUTHENTICATED
    assert "missing or invalid bearer token" in error.message
    [refusal] = _issuance_logs(caplog, "certificate refused")
    assert refusal["code"] == "UNAUTHENTICATED"
    assert refusal["caller"] is None


def test_missing_token_is_unauthenticated(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority
) -> None:
    request = ca_pb2.IstioCertificateRequest(
        csr=csr.build_csr(csr.generate_key(), WEB).decode(),
        metadata={"ImpersonatedIdentity": WEB.uri},
    )

    async def main() -> grpc.aio.AioRpcError:
        async with running(short_dir, authority) as harness:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _raw_call(harness.address, request, (("clusterid", "Kubernetes"),))
            return raised.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "missing or invalid bearer token"


def test_unreadable_token_file_is_a_local_error(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority
) -> None:
    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            ca_client = harness.client(str(short_dir / "no-such-token"))
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(ca_client, WEB, csr.build_csr(csr.generate_key(), WEB))
            return raised.value

    error = asyncio.run(main())
    assert error.code is None
    assert "no-such-token" in error.message


def test_identity_not_on_node_is_permission_denied(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            node2 = harness.write_token("node-2", tokens.NodeTokens(SECRET).mint("node-2"))
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(harness.client(node2), WEB, csr.build_csr(csr.generate_key(), WEB))
            assert harness.authorizer.asked == [("node-2", WEB)]
            return raised.value

    error = asyncio.run(main())
    assert error.code is grpclib.const.Status.PERMISSION_DENIED
    assert "'node-2'" in error.message
    assert WEB.uri in error.message
    [refusal] = _issuance_logs(caplog, "certificate refused")
    assert refusal["caller"] == "node 'node-2'"
    assert refusal["identity"] == WEB.uri
    assert refusal["code"] == "PERMISSION_DENIED"
    assert "node-2" in str(refusal["reason"])


def test_foreign_trust_domain_is_permission_denied(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority
) -> None:
    foreign = spiffe.SpiffeId.parse("spiffe://other.domain/ns/shop/sa/web")

    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            harness.authorizer.pods[NODE].add(foreign)  # even if a pod claimed it
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(harness.client(), foreign, csr.build_csr(csr.generate_key(), foreign))
            return raised.value

    error = asyncio.run(main())
    assert error.code is grpclib.const.Status.PERMISSION_DENIED
    assert "outside trust domain 'cluster.local'" in error.message


@pytest.mark.parametrize(
    ("csr_pem", "message"),
    [
        (lambda: csr.build_csr(csr.generate_key(), DB), f"CSR is for {DB.uri}"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", "not a PEM certificate request"),
        (lambda: b"", "not a PEM certificate request"),
    ],
    ids=["csr-for-other-identity", "garbage-csr", "empty-csr"],
)
def test_bad_csr_is_invalid_argument(
    short_dir: pathlib.Path,
    authority: ca.CertificateAuthority,
    csr_pem: Callable[[], bytes],
    message: str,
) -> None:
    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(harness.client(), WEB, csr_pem())
            assert harness.authorizer.asked == []  # refused before any policy lookup
            return raised.value

    error = asyncio.run(main())
    assert error.code is grpclib.const.Status.INVALID_ARGUMENT
    assert message in error.message


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "metadata.ImpersonatedIdentity must be a SPIFFE ID string"),
        ({"ImpersonatedIdentity": 3.0}, "metadata.ImpersonatedIdentity must be a SPIFFE ID"),
        ({"ImpersonatedIdentity": "https://x"}, "invalid SPIFFE ID 'https://x'"),
    ],
    ids=["missing", "not-a-string", "not-spiffe"],
)
def test_bad_impersonated_identity_is_invalid_argument(
    short_dir: pathlib.Path,
    authority: ca.CertificateAuthority,
    metadata: dict[str, object],
    message: str,
) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with running(short_dir, authority) as harness:
            request = ca_pb2.IstioCertificateRequest(
                csr=csr.build_csr(csr.generate_key(), WEB).decode(), metadata=metadata
            )
            token = tokens.NodeTokens(SECRET).mint(NODE)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _raw_call(harness.address, request, rpc.call_metadata(token, "Kubernetes"))
            return raised.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


# -- pod tokens (a waypoint's pod, vouched for by its node) ------------------------------------

WAYPOINT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
WAYPOINT_POD = tokens.PodClaims(NODE, "shop", "waypoint-abc", "uid-1", "waypoint")


def _pod_object(uid: str = "uid-1", **status: str) -> dict[str, object]:
    return {
        "metadata": {"name": "waypoint-abc", "namespace": "shop", "uid": uid},
        "spec": {"nodeName": NODE, "serviceAccountName": "waypoint"},
        "status": {"phase": "Running", **status},
    }


def _pod_token(harness: Harness, claims: tokens.PodClaims = WAYPOINT_POD) -> str:
    node_token = tokens.NodeTokens(SECRET).mint(claims.node)
    return harness.write_token("pod-token", tokens.mint_pod_token(node_token, claims))


def test_pod_token_obtains_its_own_identity_only(
    short_dir: pathlib.Path, authority: ca.CertificateAuthority
) -> None:
    async def main() -> tuple[list[str], client.CaRequestError]:
        async with running(short_dir, authority) as harness:
            harness.pods[("shop", "waypoint-abc")] = _pod_object()
            token = _pod_token(harness)
            chain = await _fetch(
                harness.client(token), WAYPOINT, csr.build_csr(csr.generate_key(), WAYPOINT)
            )
            # WEB runs on the node that vouched, but the pod is not WEB.
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(harness.client(token), WEB, csr.build_csr(csr.generate_key(), WEB))
            return chain, raised.value

    chain, error = asyncio.run(main())
    leaf = certs.split_pem_chain([chain[0].encode()])[0]
    assert certs.spiffe_id_of(leaf) == WAYPOINT
    assert error.code is grpclib.const.Status.PERMISSION_DENIED
    assert "pod shop/waypoint-abc" in error.message
    assert WEB.uri in error.message


@pytest.mark.parametrize(
    "stored",
    [
        None,  # deleted
        _pod_object(uid="uid-2"),  # deleted and recreated with the same name
        _pod_object(phase="Succeeded"),
        {**_pod_object(), "spec": {"nodeName": "node-2", "serviceAccountName": "waypoint"}},
    ],
    ids=["gone", "recreated", "finished", "moved"],
)
def test_pod_token_dies_with_its_pod(
    short_dir: pathlib.Path,
    authority: ca.CertificateAuthority,
    stored: dict[str, object] | None,
) -> None:
    async def main() -> client.CaRequestError:
        async with running(short_dir, authority) as harness:
            if stored is not None:
                harness.pods[("shop", "waypoint-abc")] = stored
            token = _pod_token(harness)
            with pytest.raises(client.CaRequestError) as raised:
                await _fetch(
                    harness.client(token), WAYPOINT, csr.build_csr(csr.generate_key(), WAYPOINT)
                )
            return raised.value

    error = asyncio.run(main())
    assert error.code is grpclib.const.Status.PERMISSION_DENIED
    assert "while it runs" in error.message
