"""The controller's xDS resource cache: what every stream serves, with versions and a change log.

Invariants:
- Each resource is held pre-serialised: `Entry.wire` is its `Resource` element exactly as it
  appears inside a DeltaDiscoveryResponse (field tag, length, bytes), so serving N clients never
  converts, copies or re-encodes a resource N times: a response is a short header plus a join
  of these bytes.
- A resource's version is the hash of its bytes: an update with identical content is a no-op
  (no generation bump, no wake-up, nothing re-sent).
- `generation` only grows. The change log records, per generation, the names that changed, so a
  stream that is `k` changes behind diffs only those names; if it fell off the bounded log it
  falls back to a full diff of versions.
- `update` wakes every subscriber once per batch, and only when something changed.
- `versions(type_url)` is one shared, read-only name -> version map per type and generation:
  every stream that holds the whole of a type points at it instead of keeping its own copy.

Single-threaded: call everything from the event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2

from meshcore.proto import discovery_pb2
from meshcore.xds import resources


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    version: str
    resource: any_pb2.Any
    # The DeltaDiscoveryResponse `resources` element (name, version, resource), field tag and
    # length included: concatenated after a serialised response header, it is that response.
    wire: bytes


# DeltaDiscoveryResponse.resources is field 2, length-delimited: tag (2 << 3) | 2.
_RESOURCES_TAG = bytes([(2 << 3) | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def build_wire(name: str, version: str, resource: any_pb2.Any) -> bytes:
    """One `resources` element of a DeltaDiscoveryResponse, ready to concatenate."""
    body = discovery_pb2.Resource(name=name, version=version, resource=resource).SerializeToString(
        deterministic=True
    )
    return _RESOURCES_TAG + _varint(len(body)) + body


class ResourceCache:
    def __init__(self, *, history: int = 4096) -> None:
        self.generation = 0
        self._entries: dict[str, dict[str, Entry]] = {}
        # (generation, type_url, names changed) per update, oldest first.
        self._log: collections.deque[tuple[int, str, frozenset[str]]] = collections.deque(
            maxlen=history
        )
        self._subscribers: set[asyncio.Event] = set()
        # type_url -> the shared versions map of its current contents, built on first use.
        self._versions: dict[str, Mapping[str, str]] = {}

    def update(
        self,
        type_url: str,
        upserts: Mapping[str, any_pb2.Any],
        removals: Iterable[str] = (),
    ) -> None:
        """Insert or replace `upserts` and delete `removals` (unknown names are ignored)."""
        entries = self._entries.setdefault(type_url, {})
        changed: set[str] = set()
        for name, resource in upserts.items():
            version = resources.resource_version(resource)
            old = entries.get(name)
            if old is not None and old.version == version:
                continue
            entries[name] = Entry(version, resource, build_wire(name, version, resource))
            changed.add(name)
        for name in removals:
            if name in upserts:
                continue  # upserted and removed in one batch: the upsert wins
            if entries.pop(name, None) is not None:
                changed.add(name)
        if not changed:
            return
        self._versions.pop(type_url, None)
        self.generation += 1
        self._log.append((self.generation, type_url, frozenset(changed)))
        for event in self._subscribers:
            event.set()

    def replace(self, type_url: str, resources_now: Mapping[str, any_pb2.Any]) -> None:
        """Make `type_url` hold exactly `resources_now` (a resync), sending only the differences."""
        stale = [name for name in self._entries.get(type_url, {}) if name not in resources_now]
        self.update(type_url, resources_now, stale)

    def snapshot(self, type_url: str) -> Mapping[str, Entry]:
        """The live name -> Entry map of `type_url` (read-only by contract: it is not copied)."""
        return self._entries.get(type_url, {})

    def versions(self, type_url: str) -> Mapping[str, str]:
        """name -> version of everything `type_url` holds now. Shared by every caller until the
        type next changes (then a new map is built): never mutate it."""
        view = self._versions.get(type_url)
        if view is None:
            view = {name: entry.version for name, entry in self._entries.get(type_url, {}).items()}
            self._versions[type_url] = view
        return view

    def find(self, type_url: str, name: str) -> Entry | None:
        return self._entries.get(type_url, {}).get(name)

    def changes_since(self, type_url: str, generation: int) -> set[str] | None:
        """Names of `type_url` changed after `generation`; None when the log no longer covers it."""
        if generation >= self.generation:
            return set()
        if not self._log or self._log[0][0] > generation + 1:
            return None
        names: set[str] = set()
        # Walk back from the newest batch; stop at the first one the caller has already seen.
        for batch_generation, batch_type, batch_names in reversed(self._log):
            if batch_generation <= generation:
                break
            if batch_type == type_url:
                names |= batch_names
        return names

    def subscribe(self, event: asyncio.Event) -> None:
        """`event` is set after every update that changed something."""
        self._subscribers.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)
