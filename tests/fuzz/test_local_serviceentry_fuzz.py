"""Hypothesis on the ServiceEntry schema and the address planner.

Properties: the schema judges any JSON, and ServiceEntries near the edges of valid, without
raising; the planner gives every non-wildcard host of an accepted ServiceEntry one address of
the pool that nobody else holds, keeps what it may keep, and never hands one address out twice.
"""

from __future__ import annotations

from typing import Any

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.sources.local import serviceentries, serviceentryschemas, validation

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POOL = serviceentries.AddressPool.from_cidr("240.240.0.0/28")  # 14 addresses: collisions happen

STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "*",
            "*.example.com",
            "a.example.com",
            "b.example.com",
            "example.com.",
            "A.example.com",
            "10.0.0.1",
            "10.0.0.0/24",
            "240.240.0.1",
            "240.240.0.5",
            "2001:db8::1",
            "unix:///tmp/s.sock",
            "http",
            "https",
            "TCP",
            "STATIC",
            "DNS",
            "DNS_ROUND_ROBIN",
            "NONE",
            "MESH_INTERNAL",
        ]
    ),
    st.text(max_size=10),
)
SCALARS = st.one_of(STRINGS, st.integers(-5, 70000), st.booleans(), st.none())
ANY_JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4)
)


def maybe(good: st.SearchStrategy[Any], weight: int = 4) -> st.SearchStrategy[Any]:
    """Mostly `good` (`weight` to 1), sometimes any string near the edges."""
    return st.sampled_from(range(weight + 1)).flatmap(lambda i: STRINGS if i == weight else good)


HOSTS = st.lists(
    maybe(st.sampled_from(["a.example.com", "b.example.com", "c.example.com", "*.example.com"])),
    min_size=1,
    max_size=4,
    unique=True,
)
PORTS = st.lists(
    st.fixed_dictionaries(
        {"number": maybe(st.integers(-1, 65536)), "name": st.sampled_from(["http", "tls"])},
        optional={
            "protocol": maybe(st.sampled_from(["HTTP", "tls", "TCP"])),
            "targetPort": st.integers(0, 65536),
        },
    ),
    max_size=3,
    unique_by=lambda p: p["name"],
)
ENDPOINTS = st.lists(
    st.fixed_dictionaries(
        {"address": maybe(st.sampled_from(["10.0.0.1", "lb.example.com", "2001:db8::1"]))},
        optional={
            "ports": st.dictionaries(
                maybe(st.sampled_from(["http", "tls"])), maybe(st.integers(1, 65535))
            ),
            "labels": st.dictionaries(st.sampled_from(["app", "*"]), st.sampled_from(["a", ""])),
            "weight": st.integers(-1, 2**32),
        },
    ),
    max_size=3,
)
SPECS = st.fixed_dictionaries(
    {"hosts": HOSTS},
    optional={
        "addresses": st.lists(maybe(st.sampled_from(["10.0.0.1", "240.240.0.3", "10.1.0.0/16"]))),
        "ports": PORTS,
        "endpoints": ENDPOINTS,
        "resolution": maybe(st.sampled_from(serviceentryschemas.RESOLUTIONS)),
        "location": st.sampled_from(serviceentryschemas.LOCATIONS),
        "workloadSelector": st.just({"labels": {"app": "a"}}),
        "exportTo": st.lists(maybe(st.sampled_from([".", "*"])), max_size=2),
    },
)
ADDRESSES = st.sampled_from([f"240.240.0.{i}" for i in range(17)] + ["10.0.0.1", "junk"])
HELD = st.lists(
    st.tuples(st.sampled_from(["a.example.com", "b.example.com", "gone.example.com"]), ADDRESSES),
    max_size=4,
)


def _object(spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "e", "namespace": "shop"},
        "spec": spec,
    }


@SETTINGS
@given(ANY_JSON)
def test_the_schema_judges_any_json_without_raising(value: Any) -> None:
    for obj in (value, _object(value)):
        found = validation.validate(serviceentryschemas.SERVICE_ENTRY, obj)
        assert all(isinstance(e, validation.FieldError) for e in found)
        serviceentryschemas.find_unenforced(obj if isinstance(obj, dict) else {})


@SETTINGS
@given(
    SPECS,
    HELD,
    st.frozensets(ADDRESSES, max_size=8),
    st.data(),
    st.integers(POOL.first - 2, POOL.last + 2),
)
def test_an_accepted_service_entry_gets_unique_free_addresses(
    spec: dict[str, Any],
    held: list[tuple[str, str]],
    taken: frozenset[str],
    data: st.DataObject,
    cursor: int,
) -> None:
    obj = _object(spec)
    if validation.validate(serviceentryschemas.SERVICE_ENTRY, obj):
        hypothesis.event("refused")
        return
    hypothesis.event("accepted")
    yielded = data.draw(st.frozensets(st.sampled_from(sorted(taken)))) if taken else frozenset()
    held_addresses = tuple(serviceentries.HostAddress(h, v) for h, v in held)
    plan = serviceentries.build_plan(
        spec, held_addresses, taken=taken, yielded=yielded, pool=POOL, cursor=cursor
    )
    values = [a.value for a in plan.addresses]
    assert len(values) == len(set(values))
    assert all(POOL.contains(v) for v in values)
    if spec.get("addresses"):
        assert (plan.addresses, plan.unallocated) == ((), ())
        return
    hosts = serviceentries.find_hosts(spec)
    assert sorted([a.host for a in plan.addresses] + list(plan.unallocated)) == sorted(hosts)
    kept = {(h, v) for h, v in held}
    for address in plan.addresses:
        # A new address is nobody else's; an address held by someone else is kept only when
        # this ServiceEntry held it for that host and does not have to give it up.
        if address.value in taken:
            assert (address.host, address.value) in kept
            assert address.value not in yielded
    if plan.unallocated:
        # Only a full pool leaves a host without an address.
        blocked = {v for v in taken | {v for _, v in held} | set(values) if POOL.contains(v)}
        assert len(blocked) == POOL.size
