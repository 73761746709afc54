"""Pod uid -> network namespace path, as learned from CNI ADD, persisted across agent restarts.

The runtime tells the agent a pod's netns only once, in CNI ADD. A running pod that is enrolled
later (its namespace gets the label) or kept after an agent restart can only be reached through
what was recorded then, so every change is written to disk before it is acted on.

Each entry also keeps the pod's name, namespace and service account (so a restarted agent can
rebuild ztunnel's snapshot before the API server answers) and the sandbox's container id (so a
late CNI DEL for an old sandbox cannot forget the netns of the new one).

File format (`<state dir>/netns-cache.json`, mode 0600):

    {"version": 1, "pods": {"<uid>": {"netns": "/var/run/netns/...", "namespace": "shop",
                                       "name": "web-1", "serviceAccount": "web",
                                       "containerId": "..."}}}

Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
directory. The file is small (one entry per pod of the node) and written synchronously on the
event loop, so two changes can never be reordered on disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshcore import errors, files, log

logger = logging.getLogger("cni.netns_cache")

FILE_NAME = "netns-cache.json"
FORMAT_VERSION = 1


class NetnsCacheError(errors.MeshError):
    """Reading or writing the cache file failed."""


class CorruptCacheError(NetnsCacheError):
    """The cache file exists but cannot be read as a cache."""


@dataclass(frozen=True)
class NetnsEntry:
    uid: str
    netns: str
    namespace: str
    name: str
    service_account: str
    container_id: str = ""

    @property
    def pod_ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, str]:
        return {
            "netns": self.netns,
            "namespace": self.namespace,
            "name": self.name,
            "serviceAccount": self.service_account,
            "containerId": self.container_id,
        }

    @staticmethod
    def from_json(uid: str, data: Any) -> NetnsEntry:
        """Raises ValueError naming the field at fault."""
        if not isinstance(data, dict):
            raise ValueError(f"pods.{uid}: must be an object")

        def text(key: str, *, required: bool) -> str:
            value = data.get(key, "")
            if not isinstance(value, str) or (required and not value):
                raise ValueError(f"pods.{uid}.{key}: must be a non-empty string")
            return value

        netns = text("netns", required=True)
        if not os.path.isabs(netns):
            raise ValueError(f"pods.{uid}.netns: {netns!r} is not an absolute path")
        return NetnsEntry(
            uid=uid,
            netns=netns,
            namespace=text("namespace", required=True),
            name=text("name", required=True),
            service_account=text("serviceAccount", required=False) or "default",
            container_id=text("containerId", required=False),
        )


class NetnsCache:
    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._path = os.path.join(directory, FILE_NAME)
        self._entries: dict[str, NetnsEntry] = {}

    @property
    def path(self) -> str:
        return self._path

    def load(self) -> None:
        """Read the file (a missing file is an empty cache).

        A file that is not JSON of the expected shape raises CorruptCacheError: starting empty
        would silently drop every captured pod from ztunnel's snapshot. Single malformed entries
        are skipped with a warning.
        """
        try:
            with open(self._path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._entries = {}
            return
        except OSError as exc:
            raise NetnsCacheError(f"cannot read {self._path}: {exc.strerror or exc}") from exc
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CorruptCacheError(
                f"{self._path} is not valid JSON ({exc}); move it away to start with an empty "
                "cache (pods captured before are then re-captured only when they restart)"
            ) from None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise CorruptCacheError(
                f"{self._path}: expected an object with version {FORMAT_VERSION}"
            )
        pods = doc.get("pods")
        if not isinstance(pods, dict):
            raise CorruptCacheError(f"{self._path}: pods: must be an object")
        entries: dict[str, NetnsEntry] = {}
        for uid, data in pods.items():
            try:
                entries[uid] = NetnsEntry.from_json(uid, data)
            except ValueError as exc:
                logger.warning(
                    "skipping a malformed netns cache entry",
                    extra=log.fields(path=self._path, error=str(exc)),
                )
        self._entries = entries

    def find(self, uid: str) -> NetnsEntry | None:
        return self._entries.get(uid)

    def find_by_container(self, container_id: str) -> NetnsEntry | None:
        if not container_id:
            return None
        for entry in self._entries.values():
            if entry.container_id == container_id:
                return entry
        return None

    def entries(self) -> list[NetnsEntry]:
        return list(self._entries.values())

    def record(self, entry: NetnsEntry) -> None:
        """Add or replace `entry`. On a write failure nothing changes and NetnsCacheError is
        raised."""
        if self._entries.get(entry.uid) == entry:
            return
        self._write({**self._entries, entry.uid: entry})

    def forget(self, uid: str) -> bool:
        """Drop `uid`; whether it was there.

        The entry leaves memory even when the file cannot be written (NetnsCacheError is raised
        after): the sandbox is going away, and acting on its netns would be wrong. The stale entry
        left on disk is pruned at the next start, when its netns no longer exists.
        """
        if uid not in self._entries:
            return False
        self._drop({uid})
        return True

    def prune(self, exists: Callable[[str], bool] = os.path.exists) -> list[NetnsEntry]:
        """Drop the entries whose netns file is gone (the sandbox was torn down); memory is
        updated even if writing the file fails, as in `forget`."""
        gone = [entry for entry in self._entries.values() if not exists(entry.netns)]
        if gone:
            self._drop({entry.uid for entry in gone})
        return gone

    def _drop(self, uids: set[str]) -> None:
        remaining = {k: v for k, v in self._entries.items() if k not in uids}
        try:
            self._write(remaining)
        finally:
            self._entries = remaining

    def _write(self, entries: dict[str, NetnsEntry]) -> None:
        doc = {
            "version": FORMAT_VERSION,
            "pods": {uid: entry.to_json() for uid, entry in sorted(entries.items())},
        }
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        try:
            files.write_atomic(self._path, data)
        except OSError as exc:
            raise NetnsCacheError(f"cannot write {self._path}: {exc.strerror or exc}") from exc
        # The new file is in place: memory follows it even if making the rename durable fails.
        self._entries = entries
        try:
            dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            logger.warning(
                "cannot fsync the netns cache directory",
                extra=log.fields(path=self._dir, error=exc.strerror or str(exc)),
            )
