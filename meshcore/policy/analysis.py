"""What of an AuthorizationPolicy ztunnel will not enforce as written, for API warnings and the
status condition istiod writes (type ZtunnelAccepted, reason UnsupportedValue). Pure.

The findings follow `meshcore.policy.authorization` exactly: each one names the field and what
the conversion does with it. They are structural: values are not parsed here (a port that is
not a number is `build_authorization`'s error, not a warning).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshcore.policy import errors, spec

STATUS_CONDITION_TYPE = "ZtunnelAccepted"
STATUS_REASON_UNSUPPORTED_VALUE = "UnsupportedValue"

HTTP_IN_ALLOW = (
    "HTTP attribute: ztunnel enforces L4 only; in an ALLOW rule the whole rule is dropped, "
    "so it never matches (stricter than written)"
)
HTTP_IN_DENY = (
    "HTTP attribute: ztunnel enforces L4 only; in a DENY rule only this field is dropped, "
    "so the deny is broader"
)
HTTP_EMPTIES_DENY_ENTRY = (
    "HTTP attribute: ztunnel enforces L4 only; in a DENY rule this field is dropped, and this "
    "entry has no other field ztunnel can match, so the entry never matches (the deny is "
    "narrower than written)"
)
HTTP_EMPTIES_DENY_RULE = (
    "HTTP attribute: ztunnel enforces L4 only; in a DENY rule this field is dropped, and no "
    "entry here has a field ztunnel can match, so the whole rule never matches (the deny is "
    "narrower than written)"
)
HTTP_CONDITION_IN_DENY = (
    "HTTP attribute: ztunnel enforces L4 only; in a DENY rule this condition is left with "
    "nothing to match, so the whole rule never matches (the deny is narrower than written)"
)
TARGET_REFS = (
    "the policy targets a waypoint or gateway: it is not sent to ztunnel (only policies "
    "with a selector, or none, are)"
)
DRY_RUN = (
    "dry-run policies are not sent to ztunnel unless the controller enables them "
    "(AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY), so ztunnel neither enforces nor logs it"
)
SELECTOR_WITHOUT_LABELS = (
    "the selector has no matchLabels: ztunnel applies this policy to no workload"
)
EMPTY_ENTRY = "empty entry: ztunnel skips an empty match, so this entry never matches"
EMPTY_ENTRIES = "empty entry: ztunnel skips an empty match, so the whole rule never matches"
CONDITION_WITHOUT_VALUES = (
    "condition without values or notValues matches nothing, so the whole rule never matches"
)
SPIFFE_PRINCIPAL = (
    "principals are written without 'spiffe://' (ztunnel strips it from the peer identity), "
    "so this value never matches"
)
NO_RULE_LEFT_ALLOW = (
    "no rule is left that ztunnel can match: this ALLOW policy matches nothing, so it denies "
    "every connection to the workloads it applies to that no other ALLOW policy allows"
)
NO_RULE_LEFT_DENY = "no rule is left that ztunnel can match: this DENY policy denies nothing"

# istiod's status text (pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go).
_HTTP_STATUS = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {consequence}"
)
_HTTP_STATUS_ALLOW = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)
_HTTP_STATUS_DENY = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)
_PRINCIPAL_FIELDS = ("principals", "notPrincipals")


class Category(enum.Enum):
    HTTP_ATTRIBUTE = "http-attribute"  # an L7 field: dropped, or its rule dropped
    TARGET_REFS = "target-refs"  # the policy is for a waypoint or gateway
    DRY_RUN = "dry-run"  # the policy is not sent
    NO_WORKLOADS = "no-workloads"  # the policy attaches to nothing
    NEVER_MATCHES = "never-matches"  # a value, rule or policy that can never match


@dataclasses.dataclass(frozen=True, slots=True)
class Unenforced:
    path: str  # e.g. "spec.rules[0].to[0].operation.methods"
    reason: str
    category: Category = Category.HTTP_ATTRIBUTE
    # For HTTP attributes: the name istiod lists in its status ("methods", a `when` key) and
    # the action of the rule it is in.
    attribute: str = ""
    action: spec.PolicyAction | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def find_unenforced(
    obj: Mapping[str, Any],
    *,
    root_namespace: str = spec.DEFAULT_ROOT_NAMESPACE,
    dry_run_enabled: bool = False,
) -> list[Unenforced]:
    """Every part of `obj` that ztunnel does not enforce as written, in document order.

    A policy with targetRefs gets that one finding; an AUDIT or CUSTOM policy none (it is
    rejected whole: see `find_action_error`). `root_namespace` only decides the policy's scope,
    which no finding depends on; it is taken so callers pass the same settings here as to
    `build_authorization`. Raises `InvalidPolicyError` when `obj` is not shaped like an
    AuthorizationPolicy (lists where lists belong, strings in them).
    """
    del root_namespace  # see the docstring
    policy = spec.parse_authorization_policy(obj)
    if policy.target_refs_field is not None:
        path = f"spec.{policy.target_refs_field}"
        return [Unenforced(path, TARGET_REFS, Category.TARGET_REFS)]
    if policy.action not in (spec.PolicyAction.ALLOW, spec.PolicyAction.DENY):
        return []
    found: list[Unenforced] = []
    if policy.is_dry_run and not dry_run_enabled:
        path = f"metadata.annotations[{spec.DRY_RUN_ANNOTATION!r}]"
        found.append(Unenforced(path, DRY_RUN, Category.DRY_RUN))
    if policy.selector is not None and not policy.selector:
        found.append(Unenforced("spec.selector", SELECTOR_WITHOUT_LABELS, Category.NO_WORKLOADS))
    for i, rule in enumerate(policy.rules):
        found.extend(_rule_findings(policy.action, rule, f"spec.rules[{i}]"))
    if policy.rules and not any(_rule_survives(policy.action, r) for r in policy.rules):
        reason = (
            NO_RULE_LEFT_ALLOW if policy.action is spec.PolicyAction.ALLOW else NO_RULE_LEFT_DENY
        )
        found.append(Unenforced("spec.rules", reason, Category.NEVER_MATCHES))
    return found


def find_action_error(obj: Mapping[str, Any]) -> str | None:
    """istiod's rejection for an action ztunnel lacks ("ztunnel does not support the AUDIT
    action"), or None. Policies with targetRefs are not ztunnel's, so they get None too.
    Raises `InvalidPolicyError` for a malformed object (an unknown action included)."""
    policy = spec.parse_authorization_policy(obj)
    if policy.target_refs_field is not None:
        return None
    if policy.action in (spec.PolicyAction.ALLOW, spec.PolicyAction.DENY):
        return None
    return errors.unsupported_action_message(policy.action.value)


def build_status_message(unenforced: Sequence[Unenforced]) -> str:
    """The ZtunnelAccepted condition message: istiod's sentence about the HTTP attributes
    found (sorted, as istiod lists them), then each other finding. Empty when there are none."""
    http = [u for u in unenforced if u.category is Category.HTTP_ATTRIBUTE]
    parts = []
    if http:
        found = ", ".join(sorted({u.attribute for u in http}))
        is_deny = any(u.action is spec.PolicyAction.DENY for u in http)
        consequence = _HTTP_STATUS_DENY if is_deny else _HTTP_STATUS_ALLOW
        parts.append(_HTTP_STATUS.format(found=found, consequence=consequence))
    parts.extend(f"{u}." for u in unenforced if u.category is not Category.HTTP_ATTRIBUTE)
    return " ".join(parts)


def _rule_findings(
    action: spec.PolicyAction, rule: spec.RuleSpec, path: str
) -> Iterable[Unenforced]:
    deny = action is spec.PolicyAction.DENY
    for section, inner, entries, l4_fields, http_fields in _sections(rule):
        # An entry ztunnel can match keeps its clause (and so its rule) alive for the others.
        section_alive = any(_has_any(e, l4_fields) for e in entries)
        for j, entry in enumerate(entries):
            where = f"{path}.{section}[{j}]"
            if not entry.fields:
                reason = EMPTY_ENTRY if section_alive else EMPTY_ENTRIES
                yield Unenforced(where, reason, Category.NEVER_MATCHES)
                continue
            if not deny:
                reason = HTTP_IN_ALLOW
            elif _has_any(entry, l4_fields):
                reason = HTTP_IN_DENY
            else:
                reason = HTTP_EMPTIES_DENY_ENTRY if section_alive else HTTP_EMPTIES_DENY_RULE
            for field in http_fields:
                if entry.has(field):
                    path_to = f"{where}.{inner}.{field}"
                    yield Unenforced(path_to, reason, attribute=field, action=action)
            for field in _PRINCIPAL_FIELDS:
                yield from _spiffe_principals(f"{where}.{inner}.{field}", entry.values(field))
    for k, condition in enumerate(rule.when):
        where = f"{path}.when[{k}]"
        if not condition.is_l4:
            reason = HTTP_CONDITION_IN_DENY if deny else HTTP_IN_ALLOW
            yield Unenforced(
                where, f"{reason} (key {condition.key!r})", attribute=condition.key, action=action
            )
        elif not condition.values and not condition.not_values:
            yield Unenforced(where, CONDITION_WITHOUT_VALUES, Category.NEVER_MATCHES)
        elif condition.key == "source.principal":
            yield from _spiffe_principals(f"{where}.values", condition.values)
            yield from _spiffe_principals(f"{where}.notValues", condition.not_values)


def _rule_survives(action: spec.PolicyAction, rule: spec.RuleSpec) -> bool:
    """Whether `build_authorization` keeps this rule: the structural half of its test."""
    has_http = any(
        _has_any(entry, http_fields)
        for _, _, entries, _, http_fields in _sections(rule)
        for entry in entries
    ) or any(not c.is_l4 for c in rule.when)
    if has_http and action is spec.PolicyAction.ALLOW:
        return False
    for _, _, entries, l4_fields, _ in _sections(rule):
        if entries and not any(_has_any(e, l4_fields) for e in entries):
            return False
    return all(c.is_l4 and (c.values or c.not_values) for c in rule.when)


_Section = tuple[str, str, tuple[spec.Entry, ...], tuple[str, ...], tuple[str, ...]]


def _sections(rule: spec.RuleSpec) -> tuple[_Section, _Section]:
    return (
        ("to", "operation", rule.to, spec.OPERATION_L4_FIELDS, spec.OPERATION_HTTP_FIELDS),
        ("from", "source", rule.from_, spec.SOURCE_L4_FIELDS, spec.SOURCE_HTTP_FIELDS),
    )


def _has_any(entry: spec.Entry, fields: Iterable[str]) -> bool:
    return any(entry.has(f) for f in fields)


def _spiffe_principals(path: str, values: Sequence[str]) -> Iterable[Unenforced]:
    for m, value in enumerate(values):
        if value.startswith("spiffe://"):
            yield Unenforced(f"{path}[{m}]", SPIFFE_PRINCIPAL, Category.NEVER_MATCHES)
