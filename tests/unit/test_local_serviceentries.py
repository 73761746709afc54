"""The ServiceEntry address planner, with no store: which host gets which address, what is kept,
what is given up, and the status it writes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controller.sources.local import serviceentries as se

POOL = se.AddressPool.from_cidr(se.DEFAULT_CIDR)
FIRST = POOL.first  # 240.240.0.1
NOW = "2026-01-01T12:00:00Z"


def _held(*pairs: tuple[str, str]) -> tuple[se.HostAddress, ...]:
    return tuple(se.HostAddress(h, v) for h, v in pairs)


def _plan(
    spec: dict[str, Any],
    held: tuple[se.HostAddress, ...] = (),
    *,
    taken: frozenset[str] = frozenset(),
    yielded: frozenset[str] = frozenset(),
    pool: se.AddressPool = POOL,
    cursor: int | None = None,
) -> se.Plan:
    return se.build_plan(
        spec,
        held,
        taken=taken,
        yielded=yielded,
        pool=pool,
        cursor=pool.first if cursor is None else cursor,
    )


def _pairs(plan: se.Plan) -> list[tuple[str, str]]:
    return [(a.host, a.value) for a in plan.addresses]


def test_the_pool_skips_the_network_and_broadcast_addresses() -> None:
    assert (str(ipaddress.IPv4Address(POOL.first)), str(ipaddress.IPv4Address(POOL.last))) == (
        "240.240.0.1",
        "240.240.255.254",
    )
    assert POOL.size == 65534
    assert not POOL.contains("240.240.0.0")
    assert not POOL.contains("240.240.255.255")
    assert not POOL.contains("240.241.0.1")
    assert not POOL.contains("240.240.000.1")  # only the canonical text is ours
    assert not POOL.contains("2001:2::1")
    with pytest.raises(ValueError, match="IPv4 range of at least 4"):
        se.AddressPool.from_cidr("2001:2::/48")


@pytest.mark.parametrize(
    ("spec", "held", "taken", "yielded", "expected", "unallocated"),
    [
        pytest.param(
            {"hosts": ["a.example.com", "b.example.com"]},
            (),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.1"), ("b.example.com", "240.240.0.2")],
            (),
            id="one-per-host-in-order",
        ),
        pytest.param(
            {"hosts": ["*.example.com", "a.example.com"]},
            (),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.1")],
            (),
            id="wildcards-get-none",
        ),
        pytest.param(
            {"hosts": ["a.example.com"], "addresses": ["10.0.0.1"]},
            (("a.example.com", "240.240.0.7"),),
            frozenset(),
            frozenset(),
            [],
            (),
            id="spec-addresses-get-none-and-lose-allocated",
        ),
        pytest.param(
            {"hosts": ["a.example.com", "b.example.com"]},
            (("b.example.com", "240.240.0.9"),),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.1"), ("b.example.com", "240.240.0.9")],
            (),
            id="held-addresses-are-kept",
        ),
        pytest.param(
            {"hosts": ["a.example.com"]},
            (("gone.example.com", "240.240.0.1"),),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.2")],
            (),
            id="a-removed-host-frees-its-address-but-not-at-once",
        ),
        pytest.param(
            {"hosts": ["a.example.com"]},
            (),
            frozenset({"240.240.0.1", "240.240.0.2"}),
            frozenset(),
            [("a.example.com", "240.240.0.3")],
            (),
            id="others-addresses-are-skipped",
        ),
        pytest.param(
            {"hosts": ["a.example.com"]},
            (("a.example.com", "240.240.0.5"),),
            frozenset({"240.240.0.5"}),
            frozenset(),
            [("a.example.com", "240.240.0.5")],
            (),
            id="contested-and-outranking-keeps-it",
        ),
        pytest.param(
            {"hosts": ["a.example.com"]},
            (("a.example.com", "240.240.0.5"),),
            frozenset({"240.240.0.5"}),
            frozenset({"240.240.0.5"}),
            [("a.example.com", "240.240.0.1")],
            (),
            id="contested-and-outranked-moves",
        ),
        pytest.param(
            {"hosts": ["a.example.com", "b.example.com"]},
            (("a.example.com", "240.240.0.5"), ("b.example.com", "240.240.0.5")),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.5"), ("b.example.com", "240.240.0.1")],
            (),
            id="one-address-for-two-hosts-is-split",
        ),
        pytest.param(
            {"hosts": ["a.example.com"]},
            (("a.example.com", "10.0.0.1"),),
            frozenset(),
            frozenset(),
            [("a.example.com", "240.240.0.1")],
            (),
            id="an-address-outside-the-range-is-replaced",
        ),
    ],
)
def test_plans(
    spec: dict[str, Any],
    held: tuple[tuple[str, str], ...],
    taken: frozenset[str],
    yielded: frozenset[str],
    expected: list[tuple[str, str]],
    unallocated: tuple[str, ...],
) -> None:
    plan = _plan(spec, _held(*held), taken=taken, yielded=yielded)
    assert _pairs(plan) == expected
    assert plan.unallocated == unallocated


def test_the_cursor_moves_on_and_wraps() -> None:
    first = _plan({"hosts": ["a.example.com"]})
    assert first.cursor == FIRST + 1
    # The next one starts after the last handed out, not at the lowest free address.
    second = _plan({"hosts": ["b.example.com"]}, cursor=first.cursor)
    assert _pairs(second) == [("b.example.com", "240.240.0.2")]
    wrapped = _plan({"hosts": ["c.example.com"]}, cursor=POOL.last)
    assert _pairs(wrapped) == [("c.example.com", "240.240.255.254")]
    assert wrapped.cursor == POOL.first


def test_an_exhausted_range_leaves_the_rest_without_an_address() -> None:
    small = se.AddressPool.from_cidr("240.240.0.0/30")  # .1 and .2
    plan = _plan(
        {"hosts": ["a.example.com", "b.example.com", "c.example.com"]},
        taken=frozenset({"240.240.0.2"}),
        pool=small,
    )
    assert _pairs(plan) == [("a.example.com", "240.240.0.1")]
    assert plan.unallocated == ("b.example.com", "c.example.com")


def test_status_holds_the_addresses_and_keeps_what_others_wrote() -> None:
    plan = _plan({"hosts": ["a.example.com"]})
    other = {"type": "Reconciled", "status": "True"}
    status = se.build_status({"conditions": [other]}, plan, se.DEFAULT_CIDR, NOW)
    assert status == {
        "addresses": [{"host": "a.example.com", "value": "240.240.0.1"}],
        "conditions": [other],
    }
    # Nothing to say: no status at all.
    assert se.build_status(None, _plan({"hosts": ["*.example.com"]}), se.DEFAULT_CIDR, NOW) == {}
    # spec.addresses given: the allocated ones are removed.
    stale = {"addresses": [{"host": "a.example.com", "value": "240.240.0.1"}]}
    given = _plan({"hosts": ["a.example.com"], "addresses": ["10.0.0.1"]})
    assert se.build_status(stale, given, se.DEFAULT_CIDR, NOW) == {}


def test_the_exhausted_condition_says_why_and_keeps_its_time() -> None:
    plan = se.Plan((), ("b.example.com",), FIRST)
    status = se.build_status(None, plan, "240.240.0.0/30", NOW)
    assert status == {
        "conditions": [
            {
                "type": "AddressesAllocated",
                "status": "False",
                "reason": "RangeExhausted",
                "message": "no free address left in 240.240.0.0/30 for host(s) b.example.com",
                "lastTransitionTime": NOW,
            }
        ]
    }
    # The same again later: unchanged, so nothing is written.
    assert se.build_status(status, plan, "240.240.0.0/30", "2026-01-02T00:00:00Z") == status
    # Once every host has one, the condition goes.
    done = se.Plan((se.HostAddress("b.example.com", "240.240.0.1"),), (), FIRST)
    assert "conditions" not in se.build_status(status, done, "240.240.0.0/30", NOW)


def test_claims_read_statuses_and_spec_addresses_defensively() -> None:
    entry = {
        "metadata": {"name": "e", "namespace": "shop", "creationTimestamp": NOW},
        "spec": {"hosts": ["a.example.com"], "addresses": ["240.240.0.9", "10.0.0.1"]},
        "status": {
            "addresses": [
                {"host": "a.example.com", "value": "240.240.0.3"},
                {"host": "b.example.com", "value": "2001:2::3"},
                "junk",
                {"host": 1, "value": "240.240.0.4"},
            ]
        },
    }
    assert se.read_held(entry) == _held(
        ("a.example.com", "240.240.0.3"), ("b.example.com", "2001:2::3")
    )
    assert se.build_claims(entry, POOL) == {
        "240.240.0.3": (1, NOW, "shop", "e"),
        "240.240.0.9": se.SPEC_RANK,  # a ServiceEntry's own addresses outrank allocations
    }
    assert se.read_held({"status": {"addresses": "240.240.0.1"}}) == ()
