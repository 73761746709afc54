"""Schemas of Istio's traffic kinds (networking.istio.io v1, also v1beta1 and v1alpha3):
VirtualService and DestinationRule.

Strict, as the CRD's structural schema plus Istio's validating webhook would be together: unknown
fields and wrong types are errors naming their field path, then Istio's semantic checks, each
pinned to its field: a StringMatch holds exactly one of exact/prefix/regex and a regex must be
one RE2 accepts, the weights of a route with several destinations add up to 100, durations
parse and are at least 1ms, a subset name appears once, a load balancer is either simple or
consistent-hash. The whole object is rejected on any error; nothing is applied in part.

Fields of Istio's API that the waypoint does not act on (mirroring, CORS, delegation, TLS and
TCP routes, locality load balancing ...) are accepted with their type checked and reported by
`find_unenforced`, so that a user's Istio YAML applies as written and says what it leaves out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from controller.sources.local import policyschemas, schemas, validation
from meshcore import digits, durations
from meshcore.kube import resources
from meshcore.policy import spec as policy_spec
from meshcore.traffic import regexes, routes

V = validation

LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
# Envoy's retry conditions (x-envoy-retry-on and x-envoy-retry-grpc-on) that Istio accepts.
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
MIN_DURATION_SECONDS = 0.001
_HEADER_NAME_RE = re.compile(r"^[a-z0-9!#$%&'*+\-.^_`|~]+$")
_HOST_RE = re.compile(
    r"^(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)$"
)


# -- rules on strings (None: fine, else the detail) -----------------------------------------


def regex(value: str) -> str | None:
    """An RE2 regular expression, matched against the whole value (as Envoy does). Checked by
    the engine the waypoint matches with, so what passes here is exactly what it can run."""
    try:
        regexes.compile(value)
    except regexes.RegexError as exc:
        return f"must be a valid RE2 regular expression: {exc}"
    return None


def duration(value: str) -> str | None:
    """A duration of at least 1ms (``10s``, ``250ms``, ``1.5s``, ``3m``)."""
    try:
        seconds = durations.parse_duration(value)
    except durations.DurationError as exc:
        return str(exc)
    if seconds < MIN_DURATION_SECONDS:
        return "must be at least 1ms"
    return None


def any_duration(value: str) -> str | None:
    """A duration that may be 0 (a cookie TTL of 0s asks for a session cookie)."""
    try:
        durations.parse_duration(value)
    except durations.DurationError as exc:
        return str(exc)
    return None


def header_name(value: str) -> str | None:
    if not _HEADER_NAME_RE.match(value):
        return "must be a lower-case HTTP header name"
    return None


def host(value: str) -> str | None:
    """A service host: a short name (``reviews``), an FQDN, a ``*.`` wildcard or ``*``."""
    if len(value) > 253 or not _HOST_RE.match(value):
        return (
            "must be a lower-case DNS name (e.g. reviews, reviews.shop.svc.cluster.local), "
            "optionally with a leading '*.', or '*'"
        )
    return None


def retry_on(value: str) -> str | None:
    """Envoy's comma-separated retry conditions, or HTTP status codes to retry on."""
    for condition in (c.strip() for c in value.split(",")):
        if condition in RETRY_ON or (digits.is_digits(condition) and 100 <= int(condition) <= 599):
            continue
        return f"{condition!r} is not a retry condition (e.g. 5xx, gateway-error, connect-failure)"
    return None


# -- shared parts ---------------------------------------------------------------------------

_DURATION = V.Str(duration, non_empty=True)
_COUNT = V.Int(0)
_PERCENT = V.Obj({"value": V.Number(0, 100)})
_PORT_SELECTOR = V.Obj({"number": V.Int(1, 65535)})


def _one_of(fields: tuple[str, ...], what: str) -> V.Check:
    def check(value: dict[str, Any], path: str) -> list[V.FieldError]:
        given = [f for f in fields if f in value]
        if len(given) == 1:
            return []
        names = ", ".join(fields)
        if not given:
            return [V.required(path, f"{what}: one of {names} is required")]
        return [V.forbidden(path, f"{what}: only one of {names} may be set, got {given}")]

    return check


STRING_MATCH = V.Obj(
    {"exact": V.Str(), "prefix": V.Str(), "regex": V.Str(regex)},
    check_obj=_one_of(("exact", "prefix", "regex"), "a string match"),
)
HEADERS_MATCH = V.MapOf(STRING_MATCH, header_name)
HEADER_OPERATIONS = V.Obj(
    {
        "set": V.StrMap(header_name),
        "add": V.StrMap(header_name),
        "remove": V.ListOf(V.Str(header_name, non_empty=True)),
    }
)
HEADERS = V.Obj({"request": HEADER_OPERATIONS, "response": HEADER_OPERATIONS})
DESTINATION = V.Obj(
    {"host": V.Str(host, non_empty=True), "subset": V.Str(V.dns_label), "port": _PORT_SELECTOR},
    required=frozenset({"host"}),
)


# -- VirtualService --------------------------------------------------------------------------

HTTP_MATCH = V.Obj(
    {
        "name": V.Str(),
        "uri": STRING_MATCH,
        "scheme": STRING_MATCH,
        "method": STRING_MATCH,
        "authority": STRING_MATCH,
        "headers": HEADERS_MATCH,
        "withoutHeaders": HEADERS_MATCH,
        "queryParams": V.MapOf(STRING_MATCH),
        "ignoreUriCase": V.Bool(),
        "port": V.Int(1, 65535),
        "sourceLabels": V.StrMap(V.label_key, V.label_value),
        "sourceNamespace": V.Str(V.dns_label),
        "gateways": V.ListOf(V.Str(non_empty=True)),
        "statPrefix": V.Str(),
    }
)


def _check_weights(route: list[dict[str, Any]], path: str) -> list[V.FieldError]:
    """Several destinations split the traffic by weight, and the weights must add up to 100."""
    if len(route) < 2:
        return []
    total = sum(d.get("weight", 0) for d in route)
    if total == 100:
        return []
    return [
        V.invalid(
            path,
            [d.get("weight", 0) for d in route],
            f"the weights of the destinations add up to {total}: they must add up to 100",
        )
    ]


HTTP_ROUTE_DESTINATION = V.Obj(
    {"destination": DESTINATION, "weight": V.Int(0, 100), "headers": HEADERS},
    required=frozenset({"destination"}),
)
TCP_ROUTE_DESTINATION = V.Obj(
    {"destination": DESTINATION, "weight": V.Int(0, 100)}, required=frozenset({"destination"})
)
RETRIES = V.Obj(
    {
        "attempts": _COUNT,
        "perTryTimeout": _DURATION,
        "retryOn": V.Str(retry_on, non_empty=True),
        "retryRemoteLocalities": V.Bool(),
        "retryIgnorePreviousHosts": V.Bool(),
        "backoff": _DURATION,
    }
)
FAULT = V.Obj(
    {
        "delay": V.Obj(
            {"fixedDelay": _DURATION, "percentage": _PERCENT, "percent": V.Int(0, 100)},
            required=frozenset({"fixedDelay"}),
        ),
        "abort": V.Obj(
            {
                "httpStatus": V.Int(200, 599),
                "grpcStatus": V.Str(non_empty=True),
                "percentage": _PERCENT,
            },
            check_obj=_one_of(("httpStatus", "grpcStatus"), "an abort"),
        ),
    }
)


def _check_regex_rewrite(value: dict[str, Any], path: str) -> list[V.FieldError]:
    """The rewrite in RE2's syntax (``\\1`` a group of the match, ``\\\\`` a backslash), as
    Envoy applies it; runs once the match is known to be valid."""
    try:
        regexes.compile(value["match"]).check_rewrite(value["rewrite"])
    except regexes.RegexError as exc:
        detail = f"must be a valid RE2 rewrite: {exc}"
        return [V.invalid(V.child(path, "rewrite"), value["rewrite"], detail)]
    return []


REWRITE = V.Obj(
    {
        "uri": V.Str(),
        "authority": V.Str(),
        "uriRegexRewrite": V.Obj(
            {"match": V.Str(regex, non_empty=True), "rewrite": V.Str()},
            required=frozenset({"match", "rewrite"}),
            check_obj=_check_regex_rewrite,
        ),
    }
)

REDIRECT = V.Obj(
    {
        "uri": V.Str(),
        "authority": V.Str(),
        "scheme": V.Str(enum=("http", "https")),
        "port": V.Int(1, 65535),
        "derivePort": V.Str(enum=("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
        "redirectCode": V.Int(300, 399),
    }
)
DIRECT_RESPONSE = V.Obj(
    {"status": V.Int(200, 599), "body": V.Obj({"string": V.Str(), "bytes": V.Str()})},
    required=frozenset({"status"}),
)


def _check_http_route(route: dict[str, Any], path: str) -> list[V.FieldError]:
    actions = [a for a in ("route", "redirect", "directResponse") if a in route]
    if len(actions) > 1:
        return [V.forbidden(path, f"only one of route, redirect, directResponse: got {actions}")]
    if not actions and "delegate" not in route:
        return [V.required(V.child(path, "route"), "an http route needs a route or a redirect")]
    return []


HTTP_ROUTE = V.Obj(
    {
        "name": V.Str(),
        "match": V.ListOf(HTTP_MATCH),
        "route": V.ListOf(HTTP_ROUTE_DESTINATION, non_empty=True, check_list=_check_weights),
        "redirect": REDIRECT,
        "directResponse": DIRECT_RESPONSE,
        "delegate": V.AnyObject(),
        "rewrite": REWRITE,
        "timeout": _DURATION,
        "retries": RETRIES,
        "fault": FAULT,
        "mirror": V.AnyObject(),
        "mirrors": V.ListOf(V.AnyObject()),
        "mirrorPercentage": _PERCENT,
        "corsPolicy": V.AnyObject(),
        "headers": HEADERS,
    },
    check_obj=_check_http_route,
)
TCP_ROUTE = V.Obj(
    {
        "match": V.ListOf(V.AnyObject()),
        "route": V.ListOf(TCP_ROUTE_DESTINATION, non_empty=True, check_list=_check_weights),
    }
)
VIRTUAL_SERVICE_SPEC = V.Obj(
    {
        "hosts": V.ListOf(V.Str(host, non_empty=True), non_empty=True),
        "gateways": V.ListOf(V.Str(non_empty=True)),
        "http": V.ListOf(HTTP_ROUTE),
        "tcp": V.ListOf(TCP_ROUTE),
        "tls": V.ListOf(V.AnyObject()),
        "exportTo": V.ListOf(V.Str(non_empty=True)),
    },
    required=frozenset({"hosts"}),
)
VIRTUAL_SERVICE = schemas.build_object(
    V.dns_subdomain, VIRTUAL_SERVICE_SPEC, policyschemas.POLICY_STATUS
)


# -- DestinationRule -------------------------------------------------------------------------

CONSISTENT_HASH = V.Obj(
    {
        "httpHeaderName": V.Str(header_name, non_empty=True),
        "httpCookie": V.Obj(
            {"name": V.Str(non_empty=True), "path": V.Str(), "ttl": V.Str(any_duration)},
            required=frozenset({"name"}),
        ),
        "useSourceIp": V.Bool(),
        "httpQueryParameterName": V.Str(non_empty=True),
        "ringHash": V.AnyObject(),
        "maglev": V.AnyObject(),
        "minimumRingSize": _COUNT,
    },
    check_obj=_one_of(
        ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
        "a consistent hash",
    ),
)


def _check_load_balancer(lb: dict[str, Any], path: str) -> list[V.FieldError]:
    if "simple" in lb and "consistentHash" in lb:
        return [V.forbidden(path, "only one of simple, consistentHash may be set")]
    return []


LOAD_BALANCER = V.Obj(
    {
        "simple": V.Str(enum=LB_SIMPLE),
        "consistentHash": CONSISTENT_HASH,
        "localityLbSetting": V.AnyObject(),
        "warmupDurationSecs": _DURATION,
    },
    check_obj=_check_load_balancer,
)
CONNECTION_POOL = V.Obj(
    {
        "tcp": V.Obj(
            {
                "maxConnections": _COUNT,
                "connectTimeout": _DURATION,
                "tcpKeepalive": V.AnyObject(),
                "maxConnectionDuration": _DURATION,
                "idleTimeout": _DURATION,
            }
        ),
        "http": V.Obj(
            {
                "http1MaxPendingRequests": _COUNT,
                "http2MaxRequests": _COUNT,
                "maxRequestsPerConnection": _COUNT,
                "maxRetries": _COUNT,
                "idleTimeout": _DURATION,
                "h2UpgradePolicy": V.Str(enum=H2_UPGRADE_POLICIES),
                "useClientProtocol": V.Bool(),
                "maxConcurrentStreams": _COUNT,
            }
        ),
    }
)
OUTLIER_DETECTION = V.Obj(
    {
        "consecutive5xxErrors": _COUNT,
        "consecutiveGatewayErrors": _COUNT,
        "consecutiveLocalOriginFailures": _COUNT,
        "splitExternalLocalOriginErrors": V.Bool(),
        "consecutiveErrors": _COUNT,
        "interval": _DURATION,
        "baseEjectionTime": _DURATION,
        "maxEjectionPercent": V.Int(0, 100),
        "minHealthPercent": V.Int(0, 100),
    }
)
CLIENT_TLS = V.Obj({"mode": V.Str(enum=TLS_MODES)}, open=True)
_POLICY_PARTS: dict[str, V.Schema] = {
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "tls": CLIENT_TLS,
}
PORT_TRAFFIC_POLICY = V.Obj({"port": _PORT_SELECTOR, **_POLICY_PARTS}, required=frozenset({"port"}))
TRAFFIC_POLICY = V.Obj(
    {
        **_POLICY_PARTS,
        "portLevelSettings": V.ListOf(PORT_TRAFFIC_POLICY),
        "tunnel": V.AnyObject(),
        "proxyProtocol": V.AnyObject(),
    }
)
SUBSET = V.Obj(
    {
        "name": V.Str(V.dns_label, non_empty=True),
        "labels": V.StrMap(V.label_key, V.label_value),
        "trafficPolicy": TRAFFIC_POLICY,
    },
    required=frozenset({"name"}),
)


def _check_subset_names(subsets: list[dict[str, Any]], path: str) -> list[V.FieldError]:
    seen: set[str] = set()
    found = []
    for i, subset in enumerate(subsets):
        name = subset["name"]
        if name in seen:
            found.append(V.duplicate(V.child(V.item(path, i), "name"), name))
        seen.add(name)
    return found


DESTINATION_RULE_SPEC = V.Obj(
    {
        "host": V.Str(host, non_empty=True),
        "trafficPolicy": TRAFFIC_POLICY,
        "subsets": V.ListOf(SUBSET, check_list=_check_subset_names),
        "exportTo": V.ListOf(V.Str(non_empty=True)),
        "workloadSelector": policyschemas.WORKLOAD_SELECTOR,
    },
    required=frozenset({"host"}),
)
DESTINATION_RULE = schemas.build_object(
    V.dns_subdomain, DESTINATION_RULE_SPEC, policyschemas.POLICY_STATUS
)


# -- references across objects ----------------------------------------------------------------

Lookup = Callable[[resources.ResourceType, str], Sequence[dict[str, Any]]]


def _covers(rule_host: str, host: str) -> bool:
    if rule_host.startswith("*"):
        return host.endswith(rule_host[1:])
    return rule_host == host


def _rule_namespaces(vs_namespace: str, host: str) -> list[str]:
    """Where Istio looks for a host's DestinationRule: the route's namespace, the host's own
    (for a Service FQDN) and the root namespace."""
    found = [vs_namespace]
    parts = host.split(".")
    if len(parts) > 2 and parts[2] == "svc":
        found.append(parts[1])
    found.append(policy_spec.DEFAULT_ROOT_NAMESPACE)
    return list(dict.fromkeys(found))


def check_subsets(obj: dict[str, Any], lookup: Lookup) -> list[V.FieldError]:
    """Every subset a VirtualService routes to is defined by a DestinationRule for its host.

    Judged when the VirtualService is written: a DestinationRule applied in the same file comes
    first (`meshctl apply` orders them so); one deleted later leaves the route answering 503."""
    namespace = obj["metadata"].get("namespace") or "default"
    spec = obj.get("spec") or {}
    found = []
    for section in ("http", "tcp"):
        for i, route in enumerate(spec.get(section) or ()):
            for j, entry in enumerate(route.get("route") or ()):
                destination = entry["destination"]
                subset = destination.get("subset")
                if not subset:
                    continue
                host = routes.qualify(destination["host"], namespace)
                defined: set[str] = set()
                for ns in _rule_namespaces(namespace, host):
                    for rule in lookup(resources.DESTINATION_RULES, ns):
                        rule_spec = rule.get("spec") or {}
                        if _covers(routes.qualify(rule_spec.get("host", ""), ns), host):
                            defined.update(s["name"] for s in rule_spec.get("subsets") or ())
                if subset not in defined:
                    known = ", ".join(sorted(defined)) or "none"
                    found.append(
                        V.invalid(
                            f"spec.{section}[{i}].route[{j}].destination.subset",
                            subset,
                            f"no DestinationRule for host {host} defines this subset "
                            f"(subsets defined: {known})",
                        )
                    )
    return found


# -- what is accepted but not acted on --------------------------------------------------------

_UNENFORCED_HTTP = ("mirror", "mirrors", "mirrorPercentage", "corsPolicy", "delegate")
_UNENFORCED_SPEC = {
    "VirtualService": ("tcp", "tls", "exportTo"),
    "DestinationRule": ("exportTo", "workloadSelector"),
}
_UNENFORCED_POLICY = ("tls", "tunnel", "proxyProtocol", "portLevelSettings")


def find_unenforced(obj: dict[str, Any]) -> list[str]:
    """One warning per field the mesh accepts but will not act on, by field path. (What is
    acted on takes effect in waypoints: for the services of a namespace that has one.)"""
    spec = obj.get("spec") or {}
    kind = obj.get("kind", "")
    found: list[str] = []
    paths = [f"spec.{field}" for field in _UNENFORCED_SPEC.get(kind, ()) if field in spec]
    if kind == "VirtualService":
        for i, route in enumerate(spec.get("http") or ()):
            paths += [f"spec.http[{i}].{field}" for field in _UNENFORCED_HTTP if field in route]
    elif kind == "DestinationRule":
        policies = [("spec.trafficPolicy", spec.get("trafficPolicy") or {})]
        policies += [
            (f"spec.subsets[{i}].trafficPolicy", subset.get("trafficPolicy") or {})
            for i, subset in enumerate(spec.get("subsets") or ())
        ]
        for where, policy in policies:
            paths += [f"{where}.{field}" for field in _UNENFORCED_POLICY if field in policy]
    return found + [f"{path}: accepted, not acted on by this mesh" for path in paths]
