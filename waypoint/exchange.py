"""One request through the waypoint: plan it, then forward it (with retries and timeouts) or
answer it locally, streaming the bodies both ways.

An `Exchange` is driven by two sides: the downstream connection feeds it the request (head,
body pieces, end) as they are parsed, and an `_Attempt` per upstream try feeds it the response.
A stale attempt (one that timed out or was given up for a retry) is cut off from the exchange,
so nothing it says reaches the client.

Retries are only possible while the request body is replayable: it is kept while it stays
under `REPLAY_LIMIT` bytes; past that a failed try is final. A response already started
downstream is never retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

from meshcore import digits
from meshcore.traffic import routes
from waypoint import cluster, http1, routing, tracing, upstream

REPLAY_LIMIT = 64 * 1024
# Istio's mesh default when a route sets no retries: two more tries on connect failures,
# refused streams and 503s.
DEFAULT_RETRIES = routes.Retries(
    2,
    None,
    ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"),
)
_RETRIABLE_STATUS_CODES = frozenset({503})
_GATEWAY_ERRORS = frozenset({502, 503, 504})


class Endpoints(Protocol):
    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        """Where `host` (qualified) is served, for `subset` and service `port`."""
        ...


class Upstreams(Endpoints, Protocol):
    """Everything an exchange needs to reach a destination."""

    @property
    def pool(self) -> upstream.UpstreamPool: ...

    def find_cluster(self, destination: routes.Destination) -> cluster.Cluster: ...


class Downstream(Protocol):
    """Where one exchange's response goes; the framing (HTTP/1.1 or HTTP/2) is its business."""

    def send_head(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        length: int | None,
        *,
        no_body: bool,
        close: bool,
    ) -> bool:
        """Start the response; True when the connection closes after it."""
        ...

    def send_body(self, data: bytes) -> None: ...

    def send_end(self) -> None: ...

    def set_upstream_paused(self, paused: bool) -> None: ...

    def check_buffers(self) -> None:
        """What was buffered for this exchange went upstream: reading may resume."""
        ...


@dataclasses.dataclass(slots=True)
class Outcome:
    status: int = 0
    flag: routing.Flag | None = None
    attempts: int = 0
    endpoint: upstream.Endpoint | None = None
    upstream_bytes: int = 0  # response body bytes relayed
    request_bytes: int = 0
    destination_host: str = ""  # the service the route chose
    duration_ms: float = 0.0  # from the request head to the end of the answer


def _retriable_status(status: int, retry_on: tuple[str, ...]) -> bool:
    for condition in retry_on:
        if condition == "5xx" and status >= 500:
            return True
        if condition == "gateway-error" and status in _GATEWAY_ERRORS:
            return True
        if condition == "retriable-status-codes" and status in _RETRIABLE_STATUS_CODES:
            return True
        if digits.is_digits(condition) and int(condition) == status:
            return True
    return False


def _retriable_failure(retry_on: tuple[str, ...]) -> bool:
    return any(c in ("5xx", "gateway-error", "connect-failure", "reset") for c in retry_on)


class _Attempt:
    """One upstream try; its callbacks go to the exchange until it is cut off."""

    def __init__(self, exchange: Exchange, conn: upstream.UpstreamConnection) -> None:
        self.exchange: Exchange | None = exchange
        self.conn = conn
        self.result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def cut(self) -> None:
        self.exchange = None

    def on_response_head(self, head: http1.ResponseHead) -> None:
        if self.exchange is not None:
            self.exchange.response_head(self, head)

    def on_response_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(data)

    def on_response_end(self) -> None:
        if self.exchange is not None:
            self.exchange.response_end(self)

    def on_upstream_lost(self, reason: str) -> None:
        if not self.result.done():
            self.result.set_result(f"lost: {reason}")

    def on_upstream_writable(self, writable: bool) -> None:
        if self.exchange is not None:
            self.exchange.downstream.set_upstream_paused(not writable)


class Exchange:
    def __init__(self, head: http1.RequestHead, downstream: Downstream, source_ip: str) -> None:
        self.head = head
        self.downstream = downstream
        self.source_ip = source_ip
        self.started = time.monotonic()
        self.span: tracing.Span | None = None  # when the waypoint traces
        self.outcome = Outcome()
        self._body: list[bytes] = []
        self._body_size = 0
        self.is_replayable = True
        self.is_body_done = not head.has_body
        self._attempt: _Attempt | None = None
        self._response_started = False
        self._response_ops: tuple[routes.HeaderOps, ...] = ()
        self._retry_on: tuple[str, ...] = ()
        self._tries_left = 0
        self.closes_connection = not head.keep_alive
        self._is_answered = False  # a local reply went out: the rest of the body is dropped

    # -- the request, from the downstream parser --

    def request_body(self, data: bytes) -> None:
        self.outcome.request_bytes += len(data)
        if self._is_answered:
            return  # answered without it: read and dropped
        if self.is_replayable:
            self._body.append(data)
            self._body_size += len(data)
            if self._body_size > REPLAY_LIMIT and self._attempt is not None:
                self.is_replayable = False  # already sent on: not kept
                self._body = []
        if self._attempt is not None:
            self._attempt.conn.write(http1.encode_chunk(data) if self.head.is_chunked else data)

    def request_end(self) -> None:
        self.is_body_done = True
        if self._attempt is not None and self.head.is_chunked:
            self._attempt.conn.write(http1.LAST_CHUNK)

    def set_upstream_reading(self, on: bool) -> None:
        """The client can (not) take more: stop (resume) reading the response."""
        if self._attempt is not None:
            if on:
                self._attempt.conn.resume_reading()
            else:
                self._attempt.conn.pause_reading()

    @property
    def buffered(self) -> int:
        return self._body_size if self._attempt is None else 0

    # -- running it --

    async def run(
        self, plan: routing.ForwardPlan | routing.LocalReply, upstreams: Upstreams
    ) -> Outcome:
        if plan.delay is not None:
            await asyncio.sleep(plan.delay)
            self.outcome.flag = routing.Flag.FAULT_DELAY
        if isinstance(plan, routing.LocalReply):
            self._reply(plan.status, plan.body, plan.flag or self.outcome.flag, plan.headers)
            return self.outcome
        route = plan.route
        destination = plan.destination
        self.outcome.destination_host = destination.host
        found = upstreams.find_endpoints(destination.host, destination.subset, destination.port)
        if not found:
            self._reply(503, "no healthy upstream", routing.Flag.NO_HEALTHY_UPSTREAM)
            return self.outcome
        target = upstreams.find_cluster(destination)
        try:
            await target.admit()
        except cluster.PoolOverflowError:
            self._reply(
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                routing.Flag.UPSTREAM_OVERFLOW,
            )
            return self.outcome
        retries = route.retries if route.retries is not None else DEFAULT_RETRIES
        self._retry_on = retries.retry_on
        self._tries_left = retries.attempts
        self._response_ops = plan.response_ops
        forwarding = self._forward(plan, found, target, upstreams.pool, retries.per_try_timeout)
        try:
            if route.timeout is None:
                await forwarding  # no timeout context per request when none is configured
            else:
                async with asyncio.timeout(route.timeout):
                    await forwarding
        except TimeoutError:
            self._cut_attempt(close=True)
            if not self._response_started:
                self._reply(504, "upstream request timeout", routing.Flag.UPSTREAM_TIMEOUT)
            else:
                self.outcome.flag = routing.Flag.UPSTREAM_TIMEOUT
                self.closes_connection = True  # a half-sent response cannot be finished
        finally:
            target.release()
        return self.outcome

    async def _forward(
        self,
        plan: routing.ForwardPlan,
        found: Sequence[upstream.Endpoint],
        target: cluster.Cluster,
        pool: upstream.UpstreamPool,
        per_try: float | None,
    ) -> None:
        failed: set[upstream.Endpoint] = set()
        while True:
            endpoint = target.pick(found, failed, self.head, self.source_ip)
            if endpoint is None:
                self._reply(503, "no healthy upstream", routing.Flag.NO_HEALTHY_UPSTREAM)
                return
            self.outcome.attempts += 1
            self.outcome.endpoint = endpoint
            target.started(endpoint)
            trying = self._try(plan, endpoint, pool, target)
            try:
                if per_try is None:
                    result = await trying
                else:
                    async with asyncio.timeout(per_try):
                        result = await trying
            except TimeoutError:
                if self._response_started or per_try is None:
                    target.record(endpoint, failed=True, all_=found)
                    raise
                self._cut_attempt(close=True)
                result = "timeout"
            except OSError as exc:
                result = f"connect: {exc.strerror or exc}"
            finally:
                target.finished(endpoint)
            is_error = result != "done" or self.outcome.status >= 500
            target.record(endpoint, failed=is_error, all_=found)
            if result == "done":
                return
            failed.add(endpoint)
            can_retry = (
                self._tries_left > 0
                and not self._response_started
                and (self.is_replayable or self.outcome.request_bytes == 0)
                and (result.startswith("status") or _retriable_failure(self._retry_on))
            )
            if not can_retry:
                if result.startswith("status"):
                    # The last retriable response was held back: say so in our own words.
                    self._reply(int(result.split()[1]), "upstream error", None)
                elif result == "timeout":
                    self._reply(504, "upstream request timeout", routing.Flag.UPSTREAM_TIMEOUT)
                elif not self._response_started:
                    flag = (
                        routing.Flag.UPSTREAM_CONNECTION_FAILURE
                        if result.startswith("connect")
                        else routing.Flag.UPSTREAM_CONNECTION_TERMINATION
                    )
                    if self.outcome.attempts > 1:
                        flag = routing.Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED
                    self._reply(503, f"upstream connect error or disconnect/reset: {result}", flag)
                else:
                    self.outcome.flag = routing.Flag.UPSTREAM_CONNECTION_TERMINATION
                    self.closes_connection = True
                return
            self._tries_left -= 1

    async def _try(
        self,
        plan: routing.ForwardPlan,
        endpoint: upstream.Endpoint,
        pool: upstream.UpstreamPool,
        target: cluster.Cluster,
    ) -> str:
        conn = await pool.fetch(endpoint)
        attempt = _Attempt(self, conn)
        self._attempt = attempt
        framing: list[tuple[str, str]] = []
        if self.head.content_length is not None:
            framing.append(("content-length", str(self.head.content_length)))
        elif self.head.is_chunked:
            framing.append(("transfer-encoding", "chunked"))
        data = http1.encode_request(self.head.method, plan.target, list(plan.headers), framing)
        body = b"".join(self._body)
        if body:
            data += http1.encode_chunk(body) if self.head.is_chunked else body
        if self.is_body_done and self.head.is_chunked:
            data += http1.LAST_CHUNK
        conn.start(attempt, data, no_body=self.head.method == "HEAD")
        self.downstream.check_buffers()
        result = await attempt.result
        if result == "done":
            self._attempt = None
            pool.release(conn, target.policy.connection_pool.max_requests_per_connection)
        else:
            self._cut_attempt(close=True)
        return result

    def _cut_attempt(self, *, close: bool) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cut()
            if close:
                attempt.conn.close()

    # -- the response, from the current attempt --

    def response_head(self, attempt: _Attempt, head: http1.ResponseHead) -> None:
        if head.status < 200:
            return  # interim responses stay upstream: the request body is sent regardless
        if (
            self._tries_left > 0
            and (self.is_replayable or self.outcome.request_bytes == 0)
            and _retriable_status(head.status, self._retry_on)
        ):
            attempt.cut()
            if not attempt.result.done():
                attempt.result.set_result(f"status {head.status}")
            return
        self.outcome.status = head.status
        headers = http1.end_to_end(head.headers)
        for ops in self._response_ops:
            headers = ops.apply(headers)
        no_body = self.head.method == "HEAD" or head.status in (204, 304)
        self._response_started = True
        self.closes_connection = self.downstream.send_head(
            head.status,
            head.reason,
            headers,
            head.content_length,
            no_body=no_body,
            close=self.closes_connection,
        )

    def response_body(self, data: bytes) -> None:
        if not self._response_started:
            return
        self.outcome.upstream_bytes += len(data)
        self.downstream.send_body(data)

    def response_end(self, attempt: _Attempt) -> None:
        if self._response_started:
            self.downstream.send_end()
        if not attempt.result.done():
            attempt.result.set_result("done")

    # -- local answers --

    def _reply(
        self,
        status: int,
        body: str,
        flag: routing.Flag | None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.outcome.status = status
        if flag is not None:
            self.outcome.flag = flag
        data = body.encode()
        self._response_started = True
        self._is_answered = True
        self._body = []
        self.closes_connection = self.downstream.send_head(
            status,
            "",
            [("content-type", "text/plain"), *headers],
            len(data),
            no_body=self.head.method == "HEAD",
            close=self.closes_connection,
        )
        if data and self.head.method != "HEAD":
            self.downstream.send_body(data)
        self.downstream.send_end()
