"""gRPC plumbing shared by the xDS and CA clients and servers.

Addresses are either ``unix:///abs/path.sock`` (the playground: reachable from every network
namespace) or ``host:port``. Callers authenticate with a bearer token, as ztunnel does with its
projected service-account token.

Clients (ztunnel's xDS and CA calls) use `grpclib`, pure Python on `h2`: grpcio's core costs a
per-node daemon about 20 MiB of resident memory and a set of threads. The controller's servers use
grpcio (`meshcore.rpc_server`); both speak the same gRPC over HTTP/2.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpclib.client
import grpclib.config

from meshcore import digits, errors

AUTHORIZATION = "authorization"
CLUSTER_ID = "clusterid"

# Large pushes (a full snapshot of 10k workloads) must fit in one message.
MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_SECONDS = 30.0
# A full snapshot is several MiB: large windows let it arrive without a round trip per 64 KiB.
_WINDOW_BYTES = 16 << 20
_UNIX_PREFIX = "unix://"


class RpcConfigError(errors.MeshError, ValueError):
    """An address or token is unusable."""


def open_channel(address: str) -> grpclib.client.Channel:
    """A client channel to `address` (Unix socket or loopback TCP; TLS is a later option),
    bound to the running event loop.

    Nothing is connected until the first call; an unreachable server fails that call with
    OSError."""
    if not address:
        raise RpcConfigError("empty gRPC address")
    config = grpclib.config.Configuration(
        _keepalive_time=KEEPALIVE_SECONDS,
        http2_connection_window_size=_WINDOW_BYTES,
        http2_stream_window_size=_WINDOW_BYTES,
    )
    if address.startswith(_UNIX_PREFIX):
        path = address.removeprefix(_UNIX_PREFIX)
        if not path.startswith("/"):
            raise RpcConfigError(f"{address}: a Unix socket address needs an absolute path")
        return grpclib.client.Channel(path=path, config=config)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not digits.is_digits(port) or not 0 < int(port) < 65536:
        raise RpcConfigError(f"{address}: expected unix:///path or host:port")
    return grpclib.client.Channel(host.strip("[]"), int(port), config=config)


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
