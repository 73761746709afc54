"""waypoint.cluster: outlier ejection (with its percentage cap and growing ejection time),
admission under connection-pool limits, and endpoint choice per load balancer."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from meshcore.traffic import destinations
from waypoint import cluster, http1

EPS = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _head(*headers: tuple[str, str], target: str = "/") -> http1.RequestHead:
    return http1.RequestHead("GET", target, "1.1", list(headers), True, None, False)


def _cluster(clock: Clock, **outlier: int | float) -> cluster.Cluster:
    detection = destinations.OutlierDetection(**outlier)  # type: ignore[arg-type]
    policy = destinations.TrafficPolicy(outlier_detection=detection)
    return cluster.Cluster(policy, rng=random.Random(1), clock=clock)


def test_consecutive_errors_eject_for_a_time_that_grows_with_each_ejection() -> None:
    clock = Clock()
    c = _cluster(clock, consecutive_5xx=3, base_ejection_time=10.0, max_ejection_percent=100)
    bad = EPS[0]
    for _ in range(2):
        c.record(bad, failed=True, all_=EPS)
    c.record(bad, failed=False, all_=EPS)  # a success resets the count
    for _ in range(2):
        c.record(bad, failed=True, all_=EPS)
    assert not c.is_ejected(bad)
    c.record(bad, failed=True, all_=EPS)
    assert c.is_ejected(bad)
    assert bad not in {c.pick(EPS, set(), _head(), "") for _ in range(20)}
    clock.now += 10.0
    assert not c.is_ejected(bad)
    for _ in range(3):
        c.record(bad, failed=True, all_=EPS)
    clock.now += 10.0
    assert c.is_ejected(bad)  # second ejection: twice as long
    clock.now += 10.0
    assert not c.is_ejected(bad)


def test_ejections_stop_at_the_percentage_but_one_is_always_allowed() -> None:
    clock = Clock()
    c = _cluster(clock, consecutive_5xx=1, max_ejection_percent=25)
    for endpoint in EPS:
        c.record(endpoint, failed=True, all_=EPS)
    assert [c.is_ejected(e) for e in EPS] == [True, False, False, False]
    c = _cluster(clock, consecutive_5xx=1, max_ejection_percent=0)
    c.record(EPS[0], failed=True, all_=EPS)
    assert c.is_ejected(EPS[0])  # as Envoy: at least one host may be ejected


def test_every_endpoint_ejected_means_none_is_chosen() -> None:
    clock = Clock()
    c = _cluster(clock, consecutive_5xx=1, max_ejection_percent=100)
    for endpoint in EPS[:2]:
        c.record(endpoint, failed=True, all_=EPS[:2])
    assert c.pick(EPS[:2], set(), _head(), "") is None


def test_admission_lets_limit_in_queues_pending_and_refuses_the_rest() -> None:
    async def main() -> None:
        pool = destinations.ConnectionPool(max_connections=2, max_pending_requests=1)
        c = cluster.Cluster(destinations.TrafficPolicy(connection_pool=pool), rng=random.Random())
        await c.admit()
        await c.admit()
        waiting = asyncio.ensure_future(c.admit())
        await asyncio.sleep(0)
        assert not waiting.done()
        with pytest.raises(cluster.PoolOverflowError):
            await c.admit()
        c.release()  # the slot goes to the waiting request
        await waiting
        assert c.in_flight == 2
        c.release()
        c.release()
        assert c.in_flight == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    "balancing",
    [
        destinations.Balancing.ROUND_ROBIN,
        destinations.Balancing.RANDOM,
        destinations.Balancing.LEAST_REQUEST,
    ],
)
def test_balancers_use_every_endpoint_and_avoid_failed_ones(
    balancing: destinations.Balancing,
) -> None:
    policy = destinations.TrafficPolicy(load_balancer=destinations.LoadBalancer(balancing))
    c = cluster.Cluster(policy, rng=random.Random(5))
    counts = collections.Counter(c.pick(EPS, set(), _head(), "") for _ in range(400))
    assert set(counts) == set(EPS)
    assert EPS[0] not in {c.pick(EPS, {EPS[0]}, _head(), "") for _ in range(50)}


def test_least_request_prefers_the_idler_endpoint() -> None:
    policy = destinations.TrafficPolicy(
        load_balancer=destinations.LoadBalancer(destinations.Balancing.LEAST_REQUEST)
    )
    c = cluster.Cluster(policy, rng=random.Random(5))
    for _ in range(5):
        c.started(EPS[0])
    picks = collections.Counter(c.pick(EPS[:2], set(), _head(), "") for _ in range(100))
    assert picks[EPS[1]] == 100


@pytest.mark.parametrize(
    ("hash_on", "key", "head", "source"),
    [
        (destinations.HashOn.HEADER, "x-user", _head(("x-user", "alice")), ""),
        (destinations.HashOn.COOKIE, "user", _head(("cookie", "a=1; user=alice")), ""),
        (destinations.HashOn.QUERY_PARAMETER, "u", _head(target="/p?x=1&u=alice"), ""),
        (destinations.HashOn.SOURCE_IP, "", _head(), "10.244.1.7"),
    ],
)
def test_consistent_hashing_is_stable_and_survives_other_endpoints_leaving(
    hash_on: destinations.HashOn, key: str, head: http1.RequestHead, source: str
) -> None:
    lb = destinations.LoadBalancer(destinations.Balancing.HASH, hash_on, key)
    c = cluster.Cluster(destinations.TrafficPolicy(load_balancer=lb), rng=random.Random())
    chosen = c.pick(EPS, set(), head, source)
    assert chosen is not None
    assert {c.pick(EPS, set(), head, source) for _ in range(10)} == {chosen}
    others = [e for e in EPS if e != chosen]
    assert c.pick([chosen, *others[:1]], set(), head, source) == chosen
