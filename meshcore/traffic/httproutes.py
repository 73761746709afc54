"""A Gateway API HTTPRoute (gateway.networking.k8s.io/v1) as a `routes.RouteTable`: the same
frozen values a VirtualService becomes, so `matching` routes requests through either.

The object is expected to have passed the API's schema (`controller.sources.local.
gatewayschemas`); anything that still does not fit raises `routes.TrafficConfigError` naming
the object and field.

What differs from a VirtualService, and how the translation keeps Gateway API's meaning with
`matching`'s first-match-wins order:

- Hosts: a parentRef to a Service (group "" or "core", kind Service) binds the route to that
  Service, as Istio's waypoint reads it; `hostnames` are added as written.
- Precedence: Gateway API does not take rules in written order but ranks each match (an exact
  path, then the longest prefix, then a method, then the most headers, then the most query
  parameters; ties keep their order). So each match becomes its own `HttpRoute`, named after
  its rule, and the routes are sorted by that rank as Istio sorts the routes it generates,
  which also puts a regex below every prefix (Gateway API leaves regexes to implementations).
- PathPrefix compares whole path segments: ``/foo`` takes ``/foo``, ``/foo/`` and
  ``/foo/bar`` but not ``/foobar``. It becomes two conditions, exact ``/foo`` and prefix
  ``/foo/``, which `matching` compares character by character.
- Weights are relative (default 1): they become whole percentages adding up to 100 by the
  largest remainder. A rule with no backend to send to (no backendRefs, or all weights 0)
  answers 500, as Gateway API requires.
- URLRewrite's ReplacePrefixMatch follows Gateway API's table (``/foo`` -> ``/`` turns
  ``/foo/bar`` into ``/bar``, not ``//bar``), so it is written as a regex rewrite anchored on
  the matched prefix; ReplaceFullPath is a regex rewrite of the whole path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshcore import durations
from meshcore.traffic import regexes, routes

DEFAULT_WEIGHT = 1
NO_BACKEND_STATUS = 500
DEFAULT_REDIRECT_STATUS = 302
_SERVICE_GROUPS = ("", "core")
_PATH_KINDS = {
    "Exact": routes.MatchKind.EXACT,
    "PathPrefix": routes.MatchKind.PREFIX,
    "RegularExpression": routes.MatchKind.REGEX,
}
_VALUE_KINDS = {"Exact": routes.MatchKind.EXACT, "RegularExpression": routes.MatchKind.REGEX}
# Istio's ranking of path matches (sortHTTPRoutes): exact, then prefix, then regex.
_PATH_RANK = {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}
_WHOLE_PATH = regexes.compile(r"(?s)\A.*\z")

# (path rank, path length, no method, header count, query count), each smaller-first.
_SortKey = tuple[int, int, bool, int, int]


class _FieldError(Exception):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def build_route_table(
    obj: Mapping[str, Any], domain: str = routes.DEFAULT_DOMAIN
) -> routes.RouteTable:
    """An HTTPRoute (as the API serves it) as a `RouteTable`."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    spec = obj.get("spec") or {}
    where = f"HTTPRoute {namespace}/{name}"
    try:
        hosts = _hosts(spec, namespace, domain)
        ranked: list[tuple[_SortKey, routes.HttpRoute]] = []
        for i, rule in enumerate(spec.get("rules") or ()):
            ranked += _build_rule(rule, i, f"{name}.{i}", namespace, domain)
    except _FieldError as exc:
        raise routes.TrafficConfigError(f"{where}: spec.{exc.path}: {exc.detail}") from exc
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise routes.TrafficConfigError(
            f"{where}: malformed spec ({type(exc).__name__}: {exc})"
        ) from exc
    ranked.sort(key=lambda pair: pair[0])  # stable: ties keep rule and match order
    return routes.RouteTable(namespace, name, hosts, tuple(route for _, route in ranked))


def percentages(weights: Sequence[int]) -> list[int]:
    """Relative weights as whole percentages adding up to 100 (all 0s if every weight is 0):
    each gets its share rounded down, then the points left go to the largest remainders, the
    earlier backend first on a tie. A weight of 0 never gets a point."""
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    shares = [divmod(w * routes.FULL_WEIGHT, total) for w in weights]
    result = [quotient for quotient, _ in shares]
    left = routes.FULL_WEIGHT - sum(result)
    by_remainder = sorted(range(len(weights)), key=lambda i: -shares[i][1])
    for i in by_remainder[:left]:
        result[i] += 1
    return result


# -- the parts -------------------------------------------------------------------------------


def _is_service_ref(ref: Mapping[str, Any], *, default_kind: str, default_group: str) -> bool:
    group = ref.get("group", default_group)
    return ref.get("kind", default_kind) == "Service" and group in _SERVICE_GROUPS


def _required(spec: Mapping[str, Any], field: str, path: str) -> Any:
    if spec.get(field) in (None, ""):
        raise _FieldError(f"{path}.{field}", "required")
    return spec[field]


def _hosts(spec: Mapping[str, Any], namespace: str, domain: str) -> tuple[str, ...]:
    # A parentRef's group defaults to gateway.networking.k8s.io: a core Service says group "".
    found = [
        routes.qualify(
            _required(ref, "name", f"parentRefs[{i}]"), ref.get("namespace") or namespace, domain
        )
        for i, ref in enumerate(spec.get("parentRefs") or ())
        if _is_service_ref(ref, default_kind="Gateway", default_group="gateway.networking.k8s.io")
    ]
    found += [str(h) for h in spec.get("hostnames") or ()]
    return tuple(dict.fromkeys(found))


def _string_match(kind: routes.MatchKind, value: str, path: str) -> routes.StringMatch:
    try:
        return routes.StringMatch.build(kind, value)
    except regexes.RegexError as exc:
        raise _FieldError(path, f"invalid regular expression: {exc}") from exc


def _named(
    entries: Sequence[Mapping[str, Any]], path: str, *, fold: bool
) -> tuple[tuple[str, routes.StringMatch], ...]:
    """Header or query parameter conditions; of two with the same name only the first counts
    (Gateway API's rule), header names compared case-insensitively."""
    found: dict[str, routes.StringMatch] = {}
    for i, entry in enumerate(entries):
        at = f"{path}[{i}]"
        name = str(_required(entry, "name", at))
        key = name.lower() if fold else name
        kind = _VALUE_KINDS.get(entry.get("type", "Exact"))
        if kind is None:
            raise _FieldError(f"{at}.type", f"unsupported match type {entry.get('type')!r}")
        if key not in found:
            found[key] = _string_match(kind, str(_required(entry, "value", at)), f"{at}.value")
    return tuple(found.items())


def _path_conditions(path_type: str, value: str, path: str) -> list[routes.StringMatch]:
    kind = _PATH_KINDS.get(path_type)
    if kind is None:
        raise _FieldError(f"{path}.type", f"unsupported path match type {path_type!r}")
    if kind is not routes.MatchKind.PREFIX:
        return [_string_match(kind, value, f"{path}.value")]
    trimmed = value.rstrip("/")
    if not trimmed:
        return [routes.StringMatch.build(routes.MatchKind.PREFIX, "/")]
    return [
        routes.StringMatch.build(routes.MatchKind.EXACT, trimmed),
        routes.StringMatch.build(routes.MatchKind.PREFIX, trimmed + "/"),
    ]


def _match(
    spec: Mapping[str, Any], path: str
) -> tuple[_SortKey, tuple[routes.RequestMatch, ...], str]:
    """One Gateway API match: its rank, its `RequestMatch`es (any one holding is enough) and
    its path prefix ("" unless the path is a PathPrefix)."""
    path_spec = spec.get("path") or {}
    path_type, value = path_spec.get("type", "PathPrefix"), str(path_spec.get("value", "/"))
    headers = _named(spec.get("headers") or (), f"{path}.headers", fold=True)
    query = _named(spec.get("queryParams") or (), f"{path}.queryParams", fold=False)
    method = spec.get("method")
    method_match = (
        None if method is None else routes.StringMatch.build(routes.MatchKind.EXACT, method)
    )
    conditions = _path_conditions(path_type, value, f"{path}.path")
    matches = tuple(
        routes.RequestMatch(uri=uri, method=method_match, headers=headers, query_params=query)
        for uri in conditions
    )
    rank = (-_PATH_RANK[path_type], -len(value), method is None, -len(headers), -len(query))
    return rank, matches, value if path_type == "PathPrefix" else ""


def _header_ops(spec: Mapping[str, Any] | None) -> routes.HeaderOps:
    if not spec:
        return routes.HeaderOps()
    return routes.HeaderOps(
        set=tuple((str(h["name"]).lower(), str(h["value"])) for h in spec.get("set") or ()),
        add=tuple((str(h["name"]).lower(), str(h["value"])) for h in spec.get("add") or ()),
        remove=tuple(str(name).lower() for name in spec.get("remove") or ()),
    )


def _escaped(replacement: str) -> str:
    """`replacement` as a literal in RE2's rewrite syntax (`regexes.Regex.replace_all`)."""
    return replacement.replace("\\", "\\\\")


def _rewrite(spec: Mapping[str, Any], prefix: str, path: str) -> routes.Rewrite:
    modifier = spec.get("path") or {}
    kind = modifier.get("type")
    pattern, replacement = None, ""
    if kind == "ReplaceFullPath":
        pattern, replacement = _WHOLE_PATH, _escaped(str(modifier.get("replaceFullPath", "")))
    elif kind == "ReplacePrefixMatch":
        if not prefix:
            raise _FieldError(f"{path}.path", "ReplacePrefixMatch needs a PathPrefix match")
        # Gateway API's table: the trailing "/" of either side does not count, and what is
        # left after the prefix ("" or "/...") is kept; replacing with "/" leaves "/bar".
        matched = regexes.escape(prefix.rstrip("/"))
        new = str(modifier.get("replacePrefixMatch", "")).rstrip("/")
        pattern = regexes.compile(rf"\A{matched}" if new else rf"\A{matched}/?")
        replacement = _escaped(new or "/")
    elif kind is not None:
        raise _FieldError(f"{path}.path.type", f"unsupported path modifier {kind!r}")
    return routes.Rewrite(
        authority=spec.get("hostname"), uri_regex=pattern, uri_regex_replacement=replacement
    )


def _redirect(spec: Mapping[str, Any]) -> routes.Redirect:
    """`routes.Redirect.uri` replaces the whole path, so only ReplaceFullPath maps onto it; a
    ReplacePrefixMatch keeps the request's path (`find_unenforced` reports it)."""
    modifier = spec.get("path") or {}
    uri = None
    if modifier.get("type") == "ReplaceFullPath":
        uri = str(modifier.get("replaceFullPath", ""))
    return routes.Redirect(
        uri=uri,
        authority=spec.get("hostname"),
        scheme=spec.get("scheme"),
        port=spec.get("port"),
        status=int(spec.get("statusCode", DEFAULT_REDIRECT_STATUS)),
    )


def _backend_filters(
    filters: Sequence[Mapping[str, Any]],
) -> tuple[routes.HeaderOps, routes.HeaderOps]:
    found = {f.get("type"): f for f in filters}
    request = found.get("RequestHeaderModifier") or {}
    response = found.get("ResponseHeaderModifier") or {}
    return (
        _header_ops(request.get("requestHeaderModifier")),
        _header_ops(response.get("responseHeaderModifier")),
    )


def _destinations(
    refs: Sequence[Mapping[str, Any]], path: str, namespace: str, domain: str
) -> tuple[routes.Destination, ...]:
    weights = []
    for i, ref in enumerate(refs):
        weight = ref.get("weight", DEFAULT_WEIGHT)
        if not isinstance(weight, int) or weight < 0:
            raise _FieldError(f"{path}[{i}].weight", f"must be a whole number >= 0: {weight!r}")
        weights.append(weight)
    shares = percentages(weights)
    if not any(shares):
        return ()
    out = []
    for i, (ref, share) in enumerate(zip(refs, shares, strict=True)):
        request, response = _backend_filters(ref.get("filters") or ())
        backend = str(_required(ref, "name", f"{path}[{i}]"))
        out.append(
            routes.Destination(
                host=routes.qualify(backend, ref.get("namespace") or namespace, domain),
                subset=None,
                port=ref.get("port"),
                weight=share,
                request_headers=request,
                response_headers=response,
            )
        )
    return tuple(out)


def _seconds(value: str | None, path: str) -> float | None:
    """A timeout in seconds; "0s" turns it off (None), as Gateway API says."""
    if value is None:
        return None
    try:
        seconds = durations.parse_duration(value)
    except durations.DurationError as exc:
        raise _FieldError(path, str(exc)) from exc
    return seconds or None


def _build_rule(
    rule: Mapping[str, Any], index: int, default_name: str, namespace: str, domain: str
) -> list[tuple[_SortKey, routes.HttpRoute]]:
    path = f"rules[{index}]"
    name = rule.get("name") or default_name
    # Each of these filters appears once in a rule (the schema's rule): the index names it.
    filters = {f.get("type"): (i, f) for i, f in enumerate(rule.get("filters") or ())}

    def config(kind: str, field: str) -> tuple[str, Any]:
        i, spec = filters.get(kind, (0, {}))
        return f"{path}.filters[{i}].{field}", spec.get(field)

    rewrite_path, rewrite_spec = config("URLRewrite", "urlRewrite")
    redirect_spec = config("RequestRedirect", "requestRedirect")[1]
    redirect = None if redirect_spec is None else _redirect(redirect_spec)
    destinations: tuple[routes.Destination, ...] = ()
    if redirect is None:
        refs = rule.get("backendRefs") or ()
        destinations = _destinations(refs, f"{path}.backendRefs", namespace, domain)
    direct = None if destinations or redirect else routes.DirectResponse(NO_BACKEND_STATUS)
    request_headers = _header_ops(config("RequestHeaderModifier", "requestHeaderModifier")[1])
    response_headers = _header_ops(config("ResponseHeaderModifier", "responseHeaderModifier")[1])
    timeout = _seconds((rule.get("timeouts") or {}).get("request"), f"{path}.timeouts.request")
    # No matches is Gateway API's default match, a PathPrefix "/".
    gateway_matches = rule.get("matches") or [{}]
    built = []
    for j, entry in enumerate(gateway_matches):
        key, matches, prefix = _match(entry, f"{path}.matches[{j}]")
        rewrite = None if rewrite_spec is None else _rewrite(rewrite_spec, prefix, rewrite_path)
        route = routes.HttpRoute(
            name=name,
            matches=matches,
            destinations=destinations,
            redirect=redirect,
            direct_response=direct,
            rewrite=rewrite,
            timeout=timeout,
            request_headers=request_headers,
            response_headers=response_headers,
        )
        built.append((key, route))
    return built
