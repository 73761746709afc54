"""ztunnel's HTTP endpoints: Prometheus metrics (15020), readiness (15021), admin (15000).

Readiness means: the node agent's snapshot was applied (ZDS) and xDS delivered its first full
state, so a connection arriving now finds what it needs.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from meshcore.aio import http
from ztunnel import config as config_mod
from ztunnel.state import proxy_state

logger = logging.getLogger("ztunnel.admin")


def admin_handler(
    cfg: config_mod.Config,
    state: proxy_state.ProxyState,
    extra_dump: Callable[[], dict[str, Any]],
    quit: Callable[[], None],
) -> http.Handler:
    async def handle(request: http.Request) -> http.Response:
        if request.path == "/config_dump" and request.method == "GET":
            dump = config_dump(cfg, state)
            dump.update(extra_dump())
            return http.Response.json(200, json.dumps(dump, indent=2, default=str))
        if request.path == "/quitquitquit" and request.method == "POST":
            quit()
            return http.Response.text(200, "shutting down\n")
        if request.path == "/logging" and request.method == "POST":
            return _logging(request)
        if request.path == "/":
            return http.Response.text(200, "endpoints: /config_dump /logging /quitquitquit\n")
        return http.Response.text(404, "not found\n")

    return handle


def _logging(request: http.Request) -> http.Response:
    root = logging.getLogger()
    if "reset" in request.query:
        root.setLevel(logging.INFO)
    elif "level" in request.query:
        for part in request.query["level"][0].split(","):
            target, _, level = part.rpartition("=")
            name = level.strip().upper()
            if name not in logging.getLevelNamesMapping():
                return http.Response.text(400, f"unknown log level {level!r}\n")
            (logging.getLogger(target.replace("::", ".")) if target else root).setLevel(name)
    return http.Response.text(200, f"current log level is {logging.getLevelName(root.level)}\n")


def config_dump(cfg: config_mod.Config, state: proxy_state.ProxyState) -> dict[str, Any]:
    return {
        "workloads": [_jsonable(w) for w in sorted(state.workloads, key=lambda w: w.uid)],
        "services": [_jsonable(s) for s in sorted(state.services, key=lambda s: s.hostname)],
        "policies": [_jsonable(p) for p in sorted(state.policies, key=lambda p: p.key)],
        "version": "ambient-mesh-0.1.0",
        "config": _jsonable(cfg),
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _camel(f.name): _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple | list | frozenset | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)
