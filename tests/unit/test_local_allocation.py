from __future__ import annotations

import pytest

from controller.sources.local import allocation, errors


def test_allocates_in_order_skipping_network_address() -> None:
    alloc = allocation.ClusterIpAllocator("10.96.0.0/16")
    assert [alloc.allocate() for _ in range(3)] == ["10.96.0.1", "10.96.0.2", "10.96.0.3"]
    assert alloc.size == 65534
    assert alloc.used == 3


def test_reserve_and_skip_reserved() -> None:
    alloc = allocation.ClusterIpAllocator("10.96.0.0/29")
    alloc.reserve("10.96.0.1")
    assert alloc.is_allocated("10.96.0.1")
    assert alloc.allocate() == "10.96.0.2"


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        (
            "10.97.0.1",
            "the provided IP (10.97.0.1) is not in the valid range. The range of valid IPs is "
            "10.96.0.0/16",
        ),
        (
            "10.96.0.0",
            "the provided IP (10.96.0.0) is not in the valid range. The range of valid IPs is "
            "10.96.0.0/16",
        ),
        (
            "10.96.255.255",
            "the provided IP (10.96.255.255) is not in the valid range. The range of valid IPs is "
            "10.96.0.0/16",
        ),
        ("fd00::1", "the provided IP (fd00::1) is not in the valid range"),
        ("nope", "'nope' is not an IP address"),
    ],
    ids=["outside", "network", "broadcast", "ipv6", "garbage"],
)
def test_reserve_rejects(ip: str, message: str) -> None:
    alloc = allocation.ClusterIpAllocator("10.96.0.0/16")
    with pytest.raises(errors.AllocationError) as err:
        alloc.reserve(ip)
    assert str(err.value).startswith(message)


def test_reserve_in_use() -> None:
    alloc = allocation.ClusterIpAllocator()
    ip = alloc.allocate()
    with pytest.raises(
        errors.AllocationError, match=r"provided IP is already allocated: 10\.96\.0\.1"
    ):
        alloc.reserve(ip)


def test_exhaustion_is_a_clear_error_and_release_makes_room() -> None:
    alloc = allocation.ClusterIpAllocator("10.96.0.0/29")  # 6 usable addresses
    ips = [alloc.allocate() for _ in range(6)]
    assert ips[-1] == "10.96.0.6"
    with pytest.raises(errors.AllocationError) as err:
        alloc.allocate()
    assert str(err.value) == "failed to allocate a serviceIP: range is full (10.96.0.0/29)"
    alloc.release("10.96.0.3")
    assert alloc.allocate() == "10.96.0.3"


def test_freed_address_is_not_reused_at_once() -> None:
    alloc = allocation.ClusterIpAllocator("10.96.0.0/29")
    first = alloc.allocate()
    alloc.release(first)
    assert alloc.allocate() == "10.96.0.2"
    alloc.release("None")  # headless: nothing to free, no error


def test_bad_cidr() -> None:
    with pytest.raises(errors.AllocationError, match="invalid service CIDR 'x'"):
        allocation.ClusterIpAllocator("x")
    with pytest.raises(errors.AllocationError, match="too small"):
        allocation.ClusterIpAllocator("10.0.0.0/31")
