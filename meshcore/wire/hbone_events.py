"""The events `meshcore.wire.hbone.HboneConnection.receive_data` returns (frozen values)."""

from __future__ import annotations

import dataclasses
from typing import TypeAlias

from meshcore.wire.hbone_headers import Headers


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: the peer sent a request. Any method is delivered; answer 400 to non-CONNECT."""

    stream_id: int
    method: str
    authority: str
    headers: Headers


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelEstablished:
    """Client side: the peer answered 2xx; the tunnel now carries bytes both ways."""

    stream_id: int
    headers: Headers


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelRejected:
    """Client side: the peer answered non-2xx. Terminal: the stream is gone (reset if needed)."""

    stream_id: int
    status: int
    headers: Headers


@dataclasses.dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes; pass `flow_controlled_length` (data plus padding) to `consumed()` later.

    `data` may be a memoryview into the bytes that were read (large payloads are not copied).
    """

    stream_id: int
    data: bytes | memoryview
    flow_controlled_length: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the tunnel (TCP FIN); it may still receive our data."""

    stream_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone. `remote` is true when the peer reset (or refused) it."""

    stream_id: int
    error_code: int
    remote: bool


@dataclasses.dataclass(frozen=True, slots=True)
class WindowOpened:
    """Our send window grew on one stream, or on the connection (`stream_id` None): retry sends."""

    stream_id: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class PingAcknowledged:
    opaque: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY. NO_ERROR: streams up to `last_stream_id` go on; else all is lost."""

    error_code: int
    last_stream_id: int
    additional_data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteSettingsChanged:
    """The peer sent SETTINGS; `max_concurrent_streams` is set when that frame carried it."""

    max_concurrent_streams: int | None


Event: TypeAlias = (
    TunnelRequested
    | TunnelEstablished
    | TunnelRejected
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingAcknowledged
    | ConnectionTerminated
    | RemoteSettingsChanged
)
