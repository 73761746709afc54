"""L7 authorization: AuthorizationPolicy evaluated per HTTP request, as a waypoint does (Envoy's
RBAC filter as istiod configures it). Pure functions over `spec.PolicySpec`.

Order: an enforced DENY whose rule matches rejects; otherwise no enforced ALLOW means allow;
otherwise some ALLOW rule must match. AUDIT and CUSTOM policies do not decide (there is no
external authorizer), dry-run policies are not enforced. A policy without rules never matches;
a rule `{}` matches every request. In a rule, `from` entries OR, `to` entries OR, `when`
conditions AND, and the three AND together; in one entry every field written must hold.

Values (Istio's): ``*`` alone is presence, ``x*`` a prefix, ``*x`` a suffix, else exact. Hosts
compare without case. Paths also take Istio's templates: ``{*}`` one segment, ``{**}`` any
rest. Principals are written without ``spiffe://``; namespaces are read from the principal.
There is no request authentication here (no JWT), so ``requestPrincipals`` and
``request.auth.*`` conditions never match, and their ``not`` forms always do.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable

from meshcore import rbac
from meshcore.policy import spec


@dataclasses.dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a rule can look at: the connection (as the waypoint received it) and the request."""

    source_principal: str | None  # "cluster.local/ns/shop/sa/web": the original client's
    source_ip: str
    destination_ip: str
    destination_port: int
    host: str  # :authority / Host, without the port
    method: str
    path: str  # with the query string; rules see the path without it
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names

    @property
    def source_namespace(self) -> str | None:
        parts = (self.source_principal or "").split("/")
        if len(parts) >= 3 and parts[1] == "ns":
            return parts[2]
        return None

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return ",".join(values) if values else None


# The verdicts are the L4 ones (`meshcore.rbac`): a DENY matched, no ALLOW matched, allowed.
Verdict = rbac.Verdict


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    policy: spec.ObjectRef | None = None
    rule: int | None = None  # index in the deciding policy's spec.rules

    @property
    def is_allowed(self) -> bool:
        return self.verdict is Verdict.ALLOWED


def evaluate(policies: Iterable[spec.PolicySpec], request: RequestInfo) -> Decision:
    enforced = [p for p in policies if not p.is_dry_run]
    for policy in enforced:
        if policy.action is spec.PolicyAction.DENY:
            rule = find_matching_rule(policy, request)
            if rule is not None:
                return Decision(Verdict.EXPLICITLY_DENIED, policy.ref, rule)
    allows = [p for p in enforced if p.action is spec.PolicyAction.ALLOW]
    if not allows:
        return Decision(Verdict.ALLOWED)
    for policy in allows:
        rule = find_matching_rule(policy, request)
        if rule is not None:
            return Decision(Verdict.ALLOWED, policy.ref, rule)
    return Decision(Verdict.NOT_ALLOWED)


def find_matching_rule(policy: spec.PolicySpec, request: RequestInfo) -> int | None:
    for index, rule in enumerate(policy.rules):
        if _rule_matches(rule, request, policy.ref.namespace):
            return index
    return None


# -- matching ---------------------------------------------------------------------------------


def match_value(pattern: str, value: str | None) -> bool:
    """Istio's string match: ``*`` presence, ``*x`` suffix, ``x*`` prefix, else exact."""
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def match_path(pattern: str, path: str) -> bool:
    if "{*}" in pattern or "{**}" in pattern:
        return _template(pattern).fullmatch(path) is not None
    return match_value(pattern, path)


def _template(pattern: str) -> re.Pattern[str]:
    parts = []
    for segment in pattern.split("/"):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            parts.append(".+")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def _in_blocks(blocks: tuple[str, ...], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(b, strict=False) for b in blocks)


def _service_account_principal(value: str, namespace: str) -> str:
    ns, slash, account = value.partition("/")
    if not slash:
        ns, account = namespace, value
    return f"*/ns/{ns}/sa/{account}"


def _service_account_matches(value: str, req: RequestInfo, own_ns: str) -> bool:
    principal = req.source_principal
    if not principal:
        return False
    return principal.endswith(_service_account_principal(value, own_ns)[1:])


_FieldTest = Callable[[str, RequestInfo, str], bool]
# By field name without its `not`: does one written value match the request?
_FIELD_TESTS: dict[str, _FieldTest] = {
    "principals": lambda v, r, _: match_value(v, r.source_principal),
    "namespaces": lambda v, r, _: match_value(v, r.source_namespace),
    "serviceAccounts": _service_account_matches,
    "ipBlocks": lambda v, r, _: _in_blocks((v,), r.source_ip),
    "remoteIpBlocks": lambda v, r, _: _in_blocks((v,), r.source_ip),
    "requestPrincipals": lambda v, r, _: False,  # no request authentication
    "hosts": lambda v, r, _: match_value(v.lower(), r.host.lower()),
    "ports": lambda v, r, _: v == str(r.destination_port),
    "methods": lambda v, r, _: match_value(v, r.method),
    "paths": lambda v, r, _: match_path(v, r.path.partition("?")[0]),
}


def _field_matches(field: str, values: tuple[str, ...], req: RequestInfo, own_ns: str) -> bool:
    """One field of an entry: a positive field needs one value to match, a `not` field none."""
    negated = field.startswith("not")
    base = field[3].lower() + field[4:] if negated else field
    test = _FIELD_TESTS.get(base)
    if test is None:
        return False  # a field this evaluator does not know can never be satisfied
    hit = any(test(v, req, own_ns) for v in values)
    return not hit if negated else hit


def _condition_value(key: str, req: RequestInfo) -> str | None:
    if key.startswith("request.headers[") and key.endswith("]"):
        return req.header(key[len("request.headers[") : -1])
    return {
        "source.ip": req.source_ip,
        "remote.ip": req.source_ip,
        "source.namespace": req.source_namespace,
        "source.principal": req.source_principal,
        "destination.ip": req.destination_ip,
        "destination.port": str(req.destination_port),
    }.get(key)


def _condition_matches(condition: spec.Condition, req: RequestInfo) -> bool:
    key = condition.key
    if key in ("source.ip", "remote.ip", "destination.ip"):
        address = _condition_value(key, req) or ""

        def test(v: str) -> bool:
            return _in_blocks((v,), address)
    else:
        value = _condition_value(key, req)

        def test(v: str) -> bool:
            return match_value(v, value)

    if condition.values and not any(test(v) for v in condition.values):
        return False
    return not (condition.not_values and any(test(v) for v in condition.not_values))


def _entry_matches(entry: spec.Entry, req: RequestInfo, own_ns: str) -> bool:
    return all(_field_matches(f, values, req, own_ns) for f, values in entry.fields)


def _rule_matches(rule: spec.RuleSpec, req: RequestInfo, own_ns: str) -> bool:
    if rule.from_ and not any(_entry_matches(e, req, own_ns) for e in rule.from_):
        return False
    if rule.to and not any(_entry_matches(e, req, own_ns) for e in rule.to):
        return False
    return all(_condition_matches(c, req) for c in rule.when)
