"""Node credentials: HMAC tokens that say "this caller is node N".

Format ``v1.<node>.<mac>`` where mac is the unpadded URL-safe base64 of
HMAC-SHA256(secret, "v1." + node). The controller mints one per node at start-up (the playground
writes it to `<state>/nodes/<node>/token`); ztunnel sends it as ``authorization: Bearer``. The
token is a bearer credential: anyone holding it may act as that node, so files holding tokens or
the secret are 0600. Tokens do not expire; rotating the secret revokes all of them.

Pod tokens: a node vouches for one of its pods (the playground kubelet gives one to a pod that
asks for a projected ``serviceAccountToken`` volume, as the waypoint's pods do). Format
``pod1.<claims>.<mac>``: claims is the unpadded URL-safe base64 of a JSON array
``[node, namespace, pod name, pod uid, service account]``, mac is HMAC-SHA256 keyed with the
node's own token over ``"pod1." + claims``. The node can only mint tokens for the claims it
states, so its blast radius is its own: the controller checks, at every use, that the pod
exists with that uid on that node and runs as that service account, and a pod token then
obtains only that service account's identity. A deleted pod's token is dead at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
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
POD_VERSION = "pod1"
_MAX_POD_TOKEN = 4096


class TokenError(errors.MeshError):
    """A node token or the token secret cannot be made or loaded."""


@dataclasses.dataclass(frozen=True, slots=True)
class PodClaims:
    """What a pod token says: node `node` vouches that pod namespace/name (uid) runs as
    `service_account` on it."""

    node: str
    namespace: str
    name: str
    uid: str
    service_account: str

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.name} on node {self.node}"


# Who presented a token: a node (its name) or a pod a node vouched for.
Caller = str | PodClaims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _pod_mac(node_token: str, claims_text: str) -> str:
    message = f"{POD_VERSION}.{claims_text}".encode()
    return _b64(hmac.new(node_token.encode(), message, hashlib.sha256).digest())


def mint_pod_token(node_token: str, claims: PodClaims) -> str:
    """A pod token for `claims`, signed with the node token of `claims.node` (kubelet side)."""
    fields = [claims.node, claims.namespace, claims.name, claims.uid, claims.service_account]
    if not all(isinstance(f, str) and f for f in fields):
        raise TokenError(f"pod token claims must all be non-empty strings: {claims}")
    claims_text = _b64(json.dumps(fields, separators=(",", ":")).encode())
    return f"{POD_VERSION}.{claims_text}.{_pod_mac(node_token, claims_text)}"


def _parse_pod_claims(claims_text: str) -> PodClaims | None:
    try:
        fields = json.loads(base64.urlsafe_b64decode(claims_text + "=" * (-len(claims_text) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if (
        not isinstance(fields, list)
        or len(fields) != 5
        or not all(isinstance(f, str) and f for f in fields)
    ):
        return None
    return PodClaims(*fields)


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

    def verify_caller(self, token: str) -> Caller | None:
        """The node, or the claims of a pod token whose node signed it; None for anything else
        (never raises). Whether the pod still exists is the caller's check."""
        if isinstance(token, str) and token.startswith(POD_VERSION + "."):
            return self._verify_pod(token)
        return self.verify(token)

    def _verify_pod(self, token: str) -> PodClaims | None:
        if len(token) > _MAX_POD_TOKEN or not token.isascii():
            return None
        claims_text, dot, mac = token[len(POD_VERSION) + 1 :].partition(".")
        if not dot or "." in mac:
            return None
        claims = _parse_pod_claims(claims_text)
        if claims is None or len(claims.node) > _MAX_NODE_NAME or not _NODE_NAME.match(claims.node):
            return None
        expected = _pod_mac(self.mint(claims.node), claims_text)
        if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):
            return None
        return claims

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
