"""Node credentials: HMAC tokens that say "this caller is node N".

Format ``v1.<node>.<mac>`` where mac is the unpadded URL-safe base64 of
HMAC-SHA256(secret, "v1." + node). The controller mints one per node at start-up (the playground
writes it to `<state>/nodes/<node>/token`); ztunnel sends it as ``authorization: Bearer``. The
token is a bearer credential: anyone holding it may act as that node, so files holding tokens or
the secret are 0600. Tokens do not expire; rotating the secret revokes all of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile

from meshcore import errors

VERSION = "v1"
SECRET_BYTES = 32
# A Kubernetes node name is a DNS-1123 subdomain.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_MAX_NODE_NAME = 253
_MAX_TOKEN = 512


class TokenError(errors.MeshError):
    """A node token or the token secret cannot be made or loaded."""


class NodeTokens:
    """Mints and verifies node tokens with one secret."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise TokenError(f"token secret must be at least 16 bytes, got {len(secret)}")
        self._secret = secret

    def __repr__(self) -> str:
        return "NodeTokens(<secret>)"

    def mint(self, node: str) -> str:
        if len(node) > _MAX_NODE_NAME or not _NODE_NAME.match(node):
            raise TokenError(f"invalid node name {node!r}: must be a DNS-1123 subdomain")
        return f"{VERSION}.{node}.{self._mac(node)}"

    def verify(self, token: str) -> str | None:
        """The node the token was minted for, or None for anything else (never raises)."""
        if not isinstance(token, str) or len(token) > _MAX_TOKEN or not token.isascii():
            return None
        prefix = VERSION + "."
        if not token.startswith(prefix):
            return None
        node, dot, mac = token[len(prefix) :].rpartition(".")
        if not dot or not _NODE_NAME.match(node):
            return None
        if not hmac.compare_digest(mac.encode("ascii"), self._mac(node).encode("ascii")):
            return None
        return node

    def _mac(self, node: str) -> str:
        digest = hmac.new(self._secret, f"{VERSION}.{node}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def load_or_create_secret(path: str) -> bytes:
    """Read the secret at `path`, or create it (32 random bytes, 0600, atomically).

    A file of the wrong size is an error naming it, never replaced: that would revoke every
    node token in use.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read(SECRET_BYTES + 1)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TokenError(f"cannot read token secret {path}: {exc.strerror}") from exc
    else:
        if len(secret) != SECRET_BYTES:
            raise TokenError(
                f"token secret {path} is corrupt: expected {SECRET_BYTES} bytes, "
                f"found {len(secret) if len(secret) <= SECRET_BYTES else 'more'}"
            )
        return secret

    secret = secrets.token_bytes(SECRET_BYTES)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, not rename: if another process created it meanwhile, keep theirs.
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_secret(path)
    finally:
        os.unlink(tmp)
    return secret
