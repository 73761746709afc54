"""AuthorizationPolicy -> istio.security.Authorization, as istiod's convertAuthorizationPolicy
builds it for ztunnel (spec section 6). Pure.

Shape of the result, rule by rule (istiod's Group/Rules/Match are our Rule/Clause/Match):
- `spec.rules[i]` becomes one Rule whose clauses are, in order: one clause holding a Match per
  `to[]` entry (ports, notPorts), one clause holding a Match per `from[]` entry, and one clause
  per `when[]` condition. Clauses AND, the Matches of a clause OR. `rules: [{}]` is a Rule with
  no clauses, which matches everything; a policy with no rules never matches (so `spec: {}` as
  an ALLOW policy denies everything it applies to).
- HTTP attributes (spec.HTTP_* fields, `when` keys other than the five L4 ones): in an ALLOW
  rule istiod drops the whole rule (it never matches: stricter than written). In a DENY rule it
  drops only those fields; an entry left with no field at all is an empty Match, which ztunnel
  skips, so the clause and with it the rule can never match.
- A rule that can never match is left out here instead of being sent as istiod sends it: the
  verdicts are the same, and `Translation.rule_sources` still maps each kept rule to its index
  in `spec.rules` (for "denied by policy X rule N").

Scope: a selector makes the policy WORKLOAD_SELECTOR (workloads list its key); without one it
is NAMESPACE, or GLOBAL in the root namespace. Policies with targetRef(s) belong to waypoints and
gateways and are not sent to ztunnel (None), nor are dry-run ones unless `dry_run_enabled`
(istiod's AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY).

Values: principals are written without ``spiffe://`` (ztunnel strips it from the peer's
identity); ``*`` is presence, ``*x`` suffix, ``x*`` prefix (suffix is tested first, as istiod
does). serviceAccounts are ``ns/sa``, or ``sa`` meaning the policy's own namespace. Ports must
be decimal numbers up to 65535 and IP blocks addresses or CIDRs; anything else raises
`InvalidPolicyError` instead of being skipped as istiod skips it (its admission webhook has
rejected such values before istiod sees them, and a silently shortened DENY denies less).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from meshcore.model import authorization, ids
from meshcore.policy import errors, spec

_T = TypeVar("_T")
_DIGITS = re.compile(r"[0-9]+")
_MAX_PORT = 65535


@dataclasses.dataclass(frozen=True, slots=True)
class Translation:
    authorization: authorization.Authorization
    # For each rule of `authorization.rules`, its index in the object's `spec.rules`.
    rule_sources: tuple[int, ...]


def build_translation(
    obj: Mapping[str, Any],
    *,
    root_namespace: str = spec.DEFAULT_ROOT_NAMESPACE,
    dry_run_enabled: bool = False,
) -> Translation | None:
    """The policy ztunnel gets for `obj`, or None when none is sent (targetRefs, dry run).

    Raises `UnsupportedActionError` for AUDIT and CUSTOM, `InvalidPolicyError` for a malformed
    field; both are `PolicyError`s naming the field.
    """
    policy = spec.parse_authorization_policy(obj)
    ref = policy.ref
    if policy.target_refs_field is not None:
        return None
    if policy.action not in (spec.PolicyAction.ALLOW, spec.PolicyAction.DENY):
        raise errors.UnsupportedActionError(ref.kind, ref.namespace, ref.name, policy.action.value)
    if policy.is_dry_run and not dry_run_enabled:
        return None
    action = (
        authorization.Action.DENY
        if policy.action is spec.PolicyAction.DENY
        else authorization.Action.ALLOW
    )
    if policy.selector is not None:
        scope = authorization.Scope.WORKLOAD_SELECTOR
    elif ref.namespace == root_namespace:
        scope = authorization.Scope.GLOBAL
    else:
        scope = authorization.Scope.NAMESPACE
    rules: list[authorization.Rule] = []
    sources: list[int] = []
    for i, rule_spec in enumerate(policy.rules):
        rule = _build_rule(ref, action, rule_spec, f"spec.rules[{i}]")
        if rule is not None:
            rules.append(rule)
            sources.append(i)
    return Translation(
        authorization.Authorization(
            name=ref.name,
            namespace=ref.namespace,
            scope=scope,
            action=action,
            rules=tuple(rules),
            dry_run=policy.is_dry_run,
        ),
        tuple(sources),
    )


def build_authorization(
    obj: Mapping[str, Any],
    *,
    root_namespace: str = spec.DEFAULT_ROOT_NAMESPACE,
    dry_run_enabled: bool = False,
) -> authorization.Authorization | None:
    """`build_translation` without the rule bookkeeping."""
    translation = build_translation(
        obj, root_namespace=root_namespace, dry_run_enabled=dry_run_enabled
    )
    return None if translation is None else translation.authorization


def selector_of(obj: Mapping[str, Any]) -> dict[str, str] | None:
    """`spec.selector.matchLabels` ({} for a selector without labels), None without a selector.

    Like istiod, a policy attaches to the workloads whose labels include every one of these;
    a selector without labels attaches to none (its scope is still WORKLOAD_SELECTOR).
    """
    ref = spec.object_ref(obj, spec.AUTHORIZATION_POLICY)
    body = spec.read_mapping(ref, obj.get("spec"), "spec")
    return spec.read_selector(ref, body.get("selector"), "spec.selector")


def policy_key_of(obj: Mapping[str, Any]) -> ids.PolicyKey:
    """The xDS name istiod gives the converted policy: ``namespace/name``."""
    ref = spec.object_ref(obj, spec.AUTHORIZATION_POLICY)
    return ids.policy_key(ref.namespace, ref.name)


def build_string_match(pattern: str) -> authorization.StringMatch:
    """istiod's stringToMatch: ``*`` presence, then ``*x`` suffix, then ``x*`` prefix."""
    if pattern == "*":
        return authorization.StringMatch(authorization.MatchKind.PRESENCE)
    if pattern.startswith("*"):
        return authorization.StringMatch(authorization.MatchKind.SUFFIX, pattern[1:])
    if pattern.endswith("*"):
        return authorization.StringMatch(authorization.MatchKind.PREFIX, pattern[:-1])
    return authorization.StringMatch(authorization.MatchKind.EXACT, pattern)


def parse_port(ref: spec.ObjectRef, value: str, path: str) -> int:
    """A decimal port (istiod: ParseUint, at most 65535; 0 parses but matches no connection)."""
    if _DIGITS.fullmatch(value) and int(value) <= _MAX_PORT:
        return int(value)
    raise ref.fail(path, f"not a port number (0-65535): {value!r}")


def parse_ip_block(ref: spec.ObjectRef, value: str, path: str) -> authorization.IpNetwork:
    """An address (a /32 or /128) or a CIDR; host bits after the prefix are ignored, as ztunnel
    ignores them when it tests containment. An IPv6 zone (``%eth0``) is dropped, as istiod's
    AsSlice drops it: no peer address carries one."""
    address, slash, bits = value.partition("/")
    address = address.partition("%")[0]
    try:
        if slash and not _DIGITS.fullmatch(bits):
            raise ValueError(value)  # no netmask or hostmask forms, which Go would refuse
        return ipaddress.ip_network(f"{address}/{bits}" if slash else address, strict=False)
    except ValueError:
        raise ref.fail(path, f"not an IP address or CIDR block: {value!r}") from None


def _build_rule(
    ref: spec.ObjectRef, action: authorization.Action, rule: spec.RuleSpec, path: str
) -> authorization.Rule | None:
    """One `spec.rules[i]`, or None when the rule is dropped or can never match."""
    clauses: list[authorization.Clause] = []
    has_http = False
    if rule.to:
        matches = []
        for j, entry in enumerate(rule.to):
            where = f"{path}.to[{j}].operation"
            has_http |= any(entry.has(f) for f in spec.OPERATION_HTTP_FIELDS)
            matches.append(
                authorization.Match(
                    destination_ports=_convert(ref, entry, "ports", where, parse_port),
                    not_destination_ports=_convert(ref, entry, "notPorts", where, parse_port),
                )
            )
        clauses.append(authorization.Clause(tuple(matches)))
    if rule.from_:
        matches = []
        for j, entry in enumerate(rule.from_):
            where = f"{path}.from[{j}].source"
            has_http |= any(entry.has(f) for f in spec.SOURCE_HTTP_FIELDS)
            matches.append(_source_match(ref, entry, where))
        clauses.append(authorization.Clause(tuple(matches)))
    for k, condition in enumerate(rule.when):
        has_http |= not condition.is_l4
        match = _condition_match(ref, condition, f"{path}.when[{k}]")
        clauses.append(authorization.Clause((match,)))
    if has_http and action is authorization.Action.ALLOW:
        return None  # L7 never matches for ALLOW
    if any(all(m.is_empty for m in clause.matches) for clause in clauses):
        return None  # ztunnel skips empty Matches: this clause, so this rule, cannot match
    return authorization.Rule(tuple(clauses))


def _source_match(ref: spec.ObjectRef, entry: spec.Entry, where: str) -> authorization.Match:
    def accounts(field: str) -> tuple[authorization.ServiceAccountMatch, ...]:
        return _convert(
            ref, entry, field, where, lambda _r, v, _p: _service_account(ref.namespace, v)
        )

    def strings(field: str) -> tuple[authorization.StringMatch, ...]:
        return _convert(ref, entry, field, where, lambda _r, v, _p: build_string_match(v))

    return authorization.Match(
        source_ips=_convert(ref, entry, "ipBlocks", where, parse_ip_block),
        not_source_ips=_convert(ref, entry, "notIpBlocks", where, parse_ip_block),
        namespaces=strings("namespaces"),
        not_namespaces=strings("notNamespaces"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
        principals=strings("principals"),
        not_principals=strings("notPrincipals"),
    )


def _condition_match(
    ref: spec.ObjectRef, condition: spec.Condition, path: str
) -> authorization.Match:
    """istiod's whenMatch: the key picks the Match field; values fill it, notValues its not_."""

    def both(
        convert: Callable[[spec.ObjectRef, str, str], _T],
    ) -> tuple[tuple[_T, ...], tuple[_T, ...]]:
        return (
            _convert_all(ref, condition.values, f"{path}.values", convert),
            _convert_all(ref, condition.not_values, f"{path}.notValues", convert),
        )

    def strings(_r: spec.ObjectRef, value: str, _p: str) -> authorization.StringMatch:
        return build_string_match(value)

    match condition.key:
        case "source.namespace":
            positive, negative = both(strings)
            return authorization.Match(namespaces=positive, not_namespaces=negative)
        case "source.principal":
            positive, negative = both(strings)
            return authorization.Match(principals=positive, not_principals=negative)
        case "source.ip":
            ips, not_ips = both(parse_ip_block)
            return authorization.Match(source_ips=ips, not_source_ips=not_ips)
        case "destination.ip":
            ips, not_ips = both(parse_ip_block)
            return authorization.Match(destination_ips=ips, not_destination_ips=not_ips)
        case "destination.port":
            ports, not_ports = both(parse_port)
            return authorization.Match(destination_ports=ports, not_destination_ports=not_ports)
    return authorization.Match()  # an HTTP attribute: nothing ztunnel can test


def _convert(
    ref: spec.ObjectRef,
    entry: spec.Entry,
    field: str,
    where: str,
    convert: Callable[[spec.ObjectRef, str, str], _T],
) -> tuple[_T, ...]:
    return _convert_all(ref, entry.values(field), f"{where}.{field}", convert)


def _convert_all(
    ref: spec.ObjectRef,
    values: Sequence[str],
    path: str,
    convert: Callable[[spec.ObjectRef, str, str], _T],
) -> tuple[_T, ...]:
    return tuple(convert(ref, value, f"{path}[{i}]") for i, value in enumerate(values))


def _service_account(policy_namespace: str, value: str) -> authorization.ServiceAccountMatch:
    namespace, sep, name = value.partition("/")
    if not sep:
        return authorization.ServiceAccountMatch(policy_namespace, value)
    return authorization.ServiceAccountMatch(namespace, name)
