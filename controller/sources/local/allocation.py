"""ClusterIP allocation from the service CIDR.

Invariant: an address is handed out at most once until it is released. Allocation walks the
range from a cursor that only moves forward (wrapping at the end), so an address freed by a
deleted Service is not reused at once; clients that cached the old VIP see a dead address rather
than someone else's service.
"""

from __future__ import annotations

import ipaddress

from controller.sources.local import errors

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"


class ClusterIpAllocator:
    def __init__(self, cidr: str = DEFAULT_SERVICE_CIDR) -> None:
        try:
            network = ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise errors.AllocationError(f"invalid service CIDR {cidr!r}: {exc}") from exc
        if network.num_addresses < 4:
            raise errors.AllocationError(f"service CIDR {cidr} is too small")
        self.cidr = str(network)
        self._network = network
        # The network and broadcast addresses are never handed out.
        self._first = int(network.network_address) + 1
        self._last = int(network.broadcast_address) - 1
        self._used: set[int] = set()
        self._cursor = self._first

    @property
    def size(self) -> int:
        return self._last - self._first + 1

    @property
    def used(self) -> int:
        return len(self._used)

    def is_allocated(self, ip: str) -> bool:
        return self._parse(ip) in self._used

    def _parse(self, ip: str) -> int:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError as exc:
            raise errors.AllocationError(f"{ip!r} is not an IP address") from exc
        value = int(address)
        if address.version != self._network.version or not self._first <= value <= self._last:
            raise errors.AllocationError(
                f"the provided IP ({ip}) is not in the valid range. "
                f"The range of valid IPs is {self.cidr}"
            )
        return value

    def allocate(self) -> str:
        if len(self._used) >= self.size:
            raise errors.AllocationError(
                f"failed to allocate a serviceIP: range is full ({self.cidr})"
            )
        value = self._cursor
        while value in self._used:
            value = self._first if value >= self._last else value + 1
        self._used.add(value)
        self._cursor = self._first if value >= self._last else value + 1
        return str(ipaddress.ip_address(value))

    def reserve(self, ip: str) -> None:
        value = self._parse(ip)
        if value in self._used:
            raise errors.AllocationError(f"provided IP is already allocated: {ip}")
        self._used.add(value)

    def release(self, ip: str) -> None:
        try:
            self._used.discard(self._parse(ip))
        except errors.AllocationError:
            pass  # never ours (headless, or from before a CIDR change): nothing to free
