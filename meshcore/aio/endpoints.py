"""The metrics and readiness endpoints every long-running component serves (ztunnel on 15020
and 15021, the waypoint likewise), on the control-plane HTTP server of `meshcore.aio.http`."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client

from meshcore.aio import http

ReadinessCheck = Callable[[], str | None]  # None when ready, else the reason it is not


def metrics_handler(registry: prometheus_client.CollectorRegistry) -> http.Handler:
    async def handle(request: http.Request) -> http.Response:
        if request.method != "GET" or request.path not in ("/metrics", "/stats/prometheus"):
            return http.Response.text(404, "not found: try /metrics\n")
        body = prometheus_client.generate_latest(registry)
        return http.Response(200, body, prometheus_client.CONTENT_TYPE_LATEST)

    return handle


def readiness_handler(check: ReadinessCheck) -> http.Handler:
    async def handle(request: http.Request) -> http.Response:
        if request.path != "/healthz/ready":
            return http.Response.text(404, "not found: try /healthz/ready\n")
        reason = check()
        if reason is None:
            return http.Response.text(200, "ready\n")
        return http.Response.text(503, f"not ready: {reason}\n")

    return handle
