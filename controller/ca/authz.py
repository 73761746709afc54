"""Who may hold which identity: the policy seam of the CA service (spec section 5.4)."""

from __future__ import annotations

from typing import Protocol

from meshcore.identity import spiffe


class IdentityAuthorizer(Protocol):
    """Decides whether node `node` may obtain a certificate for `identity`.

    The controller implements it as "a pod with that namespace and service account is scheduled
    on that node", so a compromised node can only obtain identities of pods it already runs.
    Must be cheap and synchronous (an index lookup): it runs on the gRPC event loop.
    """

    def may_issue(self, node: str, identity: spiffe.SpiffeId) -> bool: ...
