"""L4 authorization policies in the form ztunnel enforces them (istio.security.Authorization)."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

from meshcore.model import ids


class Scope(enum.Enum):
    GLOBAL = 0  # every workload in the mesh (policies in the root namespace)
    NAMESPACE = 1  # every workload in `namespace`
    WORKLOAD_SELECTOR = 2  # workloads that list this policy in `authorization_policies`


class Action(enum.Enum):
    ALLOW = 0
    DENY = 1


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclasses.dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    def matches(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        match self.kind:
            case MatchKind.EXACT:
                return candidate == self.value
            case MatchKind.PREFIX:
                return candidate.startswith(self.value)
            case MatchKind.SUFFIX:
                return candidate.endswith(self.value)
            case MatchKind.PRESENCE:
                return candidate != ""

    @classmethod
    def from_pattern(cls, pattern: str) -> StringMatch:
        """Istio's string syntax: ``*`` presence, ``*x`` suffix, ``x*`` prefix, else exact.
        The leading ``*`` is tested first, as istiod does (``*a*`` is a suffix match on ``a*``)."""
        if pattern == "*":
            return cls(MatchKind.PRESENCE)
        if pattern.startswith("*"):
            return cls(MatchKind.SUFFIX, pattern[1:])
        if pattern.endswith("*"):
            return cls(MatchKind.PREFIX, pattern[:-1])
        return cls(MatchKind.EXACT, pattern)


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    """Populated fields must all hold; values within one field are alternatives."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()
    not_source_ips: tuple[IpNetwork, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()
    not_destination_ips: tuple[IpNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True, slots=True)
class Clause:
    matches: tuple[Match, ...]  # any may hit


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    clauses: tuple[Clause, ...]  # all must hit; no clauses matches everything


@dataclasses.dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...]  # any may hit; no rules never matches
    dry_run: bool = False

    @property
    def key(self) -> ids.PolicyKey:
        return ids.policy_key(self.namespace, self.name)
