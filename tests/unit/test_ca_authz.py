"""Who may hold which identity, and which xDS callers are let in: nodes, and live pods their
node vouched for."""

from __future__ import annotations

from typing import Any

import pytest

from controller.ca import authz
from meshcore.identity import spiffe, tokens

SECRET = b"k" * 32
CLAIMS = tokens.PodClaims("node-1", "shop", "waypoint-abc", "uid-1", "waypoint")
WAYPOINT = spiffe.SpiffeId.for_workload("shop", "waypoint", "cluster.local")
WEB = spiffe.SpiffeId.for_workload("shop", "web", "cluster.local")


def _pod(**changes: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "waypoint-abc", "namespace": "shop", "uid": "uid-1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "waypoint"},
        "status": {"phase": "Running"},
    }
    for path, value in changes.items():
        section, field = path.split("__")
        pod[section][field] = value
    return pod


def _authorizer(pods: dict[tuple[str, str], dict[str, Any]]) -> authz.CallerAuthorizer:
    return authz.CallerAuthorizer(
        lambda node, identity: node == "node-1" and identity == WEB,
        lambda ns, name: pods.get((ns, name)),
        "cluster.local",
    )


def test_live_pod_holds_its_own_identity_only() -> None:
    authorizer = _authorizer({("shop", "waypoint-abc"): _pod()})
    assert authorizer.may_issue(CLAIMS, WAYPOINT)
    assert not authorizer.may_issue(CLAIMS, WEB)
    assert not authorizer.may_issue(
        CLAIMS, spiffe.SpiffeId.for_workload("shop", "waypoint", "other.domain")
    )
    # Nodes are asked about as before.
    assert authorizer.may_issue("node-1", WEB)
    assert not authorizer.may_issue("node-2", WEB)


@pytest.mark.parametrize(
    "pod",
    [
        None,
        _pod(metadata__uid="uid-2"),
        _pod(metadata__deletionTimestamp="2026-12-06T00:00:00Z"),
        _pod(spec__nodeName="node-2"),
        _pod(spec__serviceAccountName="admin"),
        _pod(status__phase="Failed"),
    ],
    ids=["gone", "recreated", "deleting", "other-node", "other-service-account", "failed"],
)
def test_pod_that_is_not_the_one_vouched_for_holds_nothing(pod: dict[str, Any] | None) -> None:
    authorizer = _authorizer({} if pod is None else {("shop", "waypoint-abc"): pod})
    assert not authorizer.is_live(CLAIMS)
    assert not authorizer.may_issue(CLAIMS, WAYPOINT)


def test_xds_authenticator_names_nodes_and_live_pods() -> None:
    node_tokens = tokens.NodeTokens(SECRET)
    pod_token = tokens.mint_pod_token(node_tokens.mint("node-1"), CLAIMS)
    pods = {("shop", "waypoint-abc"): _pod()}
    authenticate = authz.build_xds_authenticator(node_tokens, _authorizer(pods))
    assert authenticate(node_tokens.mint("node-1")) == "node-1"
    assert authenticate(pod_token) == "pod/shop/waypoint-abc"
    assert authenticate(None) is None
    assert authenticate("garbage") is None
    del pods[("shop", "waypoint-abc")]
    assert authenticate(pod_token) is None
