"""The controller's gRPC servers run on grpcio (clients use grpclib, see `meshcore.rpc`)."""

from __future__ import annotations

import grpc.aio

from meshcore import rpc

_OPTIONS = (
    ("grpc.max_receive_message_length", rpc.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", rpc.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", int(rpc.KEEPALIVE_SECONDS * 1000)),
)


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=_OPTIONS)


def add_listener(server: grpc.aio.Server, address: str) -> int:
    """Bind `server` to `address`; returns the port (0 for a Unix socket)."""
    if not address:
        raise rpc.RpcConfigError("empty gRPC address")
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise rpc.RpcConfigError(f"cannot listen on {address}")
    return port
