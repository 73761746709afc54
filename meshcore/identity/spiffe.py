"""SPIFFE identities of the form ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``."""

from __future__ import annotations

import dataclasses
import re

from meshcore.identity import errors

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"

# DNS-1123 labels for namespace and service account; a trust domain is a DNS-like name.
_LABEL = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9._]*[a-z0-9])?")
_NAME = re.compile(_LABEL)


class InvalidSpiffeIdError(errors.IdentityError, ValueError):
    """A string is not a Kubernetes-style SPIFFE ID; `value` is what was given."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid SPIFFE ID {value!r}: {reason}")
        self.value = value
        self.reason = reason


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """One workload identity. Immutable, hashable and ordered so it can key maps and sort."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise InvalidSpiffeIdError(str(self), f"bad trust domain {self.trust_domain!r}")
        if not _NAME.fullmatch(self.namespace):
            raise InvalidSpiffeIdError(str(self), f"bad namespace {self.namespace!r}")
        if not _NAME.fullmatch(self.service_account):
            raise InvalidSpiffeIdError(str(self), f"bad service account {self.service_account!r}")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/N/sa/S``; anything else raises InvalidSpiffeIdError."""
        if not uri.startswith(SCHEME):
            raise InvalidSpiffeIdError(uri, "must start with spiffe://")
        parts = uri[len(SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeIdError(uri, "must be spiffe://<trust domain>/ns/<ns>/sa/<sa>")
        return cls(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])

    @classmethod
    def for_workload(
        cls,
        namespace: str,
        service_account: str = "",
        trust_domain: str = "",
    ) -> SpiffeId:
        """The identity of a workload; empty fields take the mesh defaults, as in the xDS API."""
        return cls(
            trust_domain=trust_domain or DEFAULT_TRUST_DOMAIN,
            namespace=namespace,
            service_account=service_account or DEFAULT_SERVICE_ACCOUNT,
        )

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form authorization policies match on: the URI without ``spiffe://``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri
