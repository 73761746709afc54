"""Which route of a `RouteTable` a request takes, and what that route does to it, with Envoy's
semantics (what Istio's waypoint runs):

- Routes are tried in order and the first whose ``match`` list has an entry that holds wins;
  a route without ``match`` takes every request. No route: the request gets 404 (flag NR).
- Inside one entry every condition must hold. A header condition needs the header present; its
  values, when repeated, are joined with "," (cookies with "; "), as Envoy joins them.
- ``uri`` exact and regex compare the path without its query string; prefix compares the path.
  A regex must match the whole value.
- A weighted split takes a roll in [0, 100) from the caller (randomness stays outside).
- A ``rewrite.uri`` replaces the prefix that matched (the whole path for an exact match, the
  leading "/" when the uri was not matched, as Envoy's prefix_rewrite does).
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from meshcore.traffic import routes


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # as sent, with the query string
    authority: str
    scheme: str = "http"
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names, in order
    port: int | None = None

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        if not values:
            return None
        return ("; " if name == "cookie" else ",").join(values)

    @property
    def path_only(self) -> str:
        return self.path.partition("?")[0]

    def query(self) -> dict[str, str]:
        """The first value of each query parameter (what Envoy's query matcher looks at)."""
        found: dict[str, str] = {}
        for key, value in urllib.parse.parse_qsl(
            self.path.partition("?")[2], keep_blank_values=True
        ):
            found.setdefault(key, value)
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Selected:
    route: routes.HttpRoute
    match: routes.RequestMatch | None  # the entry that held; None for a route without matches


def matches(match: routes.RequestMatch, request: Request) -> bool:
    uri = match.uri
    if uri is not None:
        text = request.path if uri.kind is routes.MatchKind.PREFIX else request.path_only
        if not uri.matches(text):
            return False
    for condition, value in (
        (match.method, request.method),
        (match.authority, request.authority),
        (match.scheme, request.scheme),
    ):
        if condition is not None and not condition.matches(value):
            return False
    if match.port is not None and match.port != request.port:
        return False
    for name, condition in match.headers:
        found = request.header(name)
        if found is None or not condition.matches(found):
            return False
    for name, condition in match.without_headers:
        found = request.header(name)
        if found is not None and condition.matches(found):
            return False
    if match.query_params:
        query = request.query()
        for name, condition in match.query_params:
            found_param = query.get(name)
            if found_param is None or not condition.matches(found_param):
                return False
    return True


def select(table: routes.RouteTable, request: Request) -> Selected | None:
    """The route the request takes, or None (404, no route)."""
    for route in table.routes:
        if not route.matches:
            return Selected(route, None)
        for match in route.matches:
            if matches(match, request):
                return Selected(route, match)
    return None


def choose(route: routes.HttpRoute, roll: int) -> routes.Destination:
    """The destination for a roll in [0, 100): each gets a share of rolls equal to its weight."""
    if not 0 <= roll < routes.FULL_WEIGHT:
        raise ValueError(f"roll {roll} is outside [0, {routes.FULL_WEIGHT})")
    if not route.destinations:
        raise ValueError(f"route {route.name} has no destinations")
    for destination in route.destinations:
        if roll < destination.weight:
            return destination
        roll -= destination.weight
    return route.destinations[-1]  # unreachable while weights add up to 100


def rewrite_path(selected: Selected, path: str) -> str:
    """The path sent upstream after the route's ``rewrite``."""
    rewrite = selected.route.rewrite
    if rewrite is None:
        return path
    if rewrite.uri_regex is not None:
        bare, mark, query = path.partition("?")
        return rewrite.uri_regex.replace_all(rewrite.uri_regex_replacement, bare) + mark + query
    if rewrite.uri is None:
        return path
    uri = selected.match.uri if selected.match is not None else None
    if uri is not None and uri.kind is routes.MatchKind.EXACT:
        _, mark, query = path.partition("?")
        return rewrite.uri + mark + query
    prefix = uri.value if uri is not None and uri.kind is routes.MatchKind.PREFIX else "/"
    return rewrite.uri + path[len(prefix) :]
