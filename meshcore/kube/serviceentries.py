"""What a ServiceEntry's hosts are called at: one reading for everyone who needs it (the
controller's translation, the playground's name resolution)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(value: object) -> IpAddress | None:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        return None


def find_host_addresses(entry: Mapping[str, Any]) -> dict[str, tuple[IpAddress, ...]]:
    """Each host that is not a wildcard, with its addresses: the single IPs of
    `spec.addresses` (CIDR ranges name no one address), else the one the controller allocated
    it (``status.addresses``, Istio's auto-allocation), else none yet."""
    spec = entry.get("spec") or {}
    fixed = tuple(ip for a in spec.get("addresses") or () if (ip := _ip(a)) is not None)
    allocated: dict[str, IpAddress] = {}
    for item in (entry.get("status") or {}).get("addresses") or ():
        if isinstance(item, Mapping) and (ip := _ip(item.get("value"))) is not None:
            allocated.setdefault(str(item.get("host", "")), ip)
    return {
        str(host): fixed or ((allocated[host],) if host in allocated else ())
        for host in spec.get("hosts") or ()
        if not str(host).startswith("*")
    }
