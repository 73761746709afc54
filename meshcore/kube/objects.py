"""Helpers on Kubernetes objects as JSON dicts, plus the values the client hands out.

Objects stay plain dicts (what the wire carries); these accessors never raise on a missing or
mistyped field, so a handler can read any object the server sends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"
BOOKMARK = "BOOKMARK"
ERROR = "ERROR"
EVENT_TYPES = frozenset({ADDED, MODIFIED, DELETED, BOOKMARK, ERROR})

# kubectl's annotation for client-side apply: what the last apply asked for, so the next apply
# knows which fields it owns and may remove.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    """One line of a watch stream. `object` is a `Status` for ERROR events."""

    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    object: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectList:
    items: list[dict[str, Any]]
    resource_version: str


def metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _meta_str(obj: Mapping[str, Any], key: str) -> str:
    value = metadata(obj).get(key)
    return value if isinstance(value, str) else ""


def name(obj: Mapping[str, Any]) -> str:
    return _meta_str(obj, "name")


def namespace(obj: Mapping[str, Any]) -> str:
    """The object's namespace; "" for cluster-scoped objects."""
    return _meta_str(obj, "namespace")


def uid(obj: Mapping[str, Any]) -> str:
    return _meta_str(obj, "uid")


def resource_version(obj: Mapping[str, Any]) -> str:
    return _meta_str(obj, "resourceVersion")


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return _string_map(metadata(obj).get("labels"))


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    # Not `annotations`: that name is taken by `from __future__ import annotations`.
    return _string_map(metadata(obj).get("annotations"))


def key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name): unique among the objects of one resource type."""
    return namespace(obj), name(obj)


def is_terminating(obj: Mapping[str, Any]) -> bool:
    """Deletion has started (pods wait for their kubelet; namespaces for their contents)."""
    return bool(metadata(obj).get("deletionTimestamp"))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch. Neither argument is modified; the result shares nothing.

    Objects merge key by key, ``null`` removes a key, and anything else (lists included) replaces
    the target value whole.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def build_apply_patch(
    last_applied: Mapping[str, Any], desired: Mapping[str, Any], live: Mapping[str, Any]
) -> dict[str, Any]:
    """kubectl's three-way merge for client-side apply, as a JSON merge patch onto `live`.

    Fields in `desired` that differ from `live` are set; fields the last apply set and `desired`
    no longer has are removed; fields nobody applied (server-owned: uid, resourceVersion, status,
    clusterIP, nodeName, or annotations another component wrote) are left alone. An empty result
    means the live object already matches.
    """
    patch: dict[str, Any] = {}
    for k, want in desired.items():
        have = live.get(k)
        if isinstance(want, dict) and isinstance(have, dict):
            before = last_applied.get(k)
            sub = build_apply_patch(before if isinstance(before, dict) else {}, want, have)
            if sub:
                patch[k] = sub
        elif k not in live or want != have:
            # A dict replacing a non-dict must also delete the null keys it carries: merge_patch
            # does that when it builds the value from scratch.
            patch[k] = copy.deepcopy(want)
    for k in last_applied:
        if k not in desired and k in live:
            patch[k] = None
    return patch


def build_last_applied(desired: Mapping[str, Any]) -> str:
    """The annotation value apply stores: `desired` without that annotation, as compact JSON."""
    trimmed = copy.deepcopy(dict(desired))
    meta = trimmed.get("metadata")
    if isinstance(meta, dict):
        notes = meta.get("annotations")
        if isinstance(notes, dict):
            notes.pop(LAST_APPLIED, None)
            if not notes:
                del meta["annotations"]
    return json.dumps(trimmed, sort_keys=True, separators=(",", ":"))


def find_last_applied(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration the last apply stored on `obj` ({} when none or unreadable)."""
    text = annotations_of(obj).get(LAST_APPLIED)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
