"""The ServiceEntry address allocator of the local control plane: each host of a ServiceEntry
that gives no ``spec.addresses`` gets a virtual IPv4 address of its own, as istiod's ambient IP
auto-allocation hands them out (Istio 1.25, pilot/pkg/serviceregistry/serviceentry ipallocate),
written where Istio writes it::

    status:
      addresses:
      - {host: api.example.com, value: 240.240.0.1}

Rules (decided by `build_plan`, pure):
- Addresses come from 240.240.0.0/16 (Class E space no network routes), never its network or
  broadcast address; one per host, wildcard hosts (``*.example.com``) get none.
- A ServiceEntry with ``spec.addresses`` gets none; addresses allocated before are removed.
- Stable: a host keeps the address its status holds for as long as the host stays in the
  ServiceEntry. The statuses are the only record (persisted with the objects), so a restarted
  controller reads the allocations back from them and changes nothing.
- Unique: no address is handed out while any ServiceEntry holds it (in its status, or as one of
  its own ``spec.addresses``). Should two hold one anyway (a status written by hand), the
  ``spec.addresses`` holder keeps it, else the oldest ServiceEntry (creationTimestamp, then
  namespace and name); the others are given new addresses.
- Released: a deleted ServiceEntry, or a host taken out of one, frees its address. New addresses
  are taken from a cursor that only moves forward (wrapping at the end of the range), so a freed
  address is not handed to another host at once (a client may still have the old one cached);
  on start the cursor follows the highest address held.
- Exhausted: the hosts that found no free address get none, and the status says why in a
  ``AddressesAllocated: False / RangeExhausted`` condition (removed once they all have one);
  such ServiceEntries are looked at again on every change, which may have freed an address.

The other parts of the status (conditions of other types, ...) are kept as they are.
`ServiceEntryAllocator` carries the plans out through the store's status subresource, and only
when the status changes: its own write comes back as an event that finds nothing to do.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

from controller.sources.local import kinds, reconciler, serviceentryschemas
from controller.sources.local import store as store_mod
from meshcore import log
from meshcore.kube import objects

_LOG = logging.getLogger("controller.serviceentries")

SERVICE_ENTRIES = kinds.SERVICE_ENTRIES
DEFAULT_CIDR = "240.240.0.0/16"
CONDITION_TYPE = "AddressesAllocated"
REASON_EXHAUSTED = "RangeExhausted"

Key = reconciler.Key
# Who keeps a contested address: the lowest rank. A ServiceEntry's own spec.addresses come
# first, then allocations by age (creationTimestamp, namespace, name).
Rank = tuple[int, str, str, str]
SPEC_RANK: Rank = (0, "", "", "")


# -- pure parts -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AddressPool:
    """The IPv4 addresses handed out: a network without its network and broadcast address."""

    network: ipaddress.IPv4Network

    @classmethod
    def from_cidr(cls, cidr: str) -> AddressPool:
        network = ipaddress.ip_network(cidr)
        if not isinstance(network, ipaddress.IPv4Network) or network.num_addresses < 4:
            raise ValueError(f"{cidr} is not an IPv4 range of at least 4 addresses")
        return cls(network)

    @property
    def first(self) -> int:
        return int(self.network.network_address) + 1

    @property
    def last(self) -> int:
        return int(self.network.broadcast_address) - 1

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, value: str) -> bool:
        """`value` is an address this pool hands out (as text; anything else is not)."""
        try:
            address = ipaddress.IPv4Address(value)
        except ValueError:
            return False
        return self.first <= int(address) <= self.last and str(address) == value

    def find_free(self, cursor: int, is_used: Callable[[str], bool]) -> tuple[str, int] | None:
        """The first address from `cursor` on (wrapping) that is not used, and the cursor
        after it; None when every address is used."""
        value = cursor if self.first <= cursor <= self.last else self.first
        for _ in range(self.size):
            text = str(ipaddress.IPv4Address(value))
            following = self.first if value >= self.last else value + 1
            if not is_used(text):
                return text, following
            value = following
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class HostAddress:
    host: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"host": self.host, "value": self.value}


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    addresses: tuple[HostAddress, ...]  # in the order of spec.hosts
    unallocated: tuple[str, ...]  # hosts the pool had no free address for
    cursor: int  # where the next allocation starts looking


def wants_addresses(spec: Mapping[str, Any]) -> bool:
    """Allocation is for ServiceEntries that give no addresses of their own."""
    return not spec.get("addresses")


def find_hosts(spec: Mapping[str, Any]) -> list[str]:
    """The hosts that get an address: not wildcards, each once, in order."""
    hosts = spec.get("hosts")
    if not isinstance(hosts, list):
        return []
    found = [
        h for h in hosts if isinstance(h, str) and h and not serviceentryschemas.is_wildcard(h)
    ]
    return list(dict.fromkeys(found))


def read_held(entry: Mapping[str, Any]) -> tuple[HostAddress, ...]:
    """The well-formed ``status.addresses`` of `entry` (the status is free-form)."""
    status = entry.get("status")
    listed = status.get("addresses") if isinstance(status, Mapping) else None
    if not isinstance(listed, list):
        return ()
    return tuple(
        HostAddress(a["host"], a["value"])
        for a in listed
        if isinstance(a, Mapping)
        and isinstance(a.get("host"), str)
        and isinstance(a.get("value"), str)
    )


def build_rank(entry: Mapping[str, Any]) -> Rank:
    created = objects.metadata(entry).get("creationTimestamp")
    return (
        1,
        created if isinstance(created, str) else "",
        objects.namespace(entry),
        objects.name(entry),
    )


def build_claims(entry: Mapping[str, Any], pool: AddressPool) -> dict[str, Rank]:
    """The pool's addresses `entry` holds, each with the rank it holds it by."""
    claims = {a.value: build_rank(entry) for a in read_held(entry) if pool.contains(a.value)}
    spec = entry.get("spec")
    for value in (spec.get("addresses") if isinstance(spec, Mapping) else None) or ():
        if isinstance(value, str) and pool.contains(value):
            claims[value] = SPEC_RANK
    return claims


def build_plan(
    spec: Mapping[str, Any],
    held: Sequence[HostAddress],
    *,
    taken: Container[str],
    yielded: Container[str],
    pool: AddressPool,
    cursor: int,
) -> Plan:
    """The addresses a ServiceEntry with `spec` should hold, given those it holds (`held`).

    `taken`: addresses other ServiceEntries hold (never handed out anew); `yielded`: those of
    them whose holder outranks this ServiceEntry (given up if held here too).
    """
    if not wants_addresses(spec):
        return Plan((), (), cursor)
    hosts = find_hosts(spec)
    kept: dict[str, str] = {}
    for entry in held:
        if (
            entry.host in hosts
            and entry.host not in kept
            and pool.contains(entry.value)
            and entry.value not in kept.values()
            and entry.value not in yielded
        ):
            kept[entry.host] = entry.value
    # What this ServiceEntry gives up now is not handed to another of its hosts either.
    used = set(kept.values()) | {entry.value for entry in held}
    addresses: list[HostAddress] = []
    unallocated: list[str] = []
    for host in hosts:
        value = kept.get(host)
        if value is None:
            found = pool.find_free(cursor, lambda a: a in used or a in taken)
            if found is None:
                unallocated.append(host)
                continue
            value, cursor = found
            used.add(value)
        addresses.append(HostAddress(host, value))
    return Plan(tuple(addresses), tuple(unallocated), cursor)


def build_status(old: Mapping[str, Any] | None, plan: Plan, cidr: str, now: str) -> dict[str, Any]:
    """`old` (the stored status, maybe None) with the plan's addresses and condition in it;
    equal to `old` when there is nothing to change, and {} for no status at all."""
    status = copy.deepcopy(dict(old)) if isinstance(old, Mapping) else {}
    if plan.addresses:
        status["addresses"] = [a.to_json() for a in plan.addresses]
    else:
        status.pop("addresses", None)
    listed = status.get("conditions")
    conditions = list(listed) if isinstance(listed, list) else []
    before = next(
        (c for c in conditions if isinstance(c, dict) and c.get("type") == CONDITION_TYPE), None
    )
    others = [c for c in conditions if c is not before]
    if plan.unallocated:
        hosts = ", ".join(plan.unallocated)
        condition = {
            "type": CONDITION_TYPE,
            "status": "False",
            "reason": REASON_EXHAUSTED,
            "message": f"no free address left in {cidr} for host(s) {hosts}",
            "lastTransitionTime": now,
        }
        if before is not None and all(
            before.get(f) == condition[f] for f in ("status", "reason", "message")
        ):
            condition = before
        elif before is not None and before.get("status") == "False":
            condition["lastTransitionTime"] = before.get("lastTransitionTime", now)
        others.append(condition)
    if others:
        status["conditions"] = others
    else:
        status.pop("conditions", None)
    return status


# -- the controller ---------------------------------------------------------------------------


class _HeldByOthers(collections.abc.Container[str]):
    """The addresses some ServiceEntry other than `key` holds; with `rank`, only those whose
    holder outranks it."""

    def __init__(
        self, holders: Mapping[str, Mapping[Key, Rank]], key: Key, rank: Rank | None = None
    ) -> None:
        self._holders = holders
        self._key = key
        self._rank = rank

    def __contains__(self, address: object) -> bool:
        found = self._holders.get(address) if isinstance(address, str) else None
        return any(
            k != self._key and (self._rank is None or r < self._rank)
            for k, r in (found or {}).items()
        )


class ServiceEntryAllocator(reconciler.StoreReconciler):
    """Keeps ``status.addresses`` of every ServiceEntry (see the module doc).

    Invariant: `_claims` and `_holders` index what the stored ServiceEntries hold (the former
    by ServiceEntry, the latter by address); they are rebuilt from the store on every resync
    and updated from the store on every reconcile, so they are never behind a reconcile's own
    writes.
    """

    noun = "service entry addresses"

    def __init__(
        self,
        object_store: store_mod.ObjectStore,
        *,
        cidr: str = DEFAULT_CIDR,
        clock: Callable[[], float] = time.time,
        initial_retry: float = 0.5,
        max_retry: float = 30.0,
    ) -> None:
        super().__init__(
            object_store,
            watched=SERVICE_ENTRIES,
            initial_retry=initial_retry,
            max_retry=max_retry,
        )
        self._pool = AddressPool.from_cidr(cidr)
        self._clock = clock
        self._claims: dict[Key, dict[str, Rank]] = {}
        self._holders: dict[str, dict[Key, Rank]] = {}
        self._starved: set[Key] = set()  # ServiceEntries with hosts left without an address
        self._cursor = self._pool.first

    @property
    def cidr(self) -> str:
        return str(self._pool.network)

    def resync(self) -> None:
        self._claims.clear()
        self._holders.clear()
        for entry in self._store.list(SERVICE_ENTRIES).items:
            self._record(objects.key(entry), entry)
        allocated = [
            int(ipaddress.IPv4Address(a))
            for a, holders in self._holders.items()
            if any(r != SPEC_RANK for r in holders.values())
        ]
        if allocated:
            highest = max(allocated)
            self._cursor = self._pool.first if highest >= self._pool.last else highest + 1
        super().resync()

    def find_all_keys(self) -> Iterable[Key]:
        return list(self._claims)

    def find_event_keys(self, event: objects.WatchEvent) -> Iterable[Key]:
        key = objects.key(event.object)
        # The index follows the store at once: reconciles run after a run of events is read,
        # and each must see what every other entry claims by then.
        if event.type == objects.DELETED:
            self._forget(key)
        elif event.type in (objects.ADDED, objects.MODIFIED):
            self._record(key, event.object)
        keys = [key]
        # Whoever else holds an address this one claims may have to give it up.
        for address in build_claims(event.object, self._pool):
            keys.extend(sorted(k for k in self._holders.get(address, {}) if k != key))
        # Any change may have freed an address for a ServiceEntry that is waiting for one.
        keys.extend(sorted(self._starved - {key}))
        return list(dict.fromkeys(keys))

    def reconcile_one(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        entry = self._store.find(SERVICE_ENTRIES, name, namespace)
        if entry is None:
            self._forget(key)
            self._starved.discard(key)
            return
        self._record(key, entry)
        spec = entry.get("spec")
        plan = build_plan(
            spec if isinstance(spec, Mapping) else {},
            read_held(entry),
            taken=_HeldByOthers(self._holders, key),
            yielded=_HeldByOthers(self._holders, key, build_rank(entry)),
            pool=self._pool,
            cursor=self._cursor,
        )
        self._cursor = plan.cursor
        if plan.unallocated:
            self._starved.add(key)
        else:
            self._starved.discard(key)
        old = entry.get("status")
        status = build_status(old, plan, self.cidr, store_mod.format_timestamp(self._clock()))
        if status == (old if isinstance(old, Mapping) else {}):
            return
        body = copy.deepcopy(entry)
        if status:
            body["status"] = status
        else:
            body.pop("status", None)
        # The version read above is a precondition: nothing may have changed it since.
        written = self._store.replace(SERVICE_ENTRIES, body, namespace, name, subresource="status")
        self._record(key, written)
        if plan.unallocated:
            _LOG.warning(
                "service entry addresses exhausted",
                extra=log.fields(
                    namespace=namespace,
                    service_entry=name,
                    cidr=self.cidr,
                    unallocated=list(plan.unallocated),
                ),
            )
        else:
            _LOG.info(
                "service entry addresses written",
                extra=log.fields(
                    namespace=namespace,
                    service_entry=name,
                    addresses=[f"{a.host}={a.value}" for a in plan.addresses],
                ),
            )

    def _record(self, key: Key, entry: Mapping[str, Any]) -> None:
        self._forget(key)
        claims = build_claims(entry, self._pool)
        self._claims[key] = claims
        for address, rank in claims.items():
            self._holders.setdefault(address, {})[key] = rank

    def _forget(self, key: Key) -> None:
        for address in self._claims.pop(key, {}):
            holders = self._holders.get(address)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._holders[address]
