"""Schemas of two Gateway API kinds (gateway.networking.k8s.io/v1): Gateway and HTTPRoute.

Strict, as the CRDs' structural schemas plus their CEL rules would be together: unknown fields
and wrong types are errors naming their field path, then the semantic checks, each pinned to
its field: list limits (16 rules, 64 matches a rule ...), unique listener and rule names, an
Exact or PathPrefix path is an absolute path, a regular expression is one RE2 accepts, a filter
carries the config its `type` names and no other, a Service backendRef has a port, and a
Gateway of class istio-waypoint has Istio's HBONE listener on port 15008.

Header names come in any case (they match case-insensitively) and durations as GEP-2257 says
(``10s``, ``500ms``, ``1h30m``; no fractions; ``0s`` is off): both have rules here, not Istio's.
`find_unenforced` lists what is not acted on; `meshcore.traffic.httproutes` translates.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from controller.sources.local import schemas, trafficschemas, validation
from meshcore import ambient_labels, durations

V = validation

WAYPOINT_CLASS = ambient_labels.WAYPOINT_CLASS
WAYPOINT_PORT = 15008
PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE")
PATH_MATCH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_MATCH_TYPES = ("Exact", "RegularExpression")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_MODIFIER_TYPES = ("ReplaceFullPath", "ReplacePrefixMatch")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Each filter type and the field that carries its config.
FILTER_CONFIG = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "URLRewrite": "urlRewrite",
    "RequestRedirect": "requestRedirect",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
}
# Filters a list may hold once each (the CRD's CEL rules): all but mirrors and extensions.
_SINGLE_FILTERS = tuple(FILTER_CONFIG)[:4]
_EXCLUSIVE_FILTERS = frozenset({"URLRewrite", "RequestRedirect"})
# The CRDs' maxItems.
MAX_RULES, MAX_MATCHES, MAX_MATCHES_IN_ALL = 16, 64, 128
MAX_LISTENERS, MAX_PARENT_REFS, MAX_SMALL_LIST = 64, 32, 16
_HEADER_NAME = r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"
_DNS_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
# What an Exact or PathPrefix value must not hold: Envoy would normalise it away, so the match
# could never hold as written (the CRD's CEL rules).
_PATH_NOT_CONTAINING = ("//", "/./", "/../", "%2f", "%2F", "#")
_PATH_NOT_ENDING = ("/..", "/.")


# -- rules on strings (None: fine, else the detail) -----------------------------------------


def _matching(pattern: str, detail: str, limit: int) -> V.Rule:
    """The rule: at most `limit` characters, matching `pattern` as a whole."""
    compiled = re.compile(pattern, re.DOTALL)

    def rule(value: str) -> str | None:
        if len(value) > limit:
            return f"must be no more than {limit} characters"
        return None if compiled.fullmatch(value) else detail

    return rule


# Gateway API matches header names case-insensitively, so any case is fine.
header_name = _matching(_HEADER_NAME, "must be an HTTP header name (e.g. X-Canary)", 256)
hostname = _matching(
    rf"(\*\.)?{_DNS_NAME}", "must be a lower-case DNS name, optionally with a leading '*.'", 253
)
precise_hostname = _matching(_DNS_NAME, "must be a lower-case DNS name (no wildcard)", 253)
kind_name = _matching(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?", "must be a kind (e.g. Service)", 63)
# GEP-2257: up to four number-unit pairs, units h, m, s, ms; "0s" turns a timeout off.
duration = _matching(
    r"([0-9]{1,5}(h|m|s|ms)){1,4}", "must be a duration such as 10s, 500ms or 1h30m", 64
)
_OBJECT_NAME, _PATH_VALUE, _HEADER_VALUE = (_matching(".*", "", n) for n in (253, 1024, 4096))
_path_chars = _matching(
    r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+", "must be a valid URL path", 1024
)


# -- shared parts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class IntIn:
    """An integer out of a fixed set (a redirect's status code)."""

    values: tuple[int, ...]

    def check(self, value: Any, path: str) -> list[V.FieldError]:
        if found := V.Int().check(value, path):
            return found
        if value not in self.values:
            return [V.unsupported(path, value, [str(v) for v in self.values])]
        return []


def too_many(path: str, count: int, limit: int, what: str = "items") -> V.FieldError:
    """The API server's TooMany error (a type `validation` has no constant for)."""
    return V.FieldError(path, "Too many", str(count), f"must have at most {limit} {what}")


def _unique(field: str | None, *, fold: bool = False) -> V.Check:
    """Each entry's `field` (the entry itself with None) appears once, case-insensitively with
    `fold`; a repeat is a Duplicate on it."""

    def check(entries: list[Any], path: str) -> list[V.FieldError]:
        seen: set[str] = set()
        found = []
        for i, entry in enumerate(entries):
            value = entry if field is None else entry.get(field)
            key = value.lower() if fold and value is not None else value
            if key is not None and key in seen:
                at = V.item(path, i) if field is None else f"{path}[{i}].{field}"
                found.append(V.duplicate(at, value))
            seen.add(key)
        return found

    return check


def _list(item: V.Schema, limit: int, *checks: V.Check, non_empty: bool = False) -> V.ListOf:
    def check(values: list[Any], path: str) -> list[V.FieldError]:
        if len(values) > limit:
            return [too_many(path, len(values), limit)]
        return [e for c in checks for e in c(values, path)]

    return V.ListOf(item, non_empty=non_empty, check_list=check)


_NAME = V.Str(_OBJECT_NAME, non_empty=True)  # Gateway API's ObjectName
_PORT = V.Int(1, 65535)
_GROUP = V.Str(V.optional(V.dns_subdomain))
_KIND = V.Str(kind_name, non_empty=True)
_NAMESPACE = V.Str(V.dns_label, non_empty=True)
_DURATION = V.Str(duration, non_empty=True)


# -- Gateway ---------------------------------------------------------------------------------


LISTENER = V.Obj(
    {
        "name": V.Str(V.dns_label, non_empty=True),
        "hostname": V.Str(hostname, non_empty=True),
        "port": _PORT,
        "protocol": V.Str(enum=PROTOCOLS),
        "tls": V.AnyObject(),
        "allowedRoutes": V.AnyObject(),
    },
    required=frozenset({"name", "port", "protocol"}),
)


def _check_gateway_spec(spec: dict[str, Any], path: str) -> list[V.FieldError]:
    if spec["gatewayClassName"] != WAYPOINT_CLASS:
        return []
    listeners = spec["listeners"]
    if any(lst["protocol"] == "HBONE" and lst["port"] == WAYPOINT_PORT for lst in listeners):
        return []
    return [
        V.invalid(
            V.child(path, "listeners"),
            [f"{lst['protocol']}/{lst['port']}" for lst in listeners],
            f"a Gateway of class {WAYPOINT_CLASS} needs a listener with protocol HBONE on port "
            f"{WAYPOINT_PORT} (Istio writes {{name: mesh, port: {WAYPOINT_PORT}, "
            "protocol: HBONE})",
        )
    ]


GATEWAY_SPEC = V.Obj(
    {
        "gatewayClassName": _NAME,
        "listeners": _list(LISTENER, MAX_LISTENERS, _unique("name"), non_empty=True),
        "addresses": _list(V.AnyObject(), MAX_SMALL_LIST),
        "infrastructure": V.AnyObject(),
    },
    required=frozenset({"gatewayClassName", "listeners"}),
    check_obj=_check_gateway_spec,
)
# Status is written by controllers: the lists are typed, the rest is left open.
_OBJECTS = V.ListOf(V.AnyObject())
GATEWAY_STATUS = V.Obj(
    {"conditions": V.ListOf(schemas.CONDITION), "addresses": _OBJECTS, "listeners": _OBJECTS},
    open=True,
)
GATEWAY = schemas.build_object(V.dns_subdomain, GATEWAY_SPEC, GATEWAY_STATUS)


# -- HTTPRoute: matches ----------------------------------------------------------------------


def _check_path_match(match: dict[str, Any], path: str) -> list[V.FieldError]:
    kind, value = match.get("type", "PathPrefix"), match.get("value", "/")
    at = V.child(path, "value")
    if kind == "RegularExpression":
        detail = trafficschemas.regex(value)
        return [] if detail is None else [V.invalid(at, value, detail)]
    if not value.startswith("/"):
        return [V.invalid(at, value, f"must be an absolute path, starting with '/', for {kind}")]
    bad = [f"contain {b!r}" for b in _PATH_NOT_CONTAINING if b in value]
    bad += [f"end with {b!r}" for b in _PATH_NOT_ENDING if value.endswith(b)]
    detail = f"must not {bad[0]} for {kind}" if bad else _path_chars(value)
    return [] if detail is None else [V.invalid(at, value, detail)]


PATH_MATCH = V.Obj(
    {"type": V.Str(enum=PATH_MATCH_TYPES), "value": V.Str(_PATH_VALUE)},
    check_obj=_check_path_match,
)


def _check_value_match(match: dict[str, Any], path: str) -> list[V.FieldError]:
    is_regex = match.get("type") == "RegularExpression"  # the default type is Exact
    detail = trafficschemas.regex(match["value"]) if is_regex else None
    return [] if detail is None else [V.invalid(V.child(path, "value"), match["value"], detail)]


VALUE_MATCH = V.Obj(
    {
        "type": V.Str(enum=VALUE_MATCH_TYPES),
        "name": V.Str(header_name, non_empty=True),
        "value": V.Str(_HEADER_VALUE, non_empty=True),
    },
    required=frozenset({"name", "value"}),
    check_obj=_check_value_match,
)
ROUTE_MATCH = V.Obj(
    {
        "path": PATH_MATCH,
        # Header names match case-insensitively, so X-A and x-a are the same header.
        "headers": _list(VALUE_MATCH, MAX_SMALL_LIST, _unique("name", fold=True)),
        "queryParams": _list(VALUE_MATCH, MAX_SMALL_LIST, _unique("name")),
        "method": V.Str(enum=METHODS),
    }
)


# -- HTTPRoute: filters ----------------------------------------------------------------------

_HEADER = V.Obj(
    {"name": V.Str(header_name, non_empty=True), "value": V.Str(_HEADER_VALUE)},
    required=frozenset({"name", "value"}),
)
_HEADERS = _list(_HEADER, MAX_SMALL_LIST, _unique("name", fold=True))
_NAMES = _list(V.Str(header_name, non_empty=True), MAX_SMALL_LIST, _unique(None, fold=True))
HEADER_MODIFIER = V.Obj({"set": _HEADERS, "add": _HEADERS, "remove": _NAMES})


def _paired(selector: str, configs: dict[str, str]) -> V.Check:
    """The config field `configs[value of selector]` is set, and no other of `configs`."""

    def check(value: dict[str, Any], path: str) -> list[V.FieldError]:
        chosen = value[selector]
        wanted = configs[chosen]
        found = [
            V.forbidden(V.child(path, field), f"must not be set when {selector} is {chosen}")
            for field in configs.values()
            if field in value and field != wanted
        ]
        if wanted not in value:
            found.append(V.required(V.child(path, wanted), f"{selector} is {chosen}"))
        return found

    return check


PATH_MODIFIER = V.Obj(
    {
        "type": V.Str(enum=PATH_MODIFIER_TYPES),
        "replaceFullPath": V.Str(_PATH_VALUE),
        "replacePrefixMatch": V.Str(_PATH_VALUE),
    },
    required=frozenset({"type"}),
    check_obj=_paired("type", {t: t[0].lower() + t[1:] for t in PATH_MODIFIER_TYPES}),
)
URL_REWRITE = V.Obj({"hostname": V.Str(precise_hostname, non_empty=True), "path": PATH_MODIFIER})
REQUEST_REDIRECT = V.Obj(
    {
        "scheme": V.Str(enum=("http", "https")),
        "hostname": V.Str(precise_hostname, non_empty=True),
        "path": PATH_MODIFIER,
        "port": _PORT,
        "statusCode": IntIn(REDIRECT_CODES),
    }
)
FILTER = V.Obj(
    {
        "type": V.Str(enum=tuple(FILTER_CONFIG)),
        "requestHeaderModifier": HEADER_MODIFIER,
        "responseHeaderModifier": HEADER_MODIFIER,
        "urlRewrite": URL_REWRITE,
        "requestRedirect": REQUEST_REDIRECT,
        "requestMirror": V.AnyObject(),
        "extensionRef": V.AnyObject(),
    },
    required=frozenset({"type"}),
    check_obj=_paired("type", FILTER_CONFIG),
)


def _check_filters(filters: list[dict[str, Any]], path: str) -> list[V.FieldError]:
    """Header modifiers, a rewrite and a redirect appear once each; rewrite and redirect are
    exclusive (a redirect answers, so nothing is forwarded to rewrite)."""
    seen: set[str] = set()
    found = []
    for i, entry in enumerate(filters):
        at = V.child(V.item(path, i), "type")
        kind = entry["type"]
        if kind in _SINGLE_FILTERS and kind in seen:
            found.append(V.duplicate(at, kind))
        elif kind in _EXCLUSIVE_FILTERS and seen & (_EXCLUSIVE_FILTERS - {kind}):
            found.append(V.forbidden(at, "URLRewrite and RequestRedirect cannot both be used"))
        seen.add(kind)
    return found


FILTERS = _list(FILTER, MAX_SMALL_LIST, _check_filters)


# -- HTTPRoute: references, rules, spec ------------------------------------------------------


def is_service(ref: dict[str, Any], default_kind: str, default_group: str) -> bool:
    """Whether a reference (with its kind's defaults) names a core Service."""
    group = ref.get("group", default_group)
    return ref.get("kind", default_kind) == "Service" and group in ("", "core")


PARENT_REF = V.Obj(
    {
        "group": _GROUP,
        "kind": _KIND,
        "namespace": _NAMESPACE,
        "name": _NAME,
        "sectionName": V.Str(V.dns_subdomain, non_empty=True),
        "port": _PORT,
    },
    required=frozenset({"name"}),
)


def _check_backend_ref(ref: dict[str, Any], path: str) -> list[V.FieldError]:
    if is_service(ref, "Service", "") and "port" not in ref:
        return [V.required(V.child(path, "port"), "a backendRef to a Service needs a port")]
    return []


BACKEND_REF = V.Obj(
    {
        "group": _GROUP,
        "kind": _KIND,
        "name": _NAME,
        "namespace": _NAMESPACE,
        "port": _PORT,
        "weight": V.Int(0, 1_000_000),
        "filters": FILTERS,
    },
    required=frozenset({"name"}),
    check_obj=_check_backend_ref,
)


def _check_timeouts(timeouts: dict[str, Any], path: str) -> list[V.FieldError]:
    request, backend = timeouts.get("request"), timeouts.get("backendRequest")
    if request is None or backend is None:
        return []
    limit = durations.parse_duration(request)
    if limit == 0 or durations.parse_duration(backend) <= limit:
        return []
    detail = f"must not be longer than the request timeout ({request})"
    return [V.invalid(V.child(path, "backendRequest"), backend, detail)]


TIMEOUTS = V.Obj({"request": _DURATION, "backendRequest": _DURATION}, check_obj=_check_timeouts)


def _check_rule(rule: dict[str, Any], path: str) -> list[V.FieldError]:
    """replacePrefixMatch replaces the prefix the rule matched, so there must be exactly one,
    of type PathPrefix (no matches means the default match, PathPrefix "/")."""
    matches = rule.get("matches") or [{}]
    if len(matches) == 1 and (matches[0].get("path") or {}).get("type") in (None, "PathPrefix"):
        return []
    found = []
    for i, entry in enumerate(rule.get("filters") or ()):
        field = FILTER_CONFIG[entry["type"]]
        if ((entry.get(field) or {}).get("path") or {}).get("type") == "ReplacePrefixMatch":
            at = f"{path}.filters[{i}].{field}.path.replacePrefixMatch"
            found.append(V.forbidden(at, "needs exactly one match in the rule, a PathPrefix"))
    return found


def _check_rules(rules: list[dict[str, Any]], path: str) -> list[V.FieldError]:
    total = sum(len(rule.get("matches") or ()) for rule in rules)
    if total > MAX_MATCHES_IN_ALL:
        return [too_many(path, total, MAX_MATCHES_IN_ALL, "matches in all")]
    return _unique("name")(rules, path)


RULE = V.Obj(
    {
        "name": V.Str(V.dns_subdomain, non_empty=True),
        "matches": _list(ROUTE_MATCH, MAX_MATCHES),
        "filters": FILTERS,
        "backendRefs": _list(BACKEND_REF, MAX_SMALL_LIST),
        "timeouts": TIMEOUTS,
    },
    check_obj=_check_rule,
)
HTTP_ROUTE_SPEC = V.Obj(
    {
        "parentRefs": _list(PARENT_REF, MAX_PARENT_REFS),
        "hostnames": _list(V.Str(hostname, non_empty=True), MAX_SMALL_LIST),
        "rules": _list(RULE, MAX_RULES, _check_rules),
    }
)
ROUTE_STATUS = V.Obj({"parents": _OBJECTS}, open=True)
HTTP_ROUTE = schemas.build_object(V.dns_subdomain, HTTP_ROUTE_SPEC, ROUTE_STATUS)


# -- what is accepted but not acted on --------------------------------------------------------

_NOT_ACTED_ON = "accepted, not acted on by this mesh"
# What a waypoint built from this Gateway would still leave out.
_UNENFORCED_GATEWAY = ("addresses", "infrastructure")
_UNENFORCED_LISTENER = ("tls", "allowedRoutes")
# Filters the translation leaves out; a backendRef's own filters only modify headers.
_UNENFORCED_FILTERS = ("RequestMirror", "ExtensionRef")
_BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


def _filter_paths(filters: Sequence[dict[str, Any]], path: str, acted: Sequence[str]) -> list[str]:
    return [
        f"{path}[{i}].{FILTER_CONFIG.get(f.get('type', ''), 'type')}"
        for i, f in enumerate(filters)
        if f.get("type") not in acted
    ]


def _unenforced_in_route(spec: dict[str, Any]) -> list[str]:
    found = []
    for i, ref in enumerate(spec.get("parentRefs") or ()):
        where = f"spec.parentRefs[{i}]"
        if not is_service(ref, "Gateway", "gateway.networking.k8s.io"):
            found.append(f'{where}: {_NOT_ACTED_ON} (only a parent Service, group "", gives hosts)')
            continue
        found += [f"{where}.{f}: {_NOT_ACTED_ON}" for f in ("sectionName", "port") if f in ref]
    acted = [t for t in FILTER_CONFIG if t not in _UNENFORCED_FILTERS]
    for i, rule in enumerate(spec.get("rules") or ()):
        where = f"spec.rules[{i}]"
        filters = rule.get("filters") or ()
        paths = _filter_paths(filters, f"{where}.filters", acted)
        for j, f in enumerate(filters):  # a redirect's uri replaces the whole path, no prefix
            if (f.get("requestRedirect") or {}).get("path", {}).get("type") == "ReplacePrefixMatch":
                paths.append(f"{where}.filters[{j}].requestRedirect.path")
        if any(f.get("type") == "RequestRedirect" for f in filters) and rule.get("backendRefs"):
            paths.append(f"{where}.backendRefs")  # a redirect answers: nothing is forwarded
        for j, ref in enumerate(rule.get("backendRefs") or ()):
            if not is_service(ref, "Service", ""):
                paths.append(f"{where}.backendRefs[{j}].kind")  # routed to as a Service name
            paths += _filter_paths(
                ref.get("filters") or (), f"{where}.backendRefs[{j}].filters", _BACKEND_FILTERS
            )
        if "backendRequest" in (rule.get("timeouts") or {}):
            paths.append(f"{where}.timeouts.backendRequest")
        found += [f"{p}: {_NOT_ACTED_ON}" for p in paths]
    return found


def find_unenforced(obj: dict[str, Any]) -> list[str]:
    """One warning per field the mesh accepts but will not act on, by field path (a Gateway
    of another class than istio-waypoint is stored, not run)."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind", "")
    if kind != "Gateway":
        return _unenforced_in_route(spec)
    found = []
    labels = (obj.get("metadata") or {}).get("labels") or {}
    waypoint_for = labels.get(ambient_labels.WAYPOINT_FOR)
    if waypoint_for is not None and waypoint_for not in ambient_labels.WAYPOINT_FOR_VALUES:
        found.append(
            f"metadata.labels[{ambient_labels.WAYPOINT_FOR}]: {waypoint_for!r} is not one of "
            f"{', '.join(ambient_labels.WAYPOINT_FOR_VALUES)}; this mesh takes it as "
            f"{ambient_labels.WAYPOINT_FOR_ALL!r}"
        )
    class_name = spec.get("gatewayClassName")
    if class_name != WAYPOINT_CLASS:
        found.append(f"spec.gatewayClassName: {_NOT_ACTED_ON} (only {WAYPOINT_CLASS} is)")
    found += [f"spec.{f}: {_NOT_ACTED_ON}" for f in _UNENFORCED_GATEWAY if f in spec]
    for i, listener in enumerate(spec.get("listeners") or ()):
        where = f"spec.listeners[{i}]"
        found += [f"{where}.{f}: {_NOT_ACTED_ON}" for f in _UNENFORCED_LISTENER if f in listener]
    return found
