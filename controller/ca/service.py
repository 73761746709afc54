"""`istio.v1.auth.IstioCertificateService/CreateCertificate` for node proxies and waypoints (spec
section 5.4).

Order of checks, each failing closed before the next runs:
1. the bearer token names a node, or a pod its node vouched for (else UNAUTHENTICATED);
2. metadata.ImpersonatedIdentity is a SPIFFE ID (else INVALID_ARGUMENT);
3. the CSR is well formed and names exactly that identity (else INVALID_ARGUMENT);
4. the identity is in our trust domain and the authorizer lets that caller hold it (else
   PERMISSION_DENIED; a pod may hold only its own service account's identity);
5. sign for min(requested TTL, max TTL), or the default TTL when none was requested.

Error-to-status mapping happens only in `CreateCertificate`. Every issuance and every refusal is
logged with the caller, identity and reason.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

import grpc
import grpc.aio

from controller.ca import authz
from meshcore import log, rpc
from meshcore.identity import ca, certs, csr, spiffe, tokens
from meshcore.proto import ca_pb2, ca_pb2_grpc

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TTL = datetime.timedelta(hours=24)
MAX_TTL = datetime.timedelta(days=90)

_log = logging.getLogger("controller.ca")

_Context = grpc.aio.ServicerContext[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse]


class _Refusal(Exception):
    """Internal: a request is refused with `code`; `reason` goes to the caller and the log."""

    def __init__(self, code: grpc.StatusCode, reason: str, identity: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.identity = identity


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(
        self,
        ca: ca.CertificateAuthority,
        tokens: tokens.NodeTokens,
        authorizer: authz.IdentityAuthorizer,
        *,
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        max_ttl: datetime.timedelta = MAX_TTL,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        if not datetime.timedelta(0) < default_ttl <= max_ttl:
            raise ValueError(f"need 0 < default_ttl ({default_ttl}) <= max_ttl ({max_ttl})")
        self._ca = ca
        self._tokens = tokens
        self._authorizer = authorizer
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._clock = clock

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: _Context
    ) -> ca_pb2.IstioCertificateResponse:
        metadata = {key: value for key, value in (context.invocation_metadata() or ())}
        caller = self._tokens.verify_caller(rpc.bearer_token(metadata) or "")
        try:
            if caller is None:
                raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            return self._issue(caller, request)
        except _Refusal as refusal:
            _log.warning(
                "certificate refused",
                extra=log.fields(
                    caller=None if caller is None else authz.describe(caller),
                    identity=refusal.identity,
                    code=refusal.code.name,
                    reason=refusal.reason,
                    peer=context.peer(),
                ),
            )
            await context.abort(refusal.code, refusal.reason)

    def _issue(
        self, caller: tokens.Caller, request: ca_pb2.IstioCertificateRequest
    ) -> ca_pb2.IstioCertificateResponse:
        identity = self._impersonated_identity(request)
        try:
            signing_request = csr.parse_csr(request.csr.encode("utf-8"))
        except csr.CsrError as exc:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc), identity.uri) from exc
        if signing_request.identity != identity:
            mismatch = csr.CsrIdentityMismatchError(expected=identity, got=signing_request.identity)
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(mismatch), identity.uri)
        if identity.trust_domain != self._ca.trust_domain:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {identity} is outside trust domain {self._ca.trust_domain!r}",
                identity.uri,
            )
        if not self._authorizer.may_issue(caller, identity):
            why = (
                "a pod may obtain only its own service account's identity, while it runs"
                if isinstance(caller, tokens.PodClaims)
                else "no pod with that service account runs on it"
            )
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{authz.describe(caller)} may not obtain {identity}: {why}",
                identity.uri,
            )

        now = self._clock()
        try:
            leaf_pem = self._ca.sign_csr(
                request.csr.encode("utf-8"),
                identity=identity,
                ttl=self._ttl(request.validity_duration),
                now=now,
            )
        except certs.IdentityError as exc:
            # The checks above mirror sign_csr's, so this means the CA itself cannot sign
            # (e.g. its root expired).
            raise _Refusal(grpc.StatusCode.INTERNAL, f"cannot sign: {exc}", identity.uri) from exc

        leaf = certs.split_pem_chain([leaf_pem])[0]
        _log.info(
            "certificate issued",
            extra=log.fields(
                caller=authz.describe(caller),
                identity=identity.uri,
                serial=str(leaf.serial_number),
                not_after=leaf.not_valid_after_utc.isoformat(),
            ),
        )
        return ca_pb2.IstioCertificateResponse(
            cert_chain=[leaf_pem.decode("ascii"), self._ca.root_pem.decode("ascii")]
        )

    def _impersonated_identity(self, request: ca_pb2.IstioCertificateRequest) -> spiffe.SpiffeId:
        value = request.metadata.fields.get(IMPERSONATED_IDENTITY)
        if value is None or value.WhichOneof("kind") != "string_value":
            raise _Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata.{IMPERSONATED_IDENTITY} must be a SPIFFE ID string; "
                "the caller names the identity it asks for",
            )
        try:
            return spiffe.SpiffeId.parse(value.string_value)
        except spiffe.InvalidSpiffeIdError as exc:
            raise _Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"metadata.{IMPERSONATED_IDENTITY}: {exc}"
            ) from exc

    def _ttl(self, requested_seconds: int) -> datetime.timedelta:
        if requested_seconds <= 0:
            return self._default_ttl
        # Cap in integer seconds first: timedelta(seconds=2**63) would overflow.
        max_seconds = int(self._max_ttl.total_seconds())
        return datetime.timedelta(seconds=min(requested_seconds, max_seconds))


def register(server: grpc.aio.Server, servicer: CertificateService) -> None:
    # The generated module is untyped (no .pyi for *_pb2_grpc).
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
