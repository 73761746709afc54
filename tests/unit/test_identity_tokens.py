from __future__ import annotations

import base64
import hashlib
import hmac
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
