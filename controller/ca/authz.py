"""Who may hold which identity: the policy seam of the CA service (spec section 5.4).

Two kinds of caller present tokens (`meshcore.identity.tokens`): a node (ztunnel), which may
obtain the identity of any pod it runs, and a pod a node vouched for (a waypoint), which may
obtain only its own service account's identity, and only while that very pod (same uid) is
still scheduled on that node and not finished.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshcore.identity import spiffe, tokens

_FINISHED = frozenset({"Succeeded", "Failed"})


class IdentityAuthorizer(Protocol):
    """Decides whether `caller` may obtain a certificate for `identity`.

    The controller implements it for nodes as "a pod with that namespace and service account is
    scheduled on that node", so a compromised node can only obtain identities of pods it already
    runs. Must be cheap and synchronous (an index lookup): it runs on the gRPC event loop.
    """

    def may_issue(self, caller: tokens.Caller, identity: spiffe.SpiffeId) -> bool: ...


def is_live_pod(pod: Mapping[str, Any] | None, claims: tokens.PodClaims) -> bool:
    """`pod` (the stored object named by the claims, or None) is the pod the token was minted
    for: same uid, same node, same service account, not deleted or finished."""
    if pod is None:
        return False
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    return (
        meta.get("uid") == claims.uid
        and not meta.get("deletionTimestamp")
        and spec.get("nodeName") == claims.node
        and (spec.get("serviceAccountName") or spiffe.DEFAULT_SERVICE_ACCOUNT)
        == claims.service_account
        and status.get("phase") not in _FINISHED
    )


def describe(caller: tokens.Caller) -> str:
    return str(caller) if isinstance(caller, tokens.PodClaims) else f"node {caller!r}"


class CallerAuthorizer:
    """Nodes by `node_may_issue`; pods by looking themselves up with `find_pod(ns, name)`."""

    def __init__(
        self,
        node_may_issue: Callable[[str, spiffe.SpiffeId], bool],
        find_pod: Callable[[str, str], Mapping[str, Any] | None],
        trust_domain: str,
    ) -> None:
        self._node_may_issue = node_may_issue
        self._find_pod = find_pod
        self._trust_domain = trust_domain

    def is_live(self, caller: tokens.Caller) -> bool:
        """A node token is always live; a pod token while its pod is."""
        if isinstance(caller, tokens.PodClaims):
            return is_live_pod(self._find_pod(caller.namespace, caller.name), caller)
        return True

    def may_issue(self, caller: tokens.Caller, identity: spiffe.SpiffeId) -> bool:
        if not isinstance(caller, tokens.PodClaims):
            return self._node_may_issue(caller, identity)
        own = spiffe.SpiffeId.for_workload(
            caller.namespace, caller.service_account, self._trust_domain
        )
        return identity == own and self.is_live(caller)


def build_xds_authenticator(
    node_tokens: tokens.NodeTokens, authorizer: CallerAuthorizer
) -> Callable[[str | None], str | None]:
    """xDS callers: a node (its name), or a live pod a node vouched for (``pod/<ns>/<name>``)."""

    def authenticate(token: str | None) -> str | None:
        caller = node_tokens.verify_caller(token) if token else None
        if caller is None or not authorizer.is_live(caller):
            return None
        if isinstance(caller, tokens.PodClaims):
            return f"pod/{caller.namespace}/{caller.name}"
        return caller

    return authenticate
