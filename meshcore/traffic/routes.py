"""A VirtualService's HTTP routes as frozen values, translated from the object the API serves.

The object is expected to have passed the API's schema (`controller.sources.local.
trafficschemas`); anything that still does not fit raises `TrafficConfigError` naming the object
and field, rather than a KeyError from deep inside.

Hosts are qualified as Istio does: a name without a dot is a Service in the object's own
namespace (``reviews`` in ``shop`` is ``reviews.shop.svc.cluster.local``); a name with a dot is
taken as written.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

from meshcore import durations, errors
from meshcore.traffic import regexes

DEFAULT_DOMAIN = "cluster.local"
FULL_WEIGHT = 100


class TrafficConfigError(errors.MeshError, ValueError):
    """A traffic object that cannot be translated; the message names the object and field."""


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclasses.dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str
    ignore_case: bool = False
    pattern: regexes.Regex | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def build(cls, kind: MatchKind, value: str, *, ignore_case: bool = False) -> StringMatch:
        """Raises `regexes.RegexError` for a regex RE2 refuses."""
        pattern = None
        if kind is MatchKind.REGEX:
            pattern = regexes.compile(value, ignore_case=ignore_case)
        return cls(kind, value, ignore_case, pattern)

    def matches(self, text: str) -> bool:
        """Envoy's semantics: exact and prefix compare, a regex must match the whole text
        (with RE2: linear in the text, whatever the pattern)."""
        if self.pattern is not None:
            return self.pattern.matches(text)
        value = self.value
        if self.ignore_case:
            text, value = text.lower(), value.lower()
        if self.kind is MatchKind.EXACT:
            return text == value
        return text.startswith(value)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestMatch:
    """One entry of ``match``: every condition set here must hold (an AND)."""

    uri: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """`headers` (lower-case names) after remove, then set (replacing), then add."""
        if not (self.set or self.add or self.remove):
            return headers
        dropped = set(self.remove) | {name for name, _ in self.set}
        out = [(n, v) for n, v in headers if n not in dropped]
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Destination:
    host: str  # fully qualified
    subset: str | None
    port: int | None
    weight: int
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@dataclasses.dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout: float | None  # seconds; None: the route's timeout bounds every try
    retry_on: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    delay: float | None = None  # seconds
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0


@dataclasses.dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: regexes.Regex | None = None
    # RE2's rewrite syntax (\1 inserts a group, \\ a backslash), checked against uri_regex.
    uri_regex_replacement: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    status: int = 301


@dataclasses.dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpRoute:
    """One ``http`` entry. Exactly one of `destinations`, `redirect`, `direct_response` is set
    (`destinations` non-empty, or the other one not None)."""

    name: str
    matches: tuple[RequestMatch, ...]  # empty: every request
    destinations: tuple[Destination, ...]
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None  # seconds
    retries: Retries | None = None
    fault: Fault | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@dataclasses.dataclass(frozen=True, slots=True)
class RouteTable:
    """The HTTP routes of one VirtualService, for its (qualified) hosts."""

    namespace: str
    name: str
    hosts: tuple[str, ...]
    routes: tuple[HttpRoute, ...]


def qualify(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """Istio's reading of a host name written in an object of `namespace`."""
    if "." in host or host == "*":
        return host
    return f"{host}.{namespace}.svc.{domain}"


# -- translation -------------------------------------------------------------------------------


def build_route_table(obj: Mapping[str, Any], domain: str = DEFAULT_DOMAIN) -> RouteTable:
    """A VirtualService (as the API serves it) as a `RouteTable`."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    spec = obj.get("spec") or {}
    where = f"VirtualService {namespace}/{name}"
    try:
        hosts = tuple(qualify(h, namespace, domain) for h in spec["hosts"])
        routes = tuple(
            _build_http_route(r, f"{name}.{i}", namespace, domain)
            for i, r in enumerate(spec.get("http") or ())
        )
    except _FieldError as exc:
        raise TrafficConfigError(f"{where}: spec.{exc.path}: {exc.detail}") from exc
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise TrafficConfigError(f"{where}: malformed spec ({type(exc).__name__}: {exc})") from exc
    return RouteTable(namespace, name, hosts, routes)


class _FieldError(Exception):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def _string_match(spec: Mapping[str, Any], path: str, *, ignore_case: bool = False) -> StringMatch:
    given = [k for k in ("exact", "prefix", "regex") if k in spec]
    if len(given) != 1:
        raise _FieldError(path, "needs exactly one of exact, prefix, regex")
    kind = MatchKind(given[0])
    try:
        return StringMatch.build(kind, str(spec[kind.value]), ignore_case=ignore_case)
    except regexes.RegexError as exc:
        raise _FieldError(f"{path}.regex", f"invalid regular expression: {exc}") from exc


def _named_matches(
    spec: Mapping[str, Any] | None, path: str
) -> tuple[tuple[str, StringMatch], ...]:
    return tuple(
        (key.lower(), _string_match(value, f"{path}[{key}]")) for key, value in (spec or {}).items()
    )


def _request_match(spec: Mapping[str, Any], path: str) -> RequestMatch:
    def one(field: str, **kwargs: bool) -> StringMatch | None:
        value = spec.get(field)
        return None if value is None else _string_match(value, f"{path}.{field}", **kwargs)

    return RequestMatch(
        uri=one("uri", ignore_case=bool(spec.get("ignoreUriCase"))),
        method=one("method"),
        authority=one("authority"),
        scheme=one("scheme"),
        headers=_named_matches(spec.get("headers"), f"{path}.headers"),
        without_headers=_named_matches(spec.get("withoutHeaders"), f"{path}.withoutHeaders"),
        query_params=tuple(
            (key, _string_match(value, f"{path}.queryParams[{key}]"))
            for key, value in (spec.get("queryParams") or {}).items()
        ),
        port=spec.get("port"),
    )


def _header_ops(spec: Mapping[str, Any] | None) -> HeaderOps:
    if not spec:
        return HeaderOps()
    return HeaderOps(
        set=tuple((k.lower(), str(v)) for k, v in (spec.get("set") or {}).items()),
        add=tuple((k.lower(), str(v)) for k, v in (spec.get("add") or {}).items()),
        remove=tuple(k.lower() for k in spec.get("remove") or ()),
    )


def _destinations(
    route: Sequence[Mapping[str, Any]], path: str, namespace: str, domain: str
) -> tuple[Destination, ...]:
    if not route:
        raise _FieldError(path, "needs at least one destination")
    single = len(route) == 1
    out = []
    for entry in route:
        dest = entry["destination"]
        headers = entry.get("headers") or {}
        out.append(
            Destination(
                host=qualify(dest["host"], namespace, domain),
                subset=dest.get("subset") or None,
                port=(dest.get("port") or {}).get("number"),
                weight=FULL_WEIGHT if single else int(entry.get("weight", 0)),
                request_headers=_header_ops(headers.get("request")),
                response_headers=_header_ops(headers.get("response")),
            )
        )
    total = sum(d.weight for d in out)
    if total != FULL_WEIGHT:
        raise _FieldError(path, f"weights add up to {total}, not {FULL_WEIGHT}")
    return tuple(out)


def _seconds(value: str | None, path: str) -> float | None:
    if value is None:
        return None
    try:
        return durations.parse_duration(value)
    except durations.DurationError as exc:
        raise _FieldError(path, str(exc)) from exc


def _percent(spec: Mapping[str, Any]) -> float:
    if "percentage" in spec:
        return float(spec["percentage"].get("value", 0.0))
    if "percent" in spec:
        return float(spec["percent"])
    return 100.0


def _fault(spec: Mapping[str, Any] | None, path: str) -> Fault | None:
    if not spec:
        return None
    delay, abort = spec.get("delay") or {}, spec.get("abort") or {}
    return Fault(
        delay=_seconds(delay.get("fixedDelay"), f"{path}.delay.fixedDelay"),
        delay_percent=_percent(delay) if delay else 0.0,
        abort_status=abort.get("httpStatus"),
        abort_percent=_percent(abort) if abort else 0.0,
    )


def _rewrite(spec: Mapping[str, Any] | None, path: str) -> Rewrite | None:
    if not spec:
        return None
    regex = spec.get("uriRegexRewrite") or {}
    pattern, replacement = None, str(regex.get("rewrite", ""))
    if regex:
        try:
            pattern = regexes.compile(regex["match"])
        except regexes.RegexError as exc:
            raise _FieldError(f"{path}.uriRegexRewrite.match", f"invalid regex: {exc}") from exc
        try:
            pattern.check_rewrite(replacement)
        except regexes.RegexError as exc:
            raise _FieldError(f"{path}.uriRegexRewrite.rewrite", str(exc)) from exc
    return Rewrite(
        uri=spec.get("uri"),
        authority=spec.get("authority"),
        uri_regex=pattern,
        uri_regex_replacement=replacement,
    )


def _build_http_route(
    spec: Mapping[str, Any], default_name: str, namespace: str, domain: str
) -> HttpRoute:
    index = default_name.rsplit(".", 1)[1]
    path = f"http[{index}]"
    retries = spec.get("retries")
    headers = spec.get("headers") or {}
    redirect, direct = spec.get("redirect"), spec.get("directResponse")
    if "route" in spec or (redirect is None and direct is None):
        destinations = _destinations(spec.get("route") or (), f"{path}.route", namespace, domain)
    else:
        destinations = ()
    return HttpRoute(
        name=spec.get("name") or default_name,
        matches=tuple(
            _request_match(m, f"{path}.match[{i}]") for i, m in enumerate(spec.get("match") or ())
        ),
        destinations=destinations,
        redirect=None
        if redirect is None
        else Redirect(
            uri=redirect.get("uri"),
            authority=redirect.get("authority"),
            scheme=redirect.get("scheme"),
            port=redirect.get("port"),
            status=int(redirect.get("redirectCode", 301)),
        ),
        direct_response=None
        if direct is None
        else DirectResponse(
            status=int(direct["status"]),
            body=str((direct.get("body") or {}).get("string", "")).encode(),
        ),
        rewrite=_rewrite(spec.get("rewrite"), f"{path}.rewrite"),
        timeout=_seconds(spec.get("timeout"), f"{path}.timeout"),
        retries=None
        if retries is None
        else Retries(
            attempts=int(retries.get("attempts", 0)),
            per_try_timeout=_seconds(retries.get("perTryTimeout"), f"{path}.retries.perTryTimeout"),
            retry_on=tuple(
                c.strip() for c in str(retries.get("retryOn", "")).split(",") if c.strip()
            ),
        ),
        fault=_fault(spec.get("fault"), f"{path}.fault"),
        request_headers=_header_ops(headers.get("request")),
        response_headers=_header_ops(headers.get("response")),
    )
