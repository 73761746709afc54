"""``meshctl label``: parse ``key=value`` / ``key-`` arguments and plan the patch, with kubectl's
rules (label syntax, and an existing value changes only with ``--overwrite``). Pure."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from meshctl import errors

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class LabelError(errors.MeshctlError):
    """A label argument is malformed, or would overwrite without ``--overwrite``."""


@dataclasses.dataclass(frozen=True, slots=True)
class LabelChanges:
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class LabelPlan:
    patch: dict[str, Any] | None  # None: nothing to change
    verb: str  # "labeled", "unlabeled" or "not labeled"


def validate_key(key: str) -> str | None:
    """None if `key` is a valid label key, else why not."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase DNS subdomain of at most 253 characters"
    if not name or len(name) > 63 or not _NAME.match(name):
        return (
            "name part must be 1-63 characters, alphanumeric, '-', '_' or '.', starting and"
            " ending with an alphanumeric character"
        )
    return None


def validate_value(value: str) -> str | None:
    if value == "":
        return None
    if len(value) > 63 or not _NAME.match(value):
        return (
            "a valid label value must be empty or 1-63 characters, alphanumeric, '-', '_' or '.',"
            " starting and ending with an alphanumeric character"
        )
    return None


def parse_label_args(args: Sequence[str]) -> LabelChanges:
    """``["a=b", "c-"]`` -> set a=b, remove c. Raises LabelError naming the bad argument."""
    if not args:
        raise LabelError("at least one label update is required (key=value or key-)")
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            why = validate_key(key)
            if why:
                raise LabelError(f"invalid label key {key!r} in {arg!r}: {why}")
            why = validate_value(value)
            if why:
                raise LabelError(f"invalid label value {value!r} in {arg!r}: {why}")
            if key in to_set and to_set[key] != value:
                raise LabelError(f"label {key!r} is given twice with different values")
            to_set[key] = value
        elif arg.endswith("-"):
            key = arg[:-1]
            why = validate_key(key)
            if why:
                raise LabelError(f"invalid label key {key!r} in {arg!r}: {why}")
            to_remove.append(key)
        else:
            raise LabelError(
                f"invalid label argument {arg!r}: use key=value to set, key- to remove"
            )
    clash = set(to_set) & set(to_remove)
    if clash:
        raise LabelError(f"can not both modify and remove label(s) {sorted(clash)}")
    return LabelChanges(tuple(to_set.items()), tuple(to_remove))


def build_label_plan(
    current: Mapping[str, str], changes: LabelChanges, *, overwrite: bool
) -> LabelPlan:
    """The merge patch for `changes` against the object's `current` labels."""
    patch: dict[str, str | None] = {}
    for key, value in changes.set:
        old = current.get(key)
        if old == value:
            continue
        if old is not None and not overwrite:
            raise LabelError(f"'{key}' already has a value ({old}), and --overwrite is false")
        patch[key] = value
    for key in changes.remove:
        if key in current:
            patch[key] = None
    if not patch:
        return LabelPlan(None, "not labeled")
    verb = "labeled" if any(v is not None for v in patch.values()) else "unlabeled"
    return LabelPlan({"metadata": {"labels": patch}}, verb)
