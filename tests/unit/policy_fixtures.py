"""Builders of AuthorizationPolicy / PeerAuthentication dicts and model values for the policy
tests (no tests here)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from meshcore.model import authorization

KubeDict = dict[str, Any]
ROOT = "istio-system"


def ap(
    name: str = "p",
    namespace: str = "shop",
    *,
    action: str | None = None,
    selector: Mapping[str, str] | None = None,
    rules: Sequence[Mapping[str, Any]] | None = None,
    annotations: Mapping[str, str] | None = None,
    kind: str = "AuthorizationPolicy",
    api_version: str = "security.istio.io/v1",
    **extra_spec: Any,
) -> KubeDict:
    spec: KubeDict = dict(extra_spec)
    if action is not None:
        spec["action"] = action
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    if rules is not None:
        spec["rules"] = [dict(r) for r in rules]
    meta: KubeDict = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


def pa(
    name: str = "pa",
    namespace: str = "shop",
    *,
    mode: str | None = None,
    selector: Mapping[str, str] | None = None,
    ports: Mapping[int | str, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> KubeDict:
    spec: KubeDict = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    if ports is not None:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": spec,
    }


def source(**fields: list[str]) -> KubeDict:
    return {"source": fields}


def operation(**fields: list[str]) -> KubeDict:
    return {"operation": fields}


def when(
    key: str, values: list[str] | None = None, not_values: list[str] | None = None
) -> KubeDict:
    cond: KubeDict = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return cond


def exact(value: str) -> authorization.StringMatch:
    return authorization.StringMatch(authorization.MatchKind.EXACT, value)


def prefix(value: str) -> authorization.StringMatch:
    return authorization.StringMatch(authorization.MatchKind.PREFIX, value)


def suffix(value: str) -> authorization.StringMatch:
    return authorization.StringMatch(authorization.MatchKind.SUFFIX, value)


PRESENCE = authorization.StringMatch(authorization.MatchKind.PRESENCE)


def net(value: str) -> authorization.IpNetwork:
    return ipaddress.ip_network(value, strict=False)


def rule(*clauses: Sequence[authorization.Match]) -> authorization.Rule:
    """A Rule from clauses given as lists of Matches."""
    return authorization.Rule(tuple(authorization.Clause(tuple(c)) for c in clauses))
