"""gRPC plumbing shared by the xDS and CA clients and servers.

Addresses are either ``unix:///abs/path.sock`` (the playground: reachable from every network
namespace) or ``host:port``. Callers authenticate with a bearer token, as ztunnel does with its
projected service-account token.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import grpc.aio

from meshcore import errors

AUTHORIZATION = "authorization"
CLUSTER_ID = "clusterid"

# Large pushes (a full snapshot of 10k workloads) must fit in one message.
MAX_MESSAGE_BYTES = 64 << 20
_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
)


class RpcConfigError(errors.MeshError, ValueError):
    """An address or token is unusable."""


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel (Unix socket or loopback TCP; TLS is a later option)."""
    if not address:
        raise RpcConfigError("empty gRPC address")
    return grpc.aio.insecure_channel(address, options=_OPTIONS)


def add_listener(server: grpc.aio.Server, address: str) -> int:
    """Bind `server` to `address`; returns the port (0 for a Unix socket)."""
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise RpcConfigError(f"cannot listen on {address}")
    return port


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=_OPTIONS)


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise RpcConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    if not token:
        raise RpcConfigError(f"token file {path} is empty")
    return token


def call_metadata(token: str, cluster_id: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"), (CLUSTER_ID, cluster_id))


def bearer_token(metadata: Mapping[str, str | bytes] | None) -> str | None:
    """The token in an incoming call's ``authorization: Bearer ...`` header, if any."""
    if not metadata:
        return None
    value = metadata.get(AUTHORIZATION)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value or not value.startswith("Bearer "):
        return None
    return value.removeprefix("Bearer ").strip() or None
