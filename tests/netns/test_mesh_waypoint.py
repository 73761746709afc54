"""Waypoints end to end on a 2-node playground: `meshctl waypoint apply` deploys one for a
namespace, ztunnels send the namespace's service traffic through it, and Istio's YAML applied
with `meshctl apply` routes, retries, times out, injects faults, breaks circuits, ejects
outliers, authorizes per request and reports metrics and traces there.

Every request goes client pod -> its ztunnel -> (HBONE) waypoint pod -> (HBONE, the waypoint's
identity) the backend's ztunnel -> backend pod. Configuration reaches the waypoint over xDS a
moment after it is applied, so each test first waits for the behaviour it configured to appear
(by sending requests until it does), then measures. A namespace labelled with a waypoint that does
not exist has its service calls refused, never sent around it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from meshcore.kube import resources
from meshctl import commands
from tests.netns import l7_apps as l7
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

NS = "shop"
OBS = "observability"
OUTSIDE = "outside"
URL = f"http://reviews.{NS}"
FRONTEND = f"cluster.local/ns/{NS}/sa/frontend"
BACKENDS = (
    "reviews-v1",
    "reviews-v2",
    "reviews-premium",
    "flaky-v1",
    "ratings-good",
    "ratings-bad",
)


def _dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


@contextlib.contextmanager
def _configured(cluster: Playground, *docs: dict[str, Any]) -> Iterator[None]:
    """`meshctl apply` the docs for the test's duration, `meshctl delete` them after."""
    done = cluster.meshctl("apply", "-f", "-", stdin=_dump(*docs))
    assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        done = cluster.meshctl("delete", "-f", "-", stdin=_dump(*docs))
        assert done.returncode == 0, done.stderr


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    mh.wait_until(check, timeout=timeout, what=what)


def _get(
    cluster: Playground, path: str = "/", *, client: str = "frontend", host: str = URL, **kw: Any
) -> dict[str, Any]:
    [result] = l7.request(cluster, NS, client, host + path, **kw)
    return result


def _subsets(host: str, *versions: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "host": host,
        "subsets": [{"name": v, "labels": {"version": v}} for v in versions],
    }
    if policy:
        spec["trafficPolicy"] = policy
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": NS},
        "spec": spec,
    }


def _route(host: str, *http: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": host, "namespace": NS},
        "spec": {"hosts": [host], "http": list(http)},
    }


def _to(subset: str, weight: int | None = None, host: str = "reviews") -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": host, "subset": subset}}
    if weight is not None:
        out["weight"] = weight
    return out


REVIEWS_SUBSETS = _subsets("reviews", "v1", "v2", "premium")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground().nodes(2).otlp_endpoint(f"http://collector.{OBS}:4318")) as pg:
        pg.apply(
            mh.manifest(
                mh.namespace(OBS, ambient=False),
                l7.collector_pod("collector", OBS),
                mh.service("collector", OBS, 4318, 4318),
                # Outside the mesh: what a ServiceEntry calls "external".
                mh.namespace(OUTSIDE, ambient=False),
                l7.backend("httpbin", OUTSIDE, "external", app="httpbin"),
                l7.http_service("httpbin", OUTSIDE),
                mh.namespace(NS, ambient=True),
                l7.backend("reviews-v1", NS, "v1", app="reviews"),
                l7.backend("reviews-v2", NS, "v2", app="reviews"),
                l7.backend("reviews-premium", NS, "premium", app="reviews"),
                l7.http_service("reviews", NS),
                l7.http_service("reviews-v1", NS, {"app": "reviews", "version": "v1"}),
                l7.http_service("reviews-v2", NS, {"app": "reviews", "version": "v2"}),
                l7.backend("flaky-v1", NS, "v1", app="flaky", fail_every=2),
                l7.http_service("flaky", NS),
                l7.backend("ratings-good", NS, "good", app="ratings"),
                l7.backend("ratings-bad", NS, "bad", app="ratings", fail_every=1),
                l7.http_service("ratings", NS),
                l7.client_pod("frontend", NS),
                l7.client_pod("other", NS),
            )
        )
        for client in ("frontend", "other"):
            pg.wait_pod_ready(NS, client)
            mh.wait_captured(pg, NS, client)
        pg.wait_pod_ready(OBS, "collector")
        pg.call(lambda api: commands.wait_deployments_ready(api, NS, BACKENDS, 120))
        pg.call(lambda api: commands.wait_deployments_ready(api, OUTSIDE, ["httpbin"], 120))
        done = pg.meshctl("waypoint", "apply", "-n", NS)
        assert done.returncode == 0, done.stderr
        assert "waypoint shop/waypoint ready" in done.stdout
        yield pg


def test_waypoint_is_deployed_and_carries_the_namespace_traffic(cluster: Playground) -> None:
    gateway = cluster.get(resources.GATEWAYS, "waypoint", NS)
    programmed = {c["type"]: c["status"] for c in gateway["status"]["conditions"]}
    assert programmed == {"Accepted": "True", "Programmed": "True"}
    assert cluster.get(resources.NAMESPACES, NS)["metadata"]["labels"]["istio.io/use-waypoint"] == (
        "waypoint"
    )
    result = _get(cluster, "/reviews")
    assert result["status"] == 200, result
    # The waypoint added its span to the trace context: the request went through it.
    assert "traceparent" in result["body"]["headers"]
    # The client's ztunnel dialled the waypoint pod over HBONE, asking for the service's VIP
    # and port as the app did, and checked the waypoint's identity.
    waypoint_id = f"spiffe://cluster.local/ns/{NS}/sa/waypoint"
    vip = cluster.get(resources.SERVICES, "reviews", NS)["spec"]["clusterIP"]
    outbound = [
        r
        for node in ("node1", "node2")
        for r in mh.access_log(cluster, node)
        if r["direction"] == "outbound"
        and r["src.workload"] == "frontend"
        and str(r.get("dst.workload", "")).startswith("waypoint-")
    ]
    assert outbound, "no call from frontend to the waypoint in the ztunnel access logs"
    assert {(r["dst.hbone_addr"], r["dst.identity"], r["error"]) for r in outbound} == {
        (f"{vip}:80", waypoint_id, None)
    }
    # The backend's ztunnel saw the waypoint's identity: the connections it counts as
    # destination for reviews pods come from the waypoint, none from the client directly.
    opened = [
        line
        for node in ("node1", "node2")
        for line in mh.node_http(
            cluster, f"http://{cluster.node_address(node)}:15020/metrics", node
        ).splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and 'destination_canonical_service="reviews"' in line
    ]
    assert opened, "no connection to a reviews pod counted by its ztunnel"
    assert all(f'source_principal="{waypoint_id}"' in line for line in opened), opened


def test_header_canary_goes_to_v2_everything_else_to_v1(cluster: Playground) -> None:
    route = _route(
        "reviews",
        {"match": [{"headers": {"x-canary": {"exact": "true"}}}], "route": [_to("v2")]},
        {"route": [_to("v1")]},
    )
    with _configured(cluster, REVIEWS_SUBSETS, route):
        canary = {"x-canary": "true"}
        _until(
            "the canary route",
            lambda: (
                _get(cluster, headers=canary)["body"]["version"] == "v2"
                and _get(cluster)["body"]["version"] == "v1"
            ),
        )
        assert l7.versions(l7.request(cluster, NS, "frontend", URL, count=20, headers=canary)) == {
            "v2": 20
        }
        assert l7.versions(l7.request(cluster, NS, "frontend", URL, count=20)) == {"v1": 20}
        other = {"x-canary": "false"}
        assert l7.versions(l7.request(cluster, NS, "frontend", URL, count=10, headers=other)) == {
            "v1": 10
        }


def test_a_90_10_split_lands_within_5_points(cluster: Playground) -> None:
    route = _route("reviews", {"route": [_to("v1", 90), _to("v2", 10)]})
    with _configured(cluster, REVIEWS_SUBSETS, route):
        _until(
            "the split",
            lambda: (
                set(l7.versions(l7.request(cluster, NS, "frontend", URL, count=40))) <= {"v1", "v2"}
            ),
        )
        counts = l7.versions(l7.request(cluster, NS, "frontend", URL, count=1000, timeout=240))
        assert set(counts) == {"v1", "v2"}, counts
        assert abs(counts["v2"] / 10 - 10) <= 5, counts  # percent of 1000


def test_cookie_regex_picks_the_premium_subset_and_prefix_v2_picks_v2(cluster: Playground) -> None:
    route = _route(
        "reviews",
        {
            "match": [{"headers": {"cookie": {"regex": r"^(.*?;\s*)?(user=premium)(;.*)?$"}}}],
            "route": [_to("premium")],
        },
        {"match": [{"uri": {"prefix": "/v2"}}], "route": [_to("v2")]},
        {"route": [_to("v1")]},
    )
    with _configured(cluster, REVIEWS_SUBSETS, route):
        premium = {"cookie": "theme=dark; user=premium"}
        _until(
            "the cookie route",
            lambda: _get(cluster, headers=premium)["body"]["version"] == "premium",
        )
        assert _get(cluster, headers={"cookie": "user=basic"})["body"]["version"] == "v1"
        assert _get(cluster, "/v2/reviews")["body"]["version"] == "v2"
        assert _get(cluster, "/v2")["body"]["path"] == "/v2"
        assert _get(cluster, "/reviews")["body"]["version"] == "v1"


def test_http_route_matches_and_splits_through_parent_refs_to_the_service(
    cluster: Playground,
) -> None:
    def backend(name: str, weight: int | None = None) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": name, "port": 80}
        if weight is not None:
            ref["weight"] = weight
        return ref

    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                    "backendRefs": [backend("reviews-v2")],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-route", "value": "v2"}]},
                        }
                    ],
                    "backendRefs": [backend("reviews-v2")],
                },
                {"backendRefs": [backend("reviews-v1", 90), backend("reviews-v2", 10)]},
            ],
        },
    }
    with _configured(cluster, route):
        canary = {"x-canary": "true"}
        _until("the HTTPRoute", lambda: _get(cluster, headers=canary)["body"]["version"] == "v2")
        assert l7.versions(l7.request(cluster, NS, "frontend", URL, count=10, headers=canary)) == {
            "v2": 10
        }
        prefixed = _get(cluster, "/v2/x")
        assert prefixed["body"]["version"] == "v2"
        assert prefixed["body"]["headers"]["x-route"] == "v2"
        counts = l7.versions(l7.request(cluster, NS, "frontend", URL, count=400))
        assert set(counts) == {"v1", "v2"}, counts
        assert abs(counts["v2"] / 4 - 10) <= 5, counts  # percent of 400


def test_http2_streams_from_the_client_are_routed_each(cluster: Playground) -> None:
    route = _route(
        "reviews",
        {"match": [{"uri": {"prefix": "/h2"}}], "route": [_to("v2")]},
        {"route": [_to("v1")]},
    )
    with _configured(cluster, REVIEWS_SUBSETS, route):
        _until("the route", lambda: _get(cluster, "/h2")["body"]["version"] == "v2")
        results = l7.h2_request(cluster, NS, "frontend", URL + "/h2/streams", 5)
        assert [r["status"] for r in results] == [200] * 5
        assert {r["body"]["version"] for r in results} == {"v2"}
        # The waypoint speaks HTTP/1.1 to the backend, one request per stream.
        assert len({r["body"]["n"] for r in results}) == 5


def test_retries_turn_every_other_failure_into_success(cluster: Playground) -> None:
    # Without a policy, every other answer is the backend's 500 (500 is not retried by default).
    before = l7.request(cluster, NS, "frontend", f"http://flaky.{NS}/", count=10)
    assert sorted(r["status"] for r in before) == [200] * 5 + [500] * 5
    route = _route(
        "flaky",
        {
            "route": [{"destination": {"host": "flaky"}}],
            "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
        },
    )
    with _configured(cluster, route):
        _until(
            "the retry policy",
            lambda: all(
                r["status"] == 200
                for r in l7.request(cluster, NS, "frontend", f"http://flaky.{NS}/", count=4)
            ),
        )
        after = l7.request(cluster, NS, "frontend", f"http://flaky.{NS}/", count=50)
        assert [r["status"] for r in after] == [200] * 50


def test_timeout_answers_504_on_time(cluster: Playground) -> None:
    route = _route("reviews", {"route": [_to("v1")], "timeout": "0.5s"})
    with _configured(cluster, REVIEWS_SUBSETS, route):
        _until("the timeout", lambda: _get(cluster, "/?delay_ms=3000")["status"] == 504)
        result = _get(cluster, "/?delay_ms=3000")
        assert result["status"] == 504
        assert result["text"] == "upstream request timeout"
        # On time: after the 0.5 s timeout, well before the backend's 3 s answer.
        assert 450 <= result["ms"] < 2500, result["ms"]
        assert _get(cluster, "/?delay_ms=10")["status"] == 200


def test_injected_abort_and_delay(cluster: Playground) -> None:
    route = _route(
        "reviews",
        {
            "match": [{"uri": {"prefix": "/abort"}}],
            "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
            "route": [_to("v1")],
        },
        {
            "match": [{"uri": {"prefix": "/delay"}}],
            "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 100}}},
            "route": [_to("v1")],
        },
        {"route": [_to("v1")]},
    )
    with _configured(cluster, REVIEWS_SUBSETS, route):
        _until("the abort", lambda: _get(cluster, "/abort")["status"] == 418)
        assert [
            r["status"] for r in l7.request(cluster, NS, "frontend", URL + "/abort", count=5)
        ] == [418] * 5
        delayed = _get(cluster, "/delay")
        assert delayed["status"] == 200
        assert delayed["body"]["version"] == "v1"
        assert delayed["ms"] >= 1000, delayed["ms"]
        assert _get(cluster, "/fast")["ms"] < 1000


def test_circuit_breaking_answers_a_burst_with_503_uo(cluster: Playground) -> None:
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
    rule = _subsets("reviews", "v1", "v2", "premium", policy={"connectionPool": pool})
    route = _route("reviews", {"route": [_to("v1")]})
    with _configured(cluster, rule, route):
        slow = URL + "/?delay_ms=1500"

        def overflowed() -> bool:
            statuses = [r["status"] for r in l7.burst(cluster, NS, "frontend", slow, 8)]
            return 503 in statuses and 200 in statuses

        _until("the connection pool limit", overflowed, timeout=60)
        results = l7.burst(cluster, NS, "frontend", slow, 8)
        refused = [r for r in results if r["status"] == 503]
        served = [r for r in results if r["status"] == 200]
        # One connection and one pending request: at most two are served at once, the rest
        # are refused at once, as overflow.
        assert 1 <= len(served) <= 2, results
        assert len(refused) == 8 - len(served), results
        assert all("reset reason: overflow" in r["text"] for r in refused), refused
        metrics = _waypoint_metrics(cluster)
        assert any(
            line.startswith("istio_requests_total{")
            and 'response_code="503"' in line
            and 'response_flags="UO"' in line
            for line in metrics.splitlines()
        ), "no 503 UO in the waypoint's istio_requests_total"


def test_outlier_detection_ejects_a_failing_endpoint_and_brings_it_back(
    cluster: Playground,
) -> None:
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "ratings", "namespace": NS},
        "spec": {
            "host": "ratings",
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "interval": "1s",
                    "baseEjectionTime": "4s",
                    "maxEjectionPercent": 100,
                },
            },
        },
    }
    ratings = f"http://ratings.{NS}/"
    with _configured(cluster, rule):
        # Wait until an ejection has happened: a run of 12 answers without a 500.
        def ejected() -> bool:
            statuses = [r["status"] for r in l7.request(cluster, NS, "frontend", ratings, count=12)]
            return statuses == [200] * 12

        _until("the bad endpoint's ejection", ejected, timeout=60)
        # While ejected, only the good one answers.
        assert l7.versions(l7.request(cluster, NS, "frontend", ratings, count=20)) == {"good": 20}

        # After baseEjectionTime it is chosen again (and fails again).
        def back() -> bool:
            return "500" in l7.versions(l7.request(cluster, NS, "frontend", ratings, count=4))

        _until("the bad endpoint's return", back, timeout=30)


def test_l7_policy_allows_get_api_from_frontend_only(cluster: Playground) -> None:
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "reviews-api", "namespace": NS},
        "spec": {
            "targetRefs": [
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
            ],
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": [FRONTEND]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                }
            ],
        },
    }
    with _configured(cluster, policy):
        _until("the policy", lambda: _get(cluster, "/api/x", client="other")["status"] == 403)
        assert _get(cluster, "/api/reviews")["status"] == 200
        denied = _get(cluster, "/api/reviews", method="POST")
        assert denied["status"] == 403
        assert denied["text"] == "RBAC: access denied"
        assert _get(cluster, "/api/reviews", client="other")["status"] == 403
        assert _get(cluster, "/admin")["status"] == 403
    _until("the policy's removal", lambda: _get(cluster, "/admin")["status"] == 200)


def _waypoint_metrics(cluster: Playground) -> str:
    pod = cluster.call(
        lambda api: api.list(
            resources.PODS, NS, label_selector="gateway.networking.k8s.io/gateway-name=waypoint"
        )
    ).items[0]
    return mh.node_http(cluster, f"http://{pod['status']['podIP']}:15020/metrics")


def test_metrics_and_a_trace_span_are_produced_and_the_trace_id_crosses(
    cluster: Playground,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
    result = _get(cluster, "/traced", headers={"traceparent": incoming})
    assert result["status"] == 200
    forwarded = result["body"]["headers"]["traceparent"]
    version, forwarded_trace, parent, flags = forwarded.split("-")
    assert (version, forwarded_trace, flags) == ("00", trace_id, "01")
    assert parent != "00f067aa0ba902b7"  # the waypoint's own span is the backend's parent

    def exported() -> bool:
        spans = l7.collected_spans(cluster, OBS, "collector")
        return any(s["traceId"] == trace_id and s["spanId"] == parent for s in spans)

    _until("the waypoint's span at the collector", exported)
    [span] = [
        s
        for s in l7.collected_spans(cluster, OBS, "collector")
        if s["traceId"] == trace_id and s["spanId"] == parent
    ]
    assert span["parentSpanId"] == "00f067aa0ba902b7"

    metrics = _waypoint_metrics(cluster)
    for name in (
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
    ):
        lines = [
            line
            for line in metrics.splitlines()
            if line.startswith(name + "{")
            and 'reporter="waypoint"' in line
            and 'destination_service="reviews.shop.svc.cluster.local"' in line
            and 'response_code="200"' in line
        ]
        assert lines, f"no {name} for reviews with reporter=waypoint, response_code=200"
    # And one JSON access-log record for the request, in the waypoint's log.
    logs = cluster.meshctl("logs", "-n", NS, "deploy/waypoint").stdout
    records = []
    for line in logs.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("scope") == "access":
                records.append(entry)
    traced = [r for r in records if r.get("path") == "/traced"]
    assert [r["response_code"] for r in traced] == [200], logs[-2000:]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda vs: vs["spec"]["http"][0].update(
                {"match": [{"headers": {"cookie": {"regex": "user=(premium"}}}]}
            ),
            "spec.http[0].match[0].headers[cookie].regex",
        ),
        (
            lambda vs: vs["spec"]["http"][0].update({"route": [_to("v1", 50), _to("v2", 40)]}),
            "spec.http[0].route",
        ),
        (
            lambda vs: vs["spec"]["http"][0].update({"route": [_to("v9")]}),
            "spec.http[0].route[0].destination.subset",
        ),
    ],
    ids=["invalid-regex", "weights-not-100", "unknown-subset"],
)
def test_bad_routes_are_rejected_with_the_field_path_and_routing_goes_on(
    cluster: Playground, change: Callable[[dict[str, Any]], None], field: str
) -> None:
    good = _route("reviews", {"route": [_to("v2")]})
    with _configured(cluster, REVIEWS_SUBSETS, good):
        _until("the good route", lambda: _get(cluster)["body"]["version"] == "v2")
        bad = yaml.safe_load(_dump(good))
        change(bad)
        done = cluster.meshctl("apply", "-f", "-", stdin=_dump(bad))
        assert done.returncode == 1
        assert field in done.stderr, done.stderr
        # The stored route is the good one, and it still routes.
        assert l7.versions(l7.request(cluster, NS, "frontend", URL, count=5)) == {"v2": 5}


def test_egress_to_a_service_entry_host_is_routed_and_observed_in_the_waypoint(
    cluster: Playground,
) -> None:
    host = "api.external.example"
    entry = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "external-api", "namespace": NS},
        "spec": {
            "hosts": [host],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            # Resolved by the waypoint when it dials: here, a Service outside the mesh.
            "endpoints": [{"address": f"httpbin.{OUTSIDE}.svc.cluster.local"}],
        },
    }
    route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "external-api", "namespace": NS},
        "spec": {
            "hosts": [host],
            "http": [
                {
                    "route": [{"destination": {"host": host}}],
                    "headers": {"request": {"set": {"x-egress": "through-waypoint"}}},
                }
            ],
        },
    }
    with _configured(cluster, entry, route):
        # The controller allocates the host an address; every pod resolves the host to it.
        def allocated() -> str | None:
            status = cluster.get(resources.SERVICE_ENTRIES, "external-api", NS).get("status") or {}
            return next((a["value"] for a in status.get("addresses") or ()), None)

        vip = mh.wait_until(allocated, what="the ServiceEntry's allocated address")
        assert vip.startswith("240.240.")

        def answered() -> bool:
            result = l7.request(cluster, NS, "frontend", f"http://{host}/egress")[0]
            return bool(result["status"] == 200)

        _until("egress through the waypoint", answered, timeout=60)
        [result] = l7.request(cluster, NS, "frontend", f"http://{host}/egress")
        assert result["body"]["version"] == "external"
        assert result["body"]["headers"]["x-egress"] == "through-waypoint"  # routed
        assert result["body"]["headers"]["host"] == host
        metrics = _waypoint_metrics(cluster)
        assert any(
            line.startswith("istio_requests_total{")
            and f'destination_service="{host}"' in line
            and 'response_code="200"' in line
            for line in metrics.splitlines()
        ), "the egress request is not in the waypoint's istio_requests_total"  # observed


def test_a_waypoint_for_workloads_has_calls_to_pod_ips_go_through_it(
    cluster: Playground,
) -> None:
    [pod] = cluster.call(
        lambda api: api.list(resources.PODS, NS, label_selector="version=premium")
    ).items
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    url = f"http://{ip}:{l7.PORT}/by-ip"

    def answer() -> dict[str, Any]:
        [result] = l7.request(cluster, NS, "frontend", url)
        assert result["status"] == 200, result
        return dict(result["body"])

    # The namespace's waypoint is for its services (the default): a call to a pod IP goes
    # direct (no pod binds to a waypoint for services).
    assert "traceparent" not in answer()["headers"]

    def waypoint_for(value: str) -> None:
        patch = {"metadata": {"labels": {"istio.io/waypoint-for": value}}}
        cluster.call(lambda api: api.patch(resources.GATEWAYS, "waypoint", NS, patch))

    waypoint_for("all")
    try:
        _until("the pod's calls through the waypoint", lambda: "traceparent" in answer()["headers"])
        assert answer()["pod"] == name  # on to that very pod
        metrics = _waypoint_metrics(cluster)
        assert any(
            line.startswith("istio_requests_total{") and f'destination_service="{ip}"' in line
            for line in metrics.splitlines()
        )
    finally:
        waypoint_for("service")
    _until("the pod's calls direct again", lambda: "traceparent" not in answer()["headers"])


# A namespace labelled with a waypoint that does not exist: its calls must be refused.
GATED = "gated"
USE_WAYPOINT = "istio.io/use-waypoint"
# Answers "ok" to every connection.
OK_SERVER = """\
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"ok")
    c.close()
"""
# Prints "ok" when the server answered, else "refused".
TCP_CLIENT = """\
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    data = s.recv(2)
except OSError:
    data = b""
print("ok" if data == b"ok" else "refused")
"""


def _tcp_call(cluster: Playground, host: str, port: int) -> str:
    argv = [sys.executable, "-c", TCP_CLIENT, host, str(port)]
    done = cluster.exec(GATED, "client", argv, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _until_tcp(cluster: Playground, host: str, port: int, outcome: str, what: str) -> None:
    mh.wait_until(lambda: _tcp_call(cluster, host, port) == outcome, timeout=30, what=what)


def test_a_missing_waypoint_refuses_instead_of_going_direct(cluster: Playground) -> None:
    sink = mh.python_pod("sink", GATED, OK_SERVER, sa="sink", port=8080)
    client = mh.sleeper_pod("client", GATED, sa="client")
    client["spec"]["nodeName"] = "node1"  # its ztunnel's access log is node1's
    cluster.apply(
        mh.manifest(
            mh.namespace(GATED, ambient=True), sink, mh.service("sink", GATED, 80, 8080), client
        )
    )
    for pod in ("sink", "client"):
        cluster.wait_pod_ready(GATED, pod)
        mh.wait_captured(cluster, GATED, pod)
    sink_ip = cluster.pod_ip(GATED, "sink")
    _until_tcp(cluster, f"sink.{GATED}", 80, "ok", "the service to answer through the mesh")

    cluster.label_namespace(GATED, {USE_WAYPOINT: "waypoint"})
    _until_tcp(cluster, f"sink.{GATED}", 80, "refused", "the service call to be refused")
    refused = [
        r
        for r in mh.access_log(cluster)
        if r["direction"] == "outbound" and r["src.namespace"] == GATED and r["error"]
    ]
    waypoint = f"waypoint {GATED}/waypoint (waypoint.{GATED}.svc.cluster.local) is unknown"
    assert waypoint in refused[-1]["error"]
    assert f"service sink.{GATED}.svc.cluster.local must go through it" in refused[-1]["error"]
    # Without its Gateway, what the waypoint is for is unknown: calls to the pod IP are
    # refused alike, never sent around it.
    _until_tcp(cluster, sink_ip, 8080, "refused", "the pod IP call to be refused")

    # `none` on the Service, or on the pod, opts it out of the namespace's waypoint.
    patch = {"metadata": {"labels": {USE_WAYPOINT: "none"}}}
    cluster.call(lambda api: api.patch(resources.SERVICES, "sink", GATED, patch))
    _until_tcp(cluster, f"sink.{GATED}", 80, "ok", "the opted-out service to answer again")
    cluster.call(lambda api: api.patch(resources.PODS, "sink", GATED, patch))
    _until_tcp(cluster, sink_ip, 8080, "ok", "the opted-out pod to answer again")

    # The pod's own label names the missing waypoint: refused again.
    pod_patch = {"metadata": {"labels": {USE_WAYPOINT: "waypoint"}}}
    cluster.call(lambda api: api.patch(resources.PODS, "sink", GATED, pod_patch))
    _until_tcp(cluster, sink_ip, 8080, "refused", "the pod IP call to be refused again")
    unlabel: dict[str, Any] = {"metadata": {"labels": {USE_WAYPOINT: None}}}
    cluster.call(lambda api: api.patch(resources.PODS, "sink", GATED, unlabel))
    cluster.label_namespace(GATED, {USE_WAYPOINT: None})
    _until_tcp(cluster, sink_ip, 8080, "ok", "the pod to answer once no label names it")
