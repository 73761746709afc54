"""Distributed tracing at the waypoint: W3C trace context propagated, one span per request,
exported over OTLP/HTTP (JSON encoding) in batches.

Per request: a valid incoming ``traceparent`` makes the request's span its child (same trace
id); otherwise a new trace starts. The request goes upstream with a ``traceparent`` naming the
waypoint's span as parent, so the trace id crosses the waypoint. Whether the span is recorded
follows the incoming sampled flag when there is one, else the configured percentage (Istio's
`Telemetry` tracing `randomSamplingPercentage`); an unsampled request still propagates the trace.

Export never blocks a request: spans wait in a bounded buffer (oldest dropped, counted when
full) and are posted by `flush`, which the composition root runs periodically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from meshcore import log

logger = logging.getLogger("waypoint.tracing")

MAX_BUFFERED = 4096
SERVICE_NAME = "waypoint"
_SERVER = 2  # OTLP SpanKind SPAN_KIND_SERVER
_STATUS_OK, _STATUS_ERROR = 1, 2
_HEX = frozenset("0123456789abcdef")


@dataclasses.dataclass(frozen=True, slots=True)
class SpanContext:
    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16, this request's span at the waypoint
    parent_id: str  # 16, "" when the trace starts here
    sampled: bool

    @property
    def traceparent(self) -> str:
        """The header the upstream gets: our span as its parent."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) from a W3C ``traceparent``; None if invalid."""
    if value is None:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or parts[0] == "ff" or len(parts[0]) != 2:
        return None
    version, trace_id, parent_id, flags = parts[0], parts[1], parts[2], parts[3]
    if version == "00" and len(parts) != 4:
        return None
    for field, size in ((trace_id, 32), (parent_id, 16), (flags, 2), (version, 2)):
        if len(field) != size or not set(field) <= _HEX:
            return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


@dataclasses.dataclass(slots=True)
class Span:
    context: SpanContext
    name: str
    start_ns: int
    attributes: dict[str, str | int] = dataclasses.field(default_factory=dict)
    end_ns: int = 0
    is_error: bool = False


class Tracer:
    def __init__(
        self,
        endpoint: str | None,
        *,
        sample_percent: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """`endpoint`: the collector's OTLP/HTTP base URL (``http://host:4318``); None keeps
        propagating trace context but records nothing."""
        self._url = None if endpoint is None else urllib.parse.urlsplit(endpoint.rstrip("/"))
        self.sample_percent = sample_percent
        self._rng = rng or random.Random()
        self._buffer: list[Span] = []
        self.dropped = 0
        self.exported = 0

    def start(self, headers: Sequence[tuple[str, str]], name: str) -> Span:
        incoming = parse_traceparent(next((v for n, v in headers if n == "traceparent"), None))
        if incoming is not None:
            trace_id, parent_id, sampled = incoming
        else:
            trace_id, parent_id = self._rng.randbytes(16).hex(), ""
            sampled = self._rng.random() * 100 < self.sample_percent
        context = SpanContext(trace_id, self._rng.randbytes(8).hex(), parent_id, sampled)
        return Span(context, name, time.time_ns())

    def finish(self, span: Span) -> None:
        span.end_ns = time.time_ns()
        if not span.context.sampled or self._url is None:
            return
        if len(self._buffer) >= MAX_BUFFERED:
            del self._buffer[0]
            self.dropped += 1
        self._buffer.append(span)

    async def flush(self) -> None:
        """Post what is buffered; a collector that is down loses the batch, not the waypoint."""
        if not self._buffer or self._url is None:
            return
        batch, self._buffer = self._buffer, []
        body = json.dumps(build_otlp(batch)).encode()
        try:
            status = await _post(self._url, "/v1/traces", body)
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "trace export failed", extra=log.fields(error=str(exc), spans=len(batch))
            )
            return
        if status // 100 != 2:
            logger.warning(
                "trace export refused", extra=log.fields(status=status, spans=len(batch))
            )
            return
        self.exported += len(batch)


def build_otlp(spans: Sequence[Span]) -> dict[str, Any]:
    """An OTLP ExportTraceServiceRequest in the protobuf JSON mapping (hex ids, string ints)."""
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [_attribute("service.name", SERVICE_NAME)]},
                "scopeSpans": [
                    {
                        "scope": {"name": "ambient-mesh-waypoint"},
                        "spans": [_span(s) for s in spans],
                    }
                ],
            }
        ]
    }


def _span(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": span.context.trace_id,
        "spanId": span.context.span_id,
        "name": span.name,
        "kind": _SERVER,
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(span.end_ns),
        "attributes": [_attribute(k, v) for k, v in span.attributes.items()],
        "status": {"code": _STATUS_ERROR if span.is_error else _STATUS_OK},
    }
    if span.context.parent_id:
        out["parentSpanId"] = span.context.parent_id
    return out


def _attribute(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


async def _post(url: urllib.parse.SplitResult, path: str, body: bytes) -> int:
    """One HTTP/1.1 POST, connection closed after it; returns the status code."""
    host, port = url.hostname or "127.0.0.1", url.port or 4318
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"POST {url.path}{path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"not an HTTP response from the collector: {status_line[:60]!r}")
    return int(parts[1])
