"""The ServiceEntry address allocator against a real ObjectStore: every host gets a VIP of its
own in the status, keeps it across a restart of the store and the allocator, gives it back when
the host or the ServiceEntry goes, and an exhausted range is said in a condition."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from controller.sources.local import kinds, persistence, serviceentries, store
from meshcore.kube import resources
from tests.direct import store_harness

NS = "shop"
SE = resources.SERVICE_ENTRIES


def entry(name: str, *hosts: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"hosts": list(hosts), "resolution": "DNS", **spec},
    }


class Clock:
    """A second per reading: every object is younger than the ones created before it."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_767_225_600)

    def __call__(self) -> float:
        return float(next(self._ticks))


@pytest.fixture
def directory() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="se-alloc-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_store(directory: str, clock: Clock | None = None) -> store.ObjectStore:
    return store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(directory),
        clock=clock or Clock(),
    )


@pytest.fixture
def st(directory: str) -> Iterator[store.ObjectStore]:
    object_store = open_store(directory)
    object_store.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    try:
        yield object_store
    finally:
        object_store.close()


def addresses(st: store.ObjectStore, name: str) -> dict[str, str] | None:
    """host -> address in the status; None when the ServiceEntry is gone."""
    found = st.find(SE, name, NS)
    if found is None:
        return None
    return {a["host"]: a["value"] for a in (found.get("status") or {}).get("addresses") or ()}


def conditions(st: store.ObjectStore, name: str) -> list[dict[str, Any]]:
    found = st.find(SE, name, NS) or {}
    return list((found.get("status") or {}).get("conditions") or ())


def all_addresses(st: store.ObjectStore) -> list[str]:
    return [
        a["value"]
        for e in st.list(SE).items
        for a in (e.get("status") or {}).get("addresses") or ()
    ]


async def until_addresses(st: store.ObjectStore, name: str, want: dict[str, str] | int) -> None:
    """Wait for `name` to hold exactly `want` (a mapping), or that many addresses (an int)."""

    def holds() -> bool:
        found = addresses(st, name)
        if isinstance(want, int):
            return found is not None and len(found) == want
        return found == want

    await store_harness.until(
        st, f"{name} to hold {want}", holds, describe=lambda: f"it holds {addresses(st, name)}"
    )


def test_each_host_gets_its_own_address_and_gives_it_back(st: store.ObjectStore) -> None:
    async def main() -> None:
        async with store_harness.running(serviceentries.ServiceEntryAllocator(st)):
            hosts = ("api.example.com", "*.cdn.example.com", "b.example.com")
            st.create(SE, entry("api", *hosts, endpoints=[{"address": "lb.example.com"}]), NS)
            await until_addresses(
                st, "api", {"api.example.com": "240.240.0.1", "b.example.com": "240.240.0.2"}
            )
            found = st.get(SE, "api", NS)
            assert found["status"] == {
                "addresses": [
                    {"host": "api.example.com", "value": "240.240.0.1"},
                    {"host": "b.example.com", "value": "240.240.0.2"},
                ]
            }
            st.create(SE, entry("db", "db.example.com"), NS)
            await until_addresses(st, "db", {"db.example.com": "240.240.0.3"})

            # A ServiceEntry with its own addresses gets none.
            st.create(
                SE, entry("vip", "vip.example.com", addresses=["10.0.0.1"], resolution="NONE"), NS
            )
            st.create(SE, entry("last", "last.example.com"), NS)
            await until_addresses(st, "last", 1)
            assert addresses(st, "vip") == {}
            assert "status" not in st.get(SE, "vip", NS)

            # A host taken out gives its address back; the others keep theirs.
            api = st.get(SE, "api", NS)
            api["spec"]["hosts"] = ["api.example.com", "c.example.com"]
            st.replace(SE, api, NS, "api")
            await until_addresses(
                st, "api", {"api.example.com": "240.240.0.1", "c.example.com": "240.240.0.5"}
            )
            assert addresses(st, "db") == {"db.example.com": "240.240.0.3"}

            # Giving spec.addresses removes the allocated ones.
            db = st.get(SE, "db", NS)
            db["spec"]["addresses"] = ["10.0.0.2"]
            st.replace(SE, db, NS, "db")
            await until_addresses(st, "db", {})
            assert "status" not in st.get(SE, "db", NS)

            # Deleted: its addresses are free, but the next host is not handed one at once.
            st.delete(SE, "api", NS)
            st.create(SE, entry("new", "new.example.com"), NS)
            await until_addresses(st, "new", {"new.example.com": "240.240.0.6"})
            assert sorted(all_addresses(st)) == ["240.240.0.4", "240.240.0.6"]

    asyncio.run(main())


def test_allocations_survive_a_restart_unchanged(directory: str) -> None:
    clock = Clock()

    async def allocate(st: store.ObjectStore) -> None:
        async with store_harness.running(serviceentries.ServiceEntryAllocator(st)):
            for name in ("a", "b", "c"):
                st.create(SE, entry(name, f"{name}.example.com", f"{name}2.example.com"), NS)
            for name in ("a", "b", "c"):
                await until_addresses(st, name, 2)
            st.delete(SE, "c", NS)  # the highest addresses are free again

    first = open_store(directory, clock)
    first.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    asyncio.run(allocate(first))
    before = {name: addresses(first, name) for name in ("a", "b")}
    assert before == {
        "a": {"a.example.com": "240.240.0.1", "a2.example.com": "240.240.0.2"},
        "b": {"b.example.com": "240.240.0.3", "b2.example.com": "240.240.0.4"},
    }
    first.close()

    async def restart(st: store.ObjectStore) -> None:
        version = st.resource_version
        async with store_harness.running(serviceentries.ServiceEntryAllocator(st)):
            # The resync wrote nothing: every status already said what it should.
            assert st.resource_version == version
            assert {name: addresses(st, name) for name in ("a", "b")} == before
            st.create(SE, entry("d", "d.example.com"), NS)
            await until_addresses(st, "d", 1)

    second = open_store(directory, clock)
    try:
        asyncio.run(restart(second))
        # A new host gets an address after the highest held, none of anyone else's.
        assert addresses(second, "d") == {"d.example.com": "240.240.0.5"}
    finally:
        second.close()


def test_an_exhausted_range_is_a_condition_until_an_address_is_free(
    st: store.ObjectStore,
) -> None:
    async def main() -> None:
        allocator = serviceentries.ServiceEntryAllocator(st, cidr="240.240.0.0/30")  # 2 addresses
        async with store_harness.running(allocator):
            st.create(SE, entry("a", "a.example.com", "b.example.com"), NS)
            await until_addresses(st, "a", 2)
            st.create(SE, entry("c", "c.example.com"), NS)
            await store_harness.until(
                st, "the exhausted condition", lambda: bool(conditions(st, "c"))
            )
            [condition] = conditions(st, "c")
            assert condition["type"] == "AddressesAllocated"
            assert (condition["status"], condition["reason"]) == ("False", "RangeExhausted")
            assert condition["message"] == (
                "no free address left in 240.240.0.0/30 for host(s) c.example.com"
            )
            assert addresses(st, "c") == {}

            # A host of `a` goes: `c` gets its address and the condition is gone.
            a = st.get(SE, "a", NS)
            a["spec"]["hosts"] = ["a.example.com"]
            st.replace(SE, a, NS, "a")
            await until_addresses(st, "c", {"c.example.com": "240.240.0.2"})
            assert conditions(st, "c") == []

    asyncio.run(main())


def test_a_contested_address_stays_with_the_oldest(st: store.ObjectStore) -> None:
    async def main() -> None:
        async with store_harness.running(serviceentries.ServiceEntryAllocator(st)):
            st.create(SE, entry("old", "old.example.com"), NS)
            await until_addresses(st, "old", {"old.example.com": "240.240.0.1"})
            st.create(SE, entry("young", "young.example.com"), NS)
            await until_addresses(st, "young", {"young.example.com": "240.240.0.2"})

            # Someone writes the old one's address into the young one's status.
            young = st.get(SE, "young", NS)
            young["status"] = {"addresses": [{"host": "young.example.com", "value": "240.240.0.1"}]}
            st.replace(SE, young, NS, "young", subresource="status")
            await until_addresses(st, "young", {"young.example.com": "240.240.0.3"})
            assert addresses(st, "old") == {"old.example.com": "240.240.0.1"}

            # The old one is written the young one's address: it keeps it, the young one moves.
            old = st.get(SE, "old", NS)
            old["status"] = {"addresses": [{"host": "old.example.com", "value": "240.240.0.3"}]}
            st.replace(SE, old, NS, "old", subresource="status")
            await until_addresses(st, "old", {"old.example.com": "240.240.0.3"})
            await until_addresses(st, "young", {"young.example.com": "240.240.0.4"})

    asyncio.run(main())
