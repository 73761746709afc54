"""ztunnel's side of `IstioCertificateService/CreateCertificate` (spec section 5.4).

`CaClient` is the seam the certificate manager depends on; `GrpcCaClient` is the real one. It
only sends the CSR (the private key stays with the caller) and returns the PEM chain as received:
checking it is the manager's job (certs.build_workload_certificate).
"""

from __future__ import annotations

from typing import Protocol

import grpclib.client
import grpclib.const
import grpclib.exceptions

from meshcore import errors, rpc
from meshcore.identity import spiffe
from meshcore.proto import ca_pb2

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
# A CA call is one signature; anything slower than this is a stuck connection.
REQUEST_TIMEOUT_SECONDS = 10.0


class CaRequestError(errors.MeshError):
    """The CA did not return a certificate; `code` is the gRPC status, None if none was reached."""

    def __init__(self, message: str, code: grpclib.const.Status | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class CaClient(Protocol):
    async def fetch_certificate(
        self, identity: spiffe.SpiffeId, csr_pem: bytes, ttl_seconds: int
    ) -> list[str]:
        """Have `csr_pem` signed for `identity`; returns the PEM chain, leaf first, root last."""
        ...


class GrpcCaClient:
    """CaClient over gRPC, authenticated with the node's bearer token."""

    def __init__(self, address: str, token_file: str, cluster_id: str) -> None:
        self._address = address
        self._token_file = token_file
        self._cluster_id = cluster_id
        # Opened on first use, so that it binds to the running event loop.
        self._channel: grpclib.client.Channel | None = None

    async def fetch_certificate(
        self, identity: spiffe.SpiffeId, csr_pem: bytes, ttl_seconds: int
    ) -> list[str]:
        try:
            # Re-read every time: the token file may be rotated underneath us.
            token = rpc.read_token(self._token_file)
        except rpc.RpcConfigError as exc:
            raise CaRequestError(str(exc)) from exc
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii"),
            validity_duration=ttl_seconds,
            metadata={IMPERSONATED_IDENTITY: identity.uri},
        )
        if self._channel is None:
            try:
                self._channel = rpc.open_channel(self._address)
            except rpc.RpcConfigError as exc:
                raise CaRequestError(str(exc)) from exc
        create = grpclib.client.UnaryUnaryMethod(
            self._channel,
            CREATE_CERTIFICATE,
            ca_pb2.IstioCertificateRequest,
            ca_pb2.IstioCertificateResponse,
        )
        try:
            response = await create(
                request,
                metadata=rpc.call_metadata(token, self._cluster_id),
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except grpclib.exceptions.GRPCError as exc:
            raise CaRequestError(
                f"CA refused a certificate for {identity}: {exc.status.name}: {exc.message}",
                exc.status,
            ) from exc
        except (OSError, TimeoutError, grpclib.exceptions.StreamTerminatedError) as exc:
            raise CaRequestError(f"CA unreachable at {self._address}: {exc}") from exc
        chain = list(response.cert_chain)
        if not chain:
            raise CaRequestError(f"CA returned an empty certificate chain for {identity}")
        return chain

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
