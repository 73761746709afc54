"""Keeping the local store's objects on disk, one JSON file per object.

Layout under the store directory::

    meta.json                                          {"resourceVersion": N}
    <group or "core">/<plural>/<namespace or _cluster>/<name>.json

Every write is atomic and durable: a temporary file in the same directory, fsync, rename over
the old file, fsync of the directory. `meta.json` reserves resourceVersions in blocks of
`META_RESERVE`: it is written *before* the first object that uses a version beyond the stored
ceiling, with a ceiling that many versions further on. The counter on disk is therefore never
behind a version a client has seen, and an object write (a node heartbeat, a pod status) costs
one file, not two. A store that closes writes its exact counter back (`close`), so that
watchers resume across a restart without relisting; after a crash the store continues from the
ceiling, which leaves a gap of at most a block (clients then relist: their versions are older
than anything the restarted store can replay).

Loading refuses to start on anything it cannot account for (a file that is not JSON, an object
whose name or kind disagrees with its path, a directory no served kind owns): a store that
silently dropped objects would tell every watcher they were deleted. Leftover temporary files
are interrupted writes whose rename never happened; they are removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol

from controller.sources.local import errors
from meshcore import digits, files, log
from meshcore.kube import objects, resources

_LOG = logging.getLogger("controller.store")

META_FILE = "meta.json"
META_RESERVE = 1000  # resourceVersions reserved by each write of meta.json
CORE_DIR = "core"
CLUSTER_DIR = "_cluster"
_TMP_SUFFIX = ".tmp"


@dataclasses.dataclass(frozen=True, slots=True)
class StoredObject:
    rtype: resources.ResourceType
    object: dict[str, Any]
    path: str  # where it came from, for error messages


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedState:
    resource_version: int
    objects: tuple[StoredObject, ...]


class Persistence(Protocol):
    def load(self, types: Iterable[resources.ResourceType]) -> LoadedState: ...

    def save_object(
        self, rtype: resources.ResourceType, obj: dict[str, Any], resource_version: int
    ) -> None:
        """Persist `obj` (which carries `resource_version`) and the counter, or raise OSError."""
        ...

    def delete_object(
        self, rtype: resources.ResourceType, namespace: str, name: str, resource_version: int
    ) -> None: ...

    def close(self, resource_version: int) -> None:
        """The store stops at `resource_version`: record it exactly (OSError if that fails)."""
        ...


class MemoryPersistence:
    """Keeps nothing: a store that starts empty every time (tests, fuzzing)."""

    def load(self, types: Iterable[resources.ResourceType]) -> LoadedState:
        return LoadedState(0, ())

    def save_object(
        self, rtype: resources.ResourceType, obj: dict[str, Any], resource_version: int
    ) -> None:
        pass

    def delete_object(
        self, rtype: resources.ResourceType, namespace: str, name: str, resource_version: int
    ) -> None:
        pass

    def close(self, resource_version: int) -> None:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: str) -> None:
    """Create `path` and its missing parents, making each new entry durable."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    _ensure_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    _fsync_dir(parent)


def write_atomic(path: str, data: bytes) -> None:
    _ensure_dir(os.path.dirname(path))
    files.write_atomic(path, data)


class FilePersistence:
    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self._ceiling = 0  # the resourceVersion meta.json holds: no version above it handed out

    def object_path(self, rtype: resources.ResourceType, namespace: str, name: str) -> str:
        scope = namespace if rtype.namespaced else CLUSTER_DIR
        return os.path.join(
            self.directory, rtype.group or CORE_DIR, rtype.plural, scope, f"{name}.json"
        )

    def close(self, resource_version: int) -> None:
        """Write the exact counter back in place of the reserved ceiling."""
        if resource_version < self._ceiling:
            self._write_meta(resource_version)

    def _write_meta(self, ceiling: int) -> None:
        data = json.dumps({"resourceVersion": ceiling}).encode()
        write_atomic(os.path.join(self.directory, META_FILE), data)
        self._ceiling = ceiling

    def _save_meta(self, resource_version: int) -> None:
        """Make sure meta.json is at or beyond `resource_version` before anything uses it."""
        if resource_version <= self._ceiling:
            return
        self._write_meta(resource_version + META_RESERVE - 1)

    def save_object(
        self, rtype: resources.ResourceType, obj: dict[str, Any], resource_version: int
    ) -> None:
        self._save_meta(resource_version)
        path = self.object_path(rtype, objects.namespace(obj), objects.name(obj))
        write_atomic(path, json.dumps(obj, separators=(",", ":")).encode())

    def delete_object(
        self, rtype: resources.ResourceType, namespace: str, name: str, resource_version: int
    ) -> None:
        self._save_meta(resource_version)
        path = self.object_path(rtype, namespace, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(path))

    # -- loading -----------------------------------------------------------------------------

    def load(self, types: Iterable[resources.ResourceType]) -> LoadedState:
        if not os.path.isdir(self.directory):
            _ensure_dir(self.directory)
            return LoadedState(0, ())
        by_dir = {(t.group or CORE_DIR, t.plural): t for t in types}
        counter = 0
        loaded: list[StoredObject] = []
        for entry in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, entry)
            if entry == META_FILE:
                counter = _load_meta(path)
            elif self._is_leftover(path):
                continue
            elif os.path.isdir(path):
                loaded.extend(self._load_group(path, entry, by_dir))
            else:
                raise errors.CorruptStoreError(path, "unexpected file in the store directory")
        newest = max((_version_of(s.object, s.path) for s in loaded), default=0)
        self._ceiling = counter
        return LoadedState(max(counter, newest), tuple(loaded))

    def _is_leftover(self, path: str) -> bool:
        name = os.path.basename(path)
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX) and os.path.isfile(path)):
            return False
        _LOG.warning("removing an interrupted write", extra=log.fields(path=path))
        os.unlink(path)
        return True

    def _load_group(
        self,
        group_path: str,
        group_dir: str,
        by_dir: dict[tuple[str, str], resources.ResourceType],
    ) -> list[StoredObject]:
        loaded = []
        for plural in sorted(os.listdir(group_path)):
            plural_path = os.path.join(group_path, plural)
            rtype = by_dir.get((group_dir, plural))
            if rtype is None or not os.path.isdir(plural_path):
                raise errors.CorruptStoreError(
                    plural_path, f"no served kind is stored here (group {group_dir!r})"
                )
            for scope in sorted(os.listdir(plural_path)):
                scope_path = os.path.join(plural_path, scope)
                if not os.path.isdir(scope_path):
                    raise errors.CorruptStoreError(scope_path, "expected a directory")
                if (scope == CLUSTER_DIR) == rtype.namespaced:
                    raise errors.CorruptStoreError(
                        scope_path,
                        f"{rtype.plural} are {'' if rtype.namespaced else 'not '}namespaced",
                    )
                namespace = "" if scope == CLUSTER_DIR else scope
                for name in sorted(os.listdir(scope_path)):
                    path = os.path.join(scope_path, name)
                    if self._is_leftover(path):
                        continue
                    loaded.append(
                        StoredObject(rtype, _load_object(path, rtype, namespace, name), path)
                    )
        return loaded


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        raise errors.CorruptStoreError(path, f"cannot read: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:
        raise errors.CorruptStoreError(path, f"not valid JSON: {exc}") from exc


def _load_meta(path: str) -> int:
    meta = _read_json(path)
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise errors.CorruptStoreError(path, "resourceVersion is not a non-negative integer")
    return version


def _version_of(obj: dict[str, Any], path: str) -> int:
    text = objects.resource_version(obj)
    if not digits.is_digits(text):
        raise errors.CorruptStoreError(path, f"resourceVersion {text!r} is not a number")
    return int(text)


def _load_object(
    path: str, rtype: resources.ResourceType, namespace: str, file_name: str
) -> dict[str, Any]:
    if not file_name.endswith(".json") or not os.path.isfile(path):
        raise errors.CorruptStoreError(path, "expected <name>.json")
    obj = _read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise errors.CorruptStoreError(path, "not an object with metadata")
    if obj.get("apiVersion") != rtype.api_version or obj.get("kind") != rtype.kind:
        raise errors.CorruptStoreError(
            path, f"holds {obj.get('apiVersion')}/{obj.get('kind')}, expected {rtype.kind}"
        )
    if objects.name(obj) != file_name.removesuffix(".json"):
        raise errors.CorruptStoreError(path, f"metadata.name is {objects.name(obj)!r}")
    if objects.namespace(obj) != namespace:
        raise errors.CorruptStoreError(path, f"metadata.namespace is {objects.namespace(obj)!r}")
    _version_of(obj, path)
    return obj
