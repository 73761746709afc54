from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pathlib
import stat

import pytest

from meshcore.identity import tokens

SECRET = bytes(range(32))


def test_mint_format() -> None:
    token = tokens.NodeTokens(SECRET).mint("node-1.example")
    expected_mac = (
        base64.urlsafe_b64encode(hmac.new(SECRET, b"v1.node-1.example", hashlib.sha256).digest())
        .rstrip(b"=")
        .decode()
    )
    assert token == f"v1.node-1.example.{expected_mac}"
    assert "=" not in token


@pytest.mark.parametrize("node", ["node-1", "n", "kind-worker.cluster.local"])
def test_verify_roundtrip(node: str) -> None:
    issuer = tokens.NodeTokens(SECRET)
    assert issuer.verify(issuer.mint(node)) == node


def _flip_last(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


GOOD = tokens.NodeTokens(SECRET).mint("node-1")


@pytest.mark.parametrize(
    "token",
    [
        _flip_last(GOOD),
        GOOD.replace("node-1", "node-2"),
        GOOD.replace("v1.", "v2.", 1),
        GOOD + "=",
        GOOD[:-1],
        tokens.NodeTokens(b"x" * 32).mint("node-1"),
        "",
        "v1.",
        "v1..",
        "v1.node-1",
        "v1.node-1.",
        "Bearer " + GOOD,
        "v1.NODE.abc",
        "v1.nöde.abc",
        "\x00" * 10,
        "v1." + "a" * 10_000 + ".mac",
    ],
    ids=[
        "tampered-mac",
        "tampered-node",
        "other-version",
        "padding",
        "truncated",
        "other-secret",
        "empty",
        "prefix-only",
        "empty-parts",
        "no-mac",
        "empty-mac",
        "bearer-prefix",
        "uppercase-node",
        "non-ascii",
        "nul-bytes",
        "huge",
    ],
)
def test_verify_rejects(token: str) -> None:
    assert tokens.NodeTokens(SECRET).verify(token) is None


@pytest.mark.parametrize("node", ["", "Node", "a/b", "-a", "a" * 254], ids=str.__len__)
def test_mint_rejects_bad_node_names(node: str) -> None:
    with pytest.raises(tokens.TokenError, match="invalid node name"):
        tokens.NodeTokens(SECRET).mint(node)


def test_short_secret_refused() -> None:
    with pytest.raises(tokens.TokenError, match="at least 16 bytes"):
        tokens.NodeTokens(b"short")


def test_load_or_create_secret(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "controller" / "token-secret"
    secret = tokens.load_or_create_secret(str(path))
    assert len(secret) == 32
    assert path.read_bytes() == secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["token-secret"]  # no temp file left
    assert tokens.load_or_create_secret(str(path)) == secret
    assert tokens.load_or_create_secret(str(tmp_path / "other")) != secret


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 33], ids=["empty", "short", "long"])
def test_load_or_create_secret_never_replaces_corrupt(
    tmp_path: pathlib.Path, content: bytes
) -> None:
    path = tmp_path / "token-secret"
    path.write_bytes(content)
    with pytest.raises(tokens.TokenError, match="is corrupt") as raised:
        tokens.load_or_create_secret(str(path))
    assert str(path) in str(raised.value)
    assert path.read_bytes() == content


# -- pod tokens ---------------------------------------------------------------------------------

CLAIMS = tokens.PodClaims("node-1", "shop", "waypoint-7c5-abcde", "uid-1", "waypoint")


def test_pod_token_roundtrip() -> None:
    issuer = tokens.NodeTokens(SECRET)
    token = tokens.mint_pod_token(issuer.mint("node-1"), CLAIMS)
    assert token.startswith("pod1.")
    assert "=" not in token
    assert issuer.verify_caller(token) == CLAIMS
    # A pod token is not a node token, and a node token still names its node.
    assert issuer.verify(token) is None
    assert issuer.verify_caller(issuer.mint("node-1")) == "node-1"


def _reclaim(token: str, **changes: str) -> str:
    """The token with its claims rewritten and its MAC kept."""
    _, _, mac = token.split(".")
    fields = [
        changes.get(name, getattr(CLAIMS, name))
        for name in ("node", "namespace", "name", "uid", "service_account")
    ]
    claims = base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode())
    return f"pod1.{claims.rstrip(b'=').decode()}.{mac}"


POD_GOOD = tokens.mint_pod_token(tokens.NodeTokens(SECRET).mint("node-1"), CLAIMS)


@pytest.mark.parametrize(
    "token",
    [
        _flip_last(POD_GOOD),
        # A node may not vouch for a pod of another node, nor change what it vouched for.
        _reclaim(POD_GOOD, node="node-2"),
        _reclaim(POD_GOOD, service_account="admin"),
        _reclaim(POD_GOOD, namespace="istio-system"),
        # Signed with another node's token, or another secret's.
        tokens.mint_pod_token(tokens.NodeTokens(SECRET).mint("node-2"), CLAIMS),
        tokens.mint_pod_token(tokens.NodeTokens(b"x" * 32).mint("node-1"), CLAIMS),
        "pod1.",
        "pod1..",
        "pod1.!!!.mac",
        "pod1." + base64.urlsafe_b64encode(b'{"a": 1}').decode().rstrip("=") + ".mac",
        "pod1." + base64.urlsafe_b64encode(b'["n","s","p","u",""]').decode().rstrip("=") + ".m",
        POD_GOOD + ".extra",
        "pod1." + "a" * 10_000 + ".mac",
    ],
    ids=[
        "tampered-mac",
        "other-node",
        "other-service-account",
        "other-namespace",
        "signed-by-other-node",
        "other-secret",
        "prefix-only",
        "empty-parts",
        "not-base64",
        "not-a-list",
        "empty-claim",
        "extra-part",
        "huge",
    ],
)
def test_pod_token_rejects(token: str) -> None:
    assert tokens.NodeTokens(SECRET).verify_caller(token) is None


def test_pod_token_refuses_empty_claims() -> None:
    with pytest.raises(tokens.TokenError, match="non-empty"):
        tokens.mint_pod_token("v1.n.mac", tokens.PodClaims("n", "ns", "p", "", "sa"))
