"""Label and field selectors: the query-string syntax and matching, as Kubernetes defines them.

Label selectors: requirements joined by commas, each one of ``k=v``, ``k==v``, ``k!=v``,
``k in (a,b)``, ``k notin (a)``, ``k`` (exists) and ``!k`` (does not exist). An empty selector
matches everything. Field selectors: ``path=v``, ``path==v``, ``path!=v`` over dotted paths
(``spec.nodeName``); a missing field reads as "". Garbage raises `SelectorError`, which the
server answers as 400 BadRequest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any

from meshcore.kube import errors

EQUALS = "="
NOT_EQUALS = "!="
IN = "in"
NOT_IN = "notin"
EXISTS = "exists"
DOES_NOT_EXIST = "!"

_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)"
_KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^{_NAME}?$")
_FIELD_PATH_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*$")


def is_label_key(key: str) -> bool:
    """A qualified name: optional DNS-subdomain prefix (<= 253) and ``/``, then a name (<= 63)."""
    if not _KEY_RE.match(key):
        return False
    prefix, _, _ = key.rpartition("/")
    return len(prefix) <= 253


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_VALUE_RE.match(value))


@dataclasses.dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # EQUALS | NOT_EQUALS | IN | NOT_IN | EXISTS | DOES_NOT_EXIST
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        if self.operator == EXISTS:
            return has
        if self.operator == DOES_NOT_EXIST:
            return not has
        if self.operator in (EQUALS, IN):
            return has and labels[self.key] in self.values
        # != and notin also match objects that lack the label (Kubernetes semantics).
        return not has or labels[self.key] not in self.values

    def __str__(self) -> str:
        if self.operator == EXISTS:
            return self.key
        if self.operator == DOES_NOT_EXIST:
            return f"!{self.key}"
        if self.operator in (EQUALS, NOT_EQUALS):
            return f"{self.key}{self.operator}{self.values[0]}"
        return f"{self.key} {self.operator} ({','.join(self.values)})"


@dataclasses.dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def selector_from_match_labels(match_labels: Mapping[str, str]) -> LabelSelector:
    """The selector a Service's `spec.selector` (or a `matchLabels`) means."""
    return LabelSelector(
        tuple(Requirement(k, EQUALS, (v,)) for k, v in sorted(match_labels.items()))
    )


def _error(kind: str, text: str, detail: str) -> errors.SelectorError:
    return errors.SelectorError(f"unable to parse {kind} selector {text!r}: {detail}")


def _split_requirements(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth > 1:
                raise _error("label", text, "nested parentheses")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _error("label", text, "unbalanced ')'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise _error("label", text, "missing ')'")
    parts.append(text[start:])
    return parts


_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_RE = re.compile(r"^(?P<key>[^=!\s]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^=!\s]*)$")


def _check_key(text: str, key: str) -> str:
    if not is_label_key(key):
        raise _error("label", text, f"invalid label key {key!r}")
    return key


def _check_value(text: str, value: str) -> str:
    if not is_label_value(value):
        raise _error("label", text, f"invalid label value {value!r}")
    return value


def _parse_requirement(text: str, part: str) -> Requirement:
    part = part.strip()
    if not part:
        raise _error("label", text, "empty requirement")
    if m := _SET_RE.match(part):
        raw = [v.strip() for v in m["values"].split(",")]
        if raw == [""]:
            raise _error("label", text, f"{m['op']!r} needs at least one value")
        values = tuple(sorted({_check_value(text, v) for v in raw}))
        return Requirement(_check_key(text, m["key"]), m["op"], values)
    if m := _EQ_RE.match(part):
        op = EQUALS if m["op"] in ("=", "==") else NOT_EQUALS
        return Requirement(_check_key(text, m["key"]), op, (_check_value(text, m["value"]),))
    if part.startswith("!"):
        return Requirement(_check_key(text, part[1:].strip()), DOES_NOT_EXIST)
    if re.fullmatch(r"\S+", part):
        return Requirement(_check_key(text, part), EXISTS)
    raise _error("label", text, f"cannot understand {part!r}")


def parse_label_selector(text: str) -> LabelSelector:
    if not text.strip():
        return LabelSelector()
    return LabelSelector(tuple(_parse_requirement(text, p) for p in _split_requirements(text)))


@dataclasses.dataclass(frozen=True, slots=True)
class FieldRequirement:
    path: str  # dotted, e.g. "spec.nodeName"
    operator: str  # EQUALS | NOT_EQUALS
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        equal = find_field(obj, self.path) == self.value
        return equal if self.operator == EQUALS else not equal

    def __str__(self) -> str:
        value = self.value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
        return f"{self.path}{self.operator}{value}"


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(r.matches(obj) for r in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(r.path for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def find_field(obj: Mapping[str, Any], path: str) -> str:
    """The field's value as a field selector sees it: a string, "" when missing or not scalar."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return ""
        value = value.get(part)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return ""


def _split_escaped(text: str, term: str) -> list[str]:
    """Split a field selector on unescaped commas, keeping escapes for the next step."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(term):
        ch = term[i]
        if ch == "\\":
            if i + 1 >= len(term):
                raise _error("field", text, "dangling '\\'")
            current.append(term[i : i + 2])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _parse_field_requirement(text: str, part: str) -> FieldRequirement:
    # Find the first unescaped operator; the value may hold escaped '=' and ','.
    i = 0
    while i < len(part):
        ch = part[i]
        if ch == "\\":
            raise _error("field", text, f"escape before the operator in {part!r}")
        if ch in "=!":
            break
        i += 1
    path = part[:i].strip()
    rest = part[i:]
    for op, size in (("==", 2), ("!=", 2), ("=", 1)):
        if rest.startswith(op):
            operator = NOT_EQUALS if op == "!=" else EQUALS
            raw = rest[size:]
            break
    else:
        raise _error("field", text, f"{part!r} has no '=', '==' or '!='")
    if not _FIELD_PATH_RE.match(path):
        raise _error("field", text, f"invalid field path {path!r}")
    value: list[str] = []
    j = 0
    while j < len(raw):
        ch = raw[j]
        if ch == "\\":
            value.append(raw[j + 1])
            j += 2
            continue
        if ch in "=!":
            raise _error("field", text, f"unescaped {ch!r} in the value of {path}")
        value.append(ch)
        j += 1
    return FieldRequirement(path, operator, "".join(value))


def parse_field_selector(text: str, supported: Collection[str] | None = None) -> FieldSelector:
    """Parse `text`; with `supported`, a path outside it is an error (as the server does)."""
    if not text.strip():
        return FieldSelector()
    requirements = []
    for part in _split_escaped(text, text):
        if not part.strip():
            raise _error("field", text, "empty requirement")
        requirement = _parse_field_requirement(text, part)
        if supported is not None and requirement.path not in supported:
            raise errors.SelectorError(f'field label not supported: "{requirement.path}"')
        requirements.append(requirement)
    return FieldSelector(tuple(requirements))
