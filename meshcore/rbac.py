"""L4 authorization decisions, exactly as ztunnel makes them (spec section 6). Pure functions.

Order: any enforced DENY that matches rejects; otherwise, no enforced ALLOW policies means allow;
otherwise some ALLOW must match. A policy without rules never matches; a rule without clauses
matches everything; a clause without Matches matches too; an empty Match matches nothing.
Without a peer identity the source namespace is "" and no principal matches (ztunnel's
`Authorization::matches` in src/rbac.rs).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from meshcore.identity import spiffe
from meshcore.model import authorization, ids


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionInfo:
    source_identity: spiffe.SpiffeId | None  # None for plaintext
    source_ip: ids.IpAddress
    destination_ip: ids.IpAddress
    destination_port: int


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    EXPLICITLY_DENIED = "explicitly denied"  # a DENY policy matched
    NOT_ALLOWED = "not allowed"  # ALLOW policies exist and none matched


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    policy: ids.PolicyKey | None = None  # the policy that decided, when one did
    rule: int | None = None  # the index in that policy's `rules` of the rule that matched

    @property
    def is_allowed(self) -> bool:
        return self.verdict is Verdict.ALLOWED


def evaluate(policies: Iterable[authorization.Authorization], conn: ConnectionInfo) -> Decision:
    enforced = [p for p in policies if not p.dry_run]
    for policy in enforced:
        if policy.action is authorization.Action.DENY:
            rule = find_matching_rule(policy, conn)
            if rule is not None:
                return Decision(Verdict.EXPLICITLY_DENIED, policy.key, rule)
    allows = [p for p in enforced if p.action is authorization.Action.ALLOW]
    if not allows:
        return Decision(Verdict.ALLOWED)
    for policy in allows:
        rule = find_matching_rule(policy, conn)
        if rule is not None:
            return Decision(Verdict.ALLOWED, policy.key, rule)
    return Decision(Verdict.NOT_ALLOWED)


def policy_matches(policy: authorization.Authorization, conn: ConnectionInfo) -> bool:
    return find_matching_rule(policy, conn) is not None


def find_matching_rule(policy: authorization.Authorization, conn: ConnectionInfo) -> int | None:
    """The index of the first rule of `policy` that `conn` matches, or None."""
    for index, rule in enumerate(policy.rules):
        if _rule_matches(rule, conn):
            return index
    return None


def _rule_matches(rule: authorization.Rule, conn: ConnectionInfo) -> bool:
    return all(_clause_matches(clause, conn) for clause in rule.clauses)


def _clause_matches(clause: authorization.Clause, conn: ConnectionInfo) -> bool:
    if not clause.matches:
        return True  # ztunnel: an empty clause is a match
    return any(_match_matches(m, conn) for m in clause.matches if not m.is_empty)


def _match_matches(m: authorization.Match, conn: ConnectionInfo) -> bool:
    identity = conn.source_identity
    namespace = identity.namespace if identity else ""
    principal = identity.principal if identity else None
    checks = (
        (m.namespaces, m.not_namespaces, lambda s: s.matches(namespace)),
        (m.principals, m.not_principals, lambda s: s.matches(principal)),
        (m.source_ips, m.not_source_ips, lambda net: conn.source_ip in net),
        (m.destination_ips, m.not_destination_ips, lambda net: conn.destination_ip in net),
        (m.destination_ports, m.not_destination_ports, lambda p: p == conn.destination_port),
        (
            m.service_accounts,
            m.not_service_accounts,
            lambda sa: (
                identity is not None
                and sa.namespace == identity.namespace
                and sa.service_account == identity.service_account
            ),
        ),
    )
    for positive, negative, hit in checks:
        if positive and not any(hit(v) for v in positive):
            return False
        if negative and any(hit(v) for v in negative):
            return False
    return True
