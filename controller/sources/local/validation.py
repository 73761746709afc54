"""Validation of API objects, Kubernetes style: every error, each with its field path.

A kind is described by a small schema (`Obj`, `ListOf`, `Str`, `Int`, ...). `validate()` walks an
object against it and returns all `FieldError`s: wrong types (with the expected type), unknown
fields, missing required fields, then the semantic checks of each node, which only run once
the node's own subtree is well-typed (so a check never sees a string where it expects a list).
`build_invalid_error` joins them the way the API server does:

    Pod "web" is invalid: spec.containers[0].command: Required value
    Pod "web" is invalid: [spec.containers[0].command: Required value, spec.nodeName: ...]

The schema nodes and the rules are here; the Pod, Service, Namespace, Node and (apps/v1)
Deployment schemas are in `schemas`, Istio's security kinds in `policyschemas`; other kinds get
`schemas.GENERIC` (metadata is checked, the rest is free-form) until they have one of their own.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from meshcore.kube import errors, selectors

REQUIRED = "Required value"
INVALID = "Invalid value"
UNSUPPORTED = "Unsupported value"
DUPLICATE = "Duplicate value"
UNKNOWN = "Unknown field"
FORBIDDEN = "Forbidden"

_CAUSE_REASONS = {
    REQUIRED: "FieldValueRequired",
    INVALID: "FieldValueInvalid",
    UNSUPPORTED: "FieldValueNotSupported",
    DUPLICATE: "FieldValueDuplicate",
    UNKNOWN: "FieldValueUnknown",
    FORBIDDEN: "FieldValueForbidden",
}
_MAX_SHOWN_VALUE = 80


def render_value(value: Any) -> str:
    """A value as an error message shows it: JSON, cut short."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


@dataclasses.dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    type: str  # REQUIRED | INVALID | UNSUPPORTED | DUPLICATE | UNKNOWN | FORBIDDEN
    value: str | None = None  # already rendered; None when the message shows no value
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.path or "<root>", self.type]
        if self.value is not None:
            parts.append(self.value)
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, REQUIRED, None, detail)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, INVALID, render_value(value), detail)


def unsupported(path: str, value: Any, supported: Sequence[str]) -> FieldError:
    shown = ", ".join(json.dumps(s) for s in supported)
    return FieldError(path, UNSUPPORTED, render_value(value), f"supported values: {shown}")


def duplicate(path: str, value: Any) -> FieldError:
    return FieldError(path, DUPLICATE, render_value(value))


def unknown(path: str) -> FieldError:
    return FieldError(path, UNKNOWN)


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(path, FORBIDDEN, None, detail)


def _type_error(path: str, value: Any, expected: str) -> FieldError:
    return invalid(path, value, f"must be of type {expected}")


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def build_invalid_error(
    kind: str, name: str, field_errors: Sequence[FieldError]
) -> errors.ApiError:
    """The 422 Invalid Status the API server answers for `field_errors`."""
    texts = [str(e) for e in field_errors]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    causes = [
        {
            "reason": _CAUSE_REASONS.get(e.type, "FieldValueInvalid"),
            "message": str(e),
            "field": e.path,
        }
        for e in field_errors
    ]
    return errors.InvalidError(
        f'{kind} "{name}" is invalid: {joined}',
        details={"name": name, "kind": kind, "causes": causes},
    )


# -- rules on strings: each returns None when the value is fine, else the detail ------------

Rule = Callable[[str], str | None]

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_RE = re.compile(r"^[-a-z0-9]+$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def dns_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS_LABEL_RE.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
            "'-', and must start and end with an alphanumeric character (e.g. 'my-name', or "
            "'123-abc')"
        )
    return None


def dns_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS_SUBDOMAIN_RE.match(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character (e.g. "
            "'example.com')"
        )
    return None


def iana_svc_name(value: str) -> str | None:
    if len(value) > 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_RE.match(value):
        return "must contain only alphanumeric characters (a-z, 0-9), and hyphens (-)"
    if "--" in value:
        return "must not contain consecutive hyphens"
    if not re.search(r"[a-z]", value):
        return "must contain at least one letter (a-z)"
    if value.startswith("-") or value.endswith("-"):
        return "must not begin or end with a hyphen"
    return None


def env_var_name(value: str) -> str | None:
    if not _ENV_NAME_RE.match(value):
        return (
            "a valid environment variable name must consist of alphabetic characters, digits, "
            "'_', '-', or '.', and must not start with a digit"
        )
    return None


def label_key(value: str) -> str | None:
    if selectors.is_label_key(value):
        return None
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns_subdomain(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    return (
        "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
        "and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc')"
    )


def label_value(value: str) -> str | None:
    if selectors.is_label_value(value):
        return None
    if len(value) > 63:
        return "must be no more than 63 characters"
    return (
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
        "or '.', and must start and end with an alphanumeric character"
    )


def ip_address(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    return None


def cluster_ip(value: str) -> str | None:
    """ "" (allocate one), "None" (headless) or an address."""
    return None if value == "None" else ip_address(value)


def optional(rule: Rule) -> Rule:
    """`rule`, but "" is fine too (an unset value, as for `spec.nodeName`)."""

    def check(value: str) -> str | None:
        return None if value == "" else rule(value)

    return check


def cidr(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
    return None


_POD_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.podIP",
    "status.podIPs",
)
_ANNOTATED_FIELD_RE = re.compile(r"^metadata\.(labels|annotations)\['(?P<key>[^']+)'\]$")


def pod_field_path(value: str) -> str | None:
    """What `env[].valueFrom.fieldRef.fieldPath` may name (the downward API)."""
    if value in _POD_FIELD_PATHS:
        return None
    if (m := _ANNOTATED_FIELD_RE.match(value)) and label_key(m["key"]) is None:
        return None
    supported = ", ".join(json.dumps(p) for p in _POD_FIELD_PATHS)
    return (
        f"supported values: {supported}, \"metadata.labels['<key>']\", "
        "\"metadata.annotations['<key>']\""
    )


# -- the schema nodes ---------------------------------------------------------------------


class Schema(Protocol):
    def check(self, value: Any, path: str) -> list[FieldError]: ...


Check = Callable[[Any, str], list[FieldError]]


@dataclasses.dataclass(frozen=True, slots=True)
class Str:
    rule: Rule | None = None
    enum: tuple[str, ...] = ()
    non_empty: bool = False  # "" is a missing value (Required), as for names

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, str):
            return [_type_error(path, value, "string")]
        if self.non_empty and not value:
            return [required(path)]
        if self.enum and value not in self.enum:
            return [unsupported(path, value, self.enum)]
        if self.rule is not None and (detail := self.rule(value)) is not None:
            return [invalid(path, value, detail)]
        return []


@dataclasses.dataclass(frozen=True, slots=True)
class Int:
    minimum: int | None = None
    maximum: int | None = None
    # Name only the bound that was crossed (Kubernetes' wording for a non-negative field that
    # is also an int32), instead of the range.
    one_bound: bool = False

    def check(self, value: Any, path: str) -> list[FieldError]:
        # bool is an int in Python but not in JSON.
        if not isinstance(value, int) or isinstance(value, bool):
            return [_type_error(path, value, "integer")]
        if self.minimum is not None and value < self.minimum:
            return [invalid(path, value, self._range(low=True))]
        if self.maximum is not None and value > self.maximum:
            return [invalid(path, value, self._range(low=False))]
        return []

    def _range(self, *, low: bool) -> str:
        if self.one_bound:
            if low:
                return f"must be greater than or equal to {self.minimum}"
            return f"must be less than or equal to {self.maximum}"
        if self.maximum is None:
            return f"must be greater than or equal to {self.minimum}"
        if self.minimum is None:
            return f"must be less than or equal to {self.maximum}"
        return f"must be between {self.minimum} and {self.maximum}, inclusive"


@dataclasses.dataclass(frozen=True, slots=True)
class Number:
    """A JSON number, integer or not (a percentage such as ``0.5``), within a range."""

    minimum: float
    maximum: float

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [_type_error(path, value, "number")]
        if not self.minimum <= value <= self.maximum:
            return [invalid(path, value, f"must be between {self.minimum:g} and {self.maximum:g}")]
        return []


@dataclasses.dataclass(frozen=True, slots=True)
class Bool:
    def check(self, value: Any, path: str) -> list[FieldError]:
        return [] if isinstance(value, bool) else [_type_error(path, value, "boolean")]


@dataclasses.dataclass(frozen=True, slots=True)
class AnyObject:
    """A JSON object whose content this server does not interpret."""

    def check(self, value: Any, path: str) -> list[FieldError]:
        return [] if isinstance(value, dict) else [_type_error(path, value, "object")]


@dataclasses.dataclass(frozen=True, slots=True)
class IntOrStr:
    """Kubernetes IntOrString: a number, or a string such as a port name."""

    as_int: Int
    as_str: Str

    def check(self, value: Any, path: str) -> list[FieldError]:
        if isinstance(value, str):
            return self.as_str.check(value, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return self.as_int.check(value, path)
        return [_type_error(path, value, "integer or string")]


@dataclasses.dataclass(frozen=True, slots=True)
class StrMap:
    """A map of strings (labels, annotations, selectors); key errors name the map's path."""

    key_rule: Rule | None = None
    value_rule: Rule | None = None
    max_total_bytes: int | None = None

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        found = []
        for k, v in value.items():
            if not isinstance(k, str):
                found.append(_type_error(path, k, "string (as a key)"))
                continue
            if self.key_rule is not None and (detail := self.key_rule(k)) is not None:
                found.append(invalid(path, k, detail))
            if not isinstance(v, str):
                found.append(_type_error(f"{path}[{k}]", v, "string"))
            elif self.value_rule is not None and (detail := self.value_rule(v)) is not None:
                found.append(invalid(path, v, detail))
        if not found and self.max_total_bytes is not None:
            size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
            if size > self.max_total_bytes:
                found.append(
                    FieldError(
                        path, "Too long", None, f"must have at most {self.max_total_bytes} bytes"
                    )
                )
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class MapOf:
    """A JSON object used as a map: keys checked by `key_rule` (errors name the map's path, as
    for labels), each value by `value` at ``path[key]``."""

    value: Schema
    key_rule: Rule | None = None
    non_empty: bool = False  # {} is a missing value (Required)

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        if self.non_empty and not value:
            return [required(path)]
        found = []
        for k, v in value.items():
            if self.key_rule is not None and (detail := self.key_rule(k)) is not None:
                found.append(invalid(path, k, detail))
            found.extend(self.value.check(v, f"{path}[{k}]"))
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class ListOf:
    item: Schema
    non_empty: bool = False  # [] is a missing value (Required)
    check_list: Check | None = None

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, list):
            return [_type_error(path, value, "array")]
        if self.non_empty and not value:
            return [required(path)]
        found = []
        for i, entry in enumerate(value):
            found.extend(self.item.check(entry, item(path, i)))
        if not found and self.check_list is not None:
            found.extend(self.check_list(value, path))
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Obj:
    fields: Mapping[str, Schema]
    required: frozenset[str] = frozenset()
    check_obj: Check | None = None
    open: bool = False  # fields outside `fields` are allowed and left unchecked

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        found = []
        for name, entry in value.items():
            schema = self.fields.get(name)
            if schema is None:
                if not self.open:
                    found.append(unknown(child(path, str(name))))
                continue
            found.extend(schema.check(entry, child(path, name)))
        for name in sorted(self.required - value.keys()):
            found.append(required(child(path, name)))
        if not found and self.check_obj is not None:
            found.extend(self.check_obj(value, path))
        return found


def validate(schema: Schema, obj: Any) -> list[FieldError]:
    return schema.check(obj, "")
