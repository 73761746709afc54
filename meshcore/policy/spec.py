"""The parts of an Istio security object the conversion reads, parsed into frozen values.

Objects are the JSON dicts the API serves. Parsing checks shapes only (a list where a list
belongs, strings inside it) and raises `InvalidPolicyError` naming the field; what the values
mean (ports, IP blocks) is checked where they are converted. An empty list counts as absent,
as it does for istiod (`len(x) > 0`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from meshcore.policy import errors

AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"
DEFAULT_ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
_DEFAULT_NAMESPACE = "default"

# What ztunnel can enforce (spec section 6), and what only a waypoint can.
SOURCE_L4_FIELDS = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
SOURCE_HTTP_FIELDS = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
OPERATION_L4_FIELDS = ("ports", "notPorts")
OPERATION_HTTP_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)

# Go's strconv.ParseBool, which istiod uses on the dry-run annotation; anything else is false.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


class PolicyAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str

    def fail(self, field: str, reason: str) -> errors.InvalidPolicyError:
        return errors.InvalidPolicyError(self.kind, self.namespace, self.name, field, reason)


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One `from[].source` or `to[].operation`: its non-empty fields, in the order written."""

    fields: tuple[tuple[str, tuple[str, ...]], ...]

    def values(self, field: str) -> tuple[str, ...]:
        for name, values in self.fields:
            if name == field:
                return values
        return ()

    def has(self, field: str) -> bool:
        return bool(self.values(field))


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """One `when[]` entry."""

    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]

    @property
    def is_l4(self) -> bool:
        return self.key in L4_CONDITION_KEYS


@dataclasses.dataclass(frozen=True, slots=True)
class RuleSpec:
    to: tuple[Entry, ...]
    from_: tuple[Entry, ...]
    when: tuple[Condition, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PolicySpec:
    """An AuthorizationPolicy as the conversion sees it."""

    ref: ObjectRef
    action: PolicyAction
    # matchLabels; None when there is no selector, {} for a selector without labels.
    selector: dict[str, str] | None
    target_refs_field: str | None  # "targetRefs" or "targetRef" when the policy has them
    is_dry_run: bool
    rules: tuple[RuleSpec, ...]


def object_ref(obj: Mapping[str, Any], kind: str) -> ObjectRef:
    """kind namespace/name of `obj`, tolerating a missing metadata (errors still need a name)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        meta = {}
    namespace = meta.get("namespace")
    name = meta.get("name")
    return ObjectRef(
        kind,
        namespace if isinstance(namespace, str) and namespace else _DEFAULT_NAMESPACE,
        name if isinstance(name, str) else "",
    )


def parse_authorization_policy(obj: Mapping[str, Any]) -> PolicySpec:
    ref = object_ref(obj, AUTHORIZATION_POLICY)
    if not isinstance(obj, Mapping):
        raise ref.fail("", f"not an object: {type(obj).__name__}")
    spec = read_mapping(ref, obj.get("spec"), "spec")
    raw_rules = read_list(ref, spec.get("rules"), "spec.rules")
    return PolicySpec(
        ref=ref,
        action=_read_action(ref, spec.get("action")),
        selector=read_selector(ref, spec.get("selector"), "spec.selector"),
        target_refs_field=_target_refs_field(ref, spec),
        is_dry_run=is_dry_run(ref, obj),
        rules=tuple(_read_rule(ref, rule, f"spec.rules[{i}]") for i, rule in enumerate(raw_rules)),
    )


def is_dry_run(ref: ObjectRef, obj: Mapping[str, Any]) -> bool:
    meta = read_mapping(ref, obj.get("metadata"), "metadata")
    annotations = read_mapping(ref, meta.get("annotations"), "metadata.annotations")
    return annotations.get(DRY_RUN_ANNOTATION) in _GO_TRUE


def read_mapping(ref: ObjectRef, value: object, path: str) -> Mapping[str, Any]:
    """A JSON object; null and absent read as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ref.fail(path, f"must be an object, not {_describe(value)}")
    return value


def read_list(ref: ObjectRef, value: object, path: str) -> list[Any]:
    """A JSON array; null and absent read as empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ref.fail(path, f"must be a list, not {_describe(value)}")
    return value


def read_strings(ref: ObjectRef, value: object, path: str) -> tuple[str, ...]:
    items = read_list(ref, value, path)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ref.fail(f"{path}[{i}]", f"must be a string, not {_describe(item)}")
    return tuple(items)


def read_selector(ref: ObjectRef, value: object, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    selector = read_mapping(ref, value, path)
    labels = read_mapping(ref, selector.get("matchLabels"), f"{path}.matchLabels")
    for key, label in labels.items():
        if not isinstance(key, str) or not isinstance(label, str):
            raise ref.fail(f"{path}.matchLabels[{key!r}]", f"must be a string: {label!r}")
    return dict(labels)


def _read_action(ref: ObjectRef, value: object) -> PolicyAction:
    if value is None or value == "":
        return PolicyAction.ALLOW  # the API's default
    try:
        return PolicyAction(value)
    except ValueError:
        known = ", ".join(a.value for a in PolicyAction)
        raise ref.fail("spec.action", f"unknown action {value!r} (one of {known})") from None


def _target_refs_field(ref: ObjectRef, spec: Mapping[str, Any]) -> str | None:
    # istiod's GetTargetRefs: targetRefs if non-empty, else the single targetRef if set.
    if read_list(ref, spec.get("targetRefs"), "spec.targetRefs"):
        return "targetRefs"
    if read_mapping(ref, spec.get("targetRef"), "spec.targetRef"):
        return "targetRef"
    return None


def _read_rule(ref: ObjectRef, value: object, path: str) -> RuleSpec:
    rule = read_mapping(ref, value, path)
    to = tuple(
        _read_entry(
            ref,
            item,
            f"{path}.to[{j}]",
            "operation",
            (*OPERATION_L4_FIELDS, *OPERATION_HTTP_FIELDS),
        )
        for j, item in enumerate(read_list(ref, rule.get("to"), f"{path}.to"))
    )
    from_ = tuple(
        _read_entry(
            ref, item, f"{path}.from[{j}]", "source", (*SOURCE_L4_FIELDS, *SOURCE_HTTP_FIELDS)
        )
        for j, item in enumerate(read_list(ref, rule.get("from"), f"{path}.from"))
    )
    when = tuple(
        _read_condition(ref, item, f"{path}.when[{k}]")
        for k, item in enumerate(read_list(ref, rule.get("when"), f"{path}.when"))
    )
    return RuleSpec(to=to, from_=from_, when=when)


def _read_entry(
    ref: ObjectRef, value: object, path: str, inner: str, known: tuple[str, ...]
) -> Entry:
    body = read_mapping(ref, read_mapping(ref, value, path).get(inner), f"{path}.{inner}")
    fields = []
    for field in known:
        values = read_strings(ref, body.get(field), f"{path}.{inner}.{field}")
        if values:
            fields.append((field, values))
    return Entry(tuple(fields))


def _read_condition(ref: ObjectRef, value: object, path: str) -> Condition:
    condition = read_mapping(ref, value, path)
    key = condition.get("key")
    if not isinstance(key, str) or not key:
        raise ref.fail(f"{path}.key", f"must be a non-empty string, not {_describe(key)}")
    return Condition(
        key=key,
        values=read_strings(ref, condition.get("values"), f"{path}.values"),
        not_values=read_strings(ref, condition.get("notValues"), f"{path}.notValues"),
    )


def _describe(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
