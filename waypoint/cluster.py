"""A destination (service host and subset) as the waypoint balances over it: its endpoints'
health (outlier detection), the choice of an endpoint per request (the DestinationRule's load
balancer) and admission (its connection pool limits, circuit breaking).

Semantics, after Envoy as Istio configures it:
- Outlier detection: `consecutive_5xx` 5xx answers (or failed connections) in a row eject an
  endpoint for `base_ejection_time` times the number of its ejections so far; an ejection that
  would take more than `max_ejection_percent` of the endpoints out is skipped, except that one
  endpoint may always be ejected. Ejected endpoints are not chosen; when all are, none is
  (503, no healthy upstream: Istio turns Envoy's panic mode off).
- Circuit breaking: at most `min(max_connections, max_requests)` requests in flight (HTTP/1.1
  upstream: one connection each), at most `max_pending_requests` waiting for one; beyond that
  the request is refused at once (503, flag UO).
- Balancing: round robin, least request (the better of two random picks, as Envoy does),
  random, or consistent hashing of a header, cookie, query parameter or the source address
  (rendezvous hashing: the same key keeps its endpoint while that endpoint stays).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import random
import time
from collections.abc import Callable, Sequence

from meshcore.traffic import destinations
from waypoint import http1, upstream


class PoolOverflowError(Exception):
    """The destination's connection pool is full: refuse (503 UO)."""


@dataclasses.dataclass(slots=True)
class _Health:
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class Cluster:
    def __init__(
        self,
        policy: destinations.TrafficPolicy,
        *,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._rng = rng
        self._clock = clock
        self._health: dict[upstream.Endpoint, _Health] = {}
        self._active: dict[upstream.Endpoint, int] = collections.Counter()
        self._next = 0
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    # -- admission --

    @property
    def _limit(self) -> int:
        pool = self.policy.connection_pool
        return min(pool.max_connections, pool.max_requests)

    async def admit(self) -> None:
        """A slot for one request, or `PoolOverflowError`."""
        if self.in_flight < self._limit and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.policy.connection_pool.max_pending_requests:
            raise PoolOverflowError()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is handed over by `release`
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight stays: the slot changes hands
                return
        self.in_flight -= 1

    # -- health --

    def is_ejected(self, endpoint: upstream.Endpoint) -> bool:
        health = self._health.get(endpoint)
        return health is not None and health.ejected_until > self._clock()

    def record(
        self, endpoint: upstream.Endpoint, *, failed: bool, all_: Sequence[upstream.Endpoint]
    ) -> None:
        """The outcome of one try at `endpoint` (failed: a 5xx or a failed connection)."""
        detection = self.policy.outlier_detection
        if detection is None or detection.consecutive_5xx <= 0:
            return
        health = self._health.setdefault(endpoint, _Health())
        if not failed:
            health.consecutive_errors = 0
            return
        health.consecutive_errors += 1
        if health.consecutive_errors < detection.consecutive_5xx or self.is_ejected(endpoint):
            return
        ejected = sum(1 for e in all_ if self.is_ejected(e))
        if ejected > 0 and (ejected + 1) * 100 > detection.max_ejection_percent * len(all_):
            return  # over the limit (one ejection is always allowed)
        health.ejections += 1
        health.consecutive_errors = 0
        health.ejected_until = self._clock() + detection.base_ejection_time * health.ejections

    # -- balancing --

    def started(self, endpoint: upstream.Endpoint) -> None:
        self._active[endpoint] += 1

    def finished(self, endpoint: upstream.Endpoint) -> None:
        self._active[endpoint] -= 1

    def pick(
        self,
        found: Sequence[upstream.Endpoint],
        avoid: set[upstream.Endpoint],
        head: http1.RequestHead,
        source_ip: str,
    ) -> upstream.Endpoint | None:
        """The endpoint for this try: healthy, not among those that failed this request when
        another is left; None when every endpoint is ejected."""
        healthy = [e for e in found if not self.is_ejected(e)]
        if not healthy:
            return None
        candidates = [e for e in healthy if e not in avoid] or healthy
        lb = self.policy.load_balancer
        kind = lb.balancing
        if kind is destinations.Balancing.HASH:
            key = _hash_key(lb, head, source_ip)
            if key is not None:
                return max(candidates, key=lambda e: _weight(key, e))
            kind = destinations.Balancing.ROUND_ROBIN  # no key in this request
        if kind is destinations.Balancing.RANDOM:
            return self._rng.choice(candidates)
        if kind is destinations.Balancing.LEAST_REQUEST and len(candidates) > 1:
            a, b = self._rng.sample(candidates, 2)
            return a if self._active[a] <= self._active[b] else b
        self._next += 1
        return candidates[self._next % len(candidates)]


def _hash_key(lb: destinations.LoadBalancer, head: http1.RequestHead, source_ip: str) -> str | None:
    on = lb.hash_on
    if on is destinations.HashOn.HEADER:
        return head.header(lb.hash_key)
    if on is destinations.HashOn.COOKIE:
        for name, value in head.headers:
            if name == "cookie":
                for part in value.split(";"):
                    cookie, _, content = part.strip().partition("=")
                    if cookie == lb.hash_key:
                        return content
        return None
    if on is destinations.HashOn.QUERY_PARAMETER:
        query = head.target.partition("?")[2]
        for part in query.split("&"):
            param, _, content = part.partition("=")
            if param == lb.hash_key:
                return content
        return None
    return source_ip


def _weight(key: str, endpoint: upstream.Endpoint) -> bytes:
    return hashlib.blake2b(f"{key}|{endpoint[0]}|{endpoint[1]}".encode(), digest_size=8).digest()
