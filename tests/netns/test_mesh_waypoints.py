"""`istio.io/use-waypoint` end to end on a playground.

The label reaches ztunnel through the controller and xDS; from then on ztunnel sends the
labelled traffic over HBONE to a pod of the waypoint's Service, with the address the app dialled
as the authority, and the waypoint carries it on to the destination. With no waypoint to send it
to, ztunnel refuses the connection and names the waypoint in its access log: it never falls back
to going direct, which would skip the L7 policy the waypoint is there to enforce. `none` on the
Service opts it back out. A namespace's waypoint serves its service addresses; a pod's own label
sends calls to its IP through one too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from meshcore.kube import resources
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

NS = "gated"
USE = "istio.io/use-waypoint"
SERVER = """\
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
HTTP_SERVER = """\
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from sink"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""
HTTP_CLIENT = """\
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""
CLIENT = """\
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    data = s.recv(2)
except OSError:
    data = b""
print("ok" if data == b"ok" else "refused")
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground()) as pg:
        yield pg


def _call(cluster: Playground, host: str, port: int) -> str:
    done = cluster.exec(NS, "client", [sys.executable, "-c", CLIENT, host, str(port)], timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _until(cluster: Playground, host: str, port: int, outcome: str, what: str) -> None:
    mh.wait_until(lambda: _call(cluster, host, port) == outcome, timeout=30, what=what)


def test_a_missing_waypoint_refuses_instead_of_going_direct(cluster: Playground) -> None:
    cluster.apply(
        mh.manifest(
            mh.namespace(NS, ambient=True),
            mh.python_pod("sink", NS, SERVER, sa="sink", port=8080),
            mh.service("sink", NS, 80, 8080),
            mh.sleeper_pod("client", NS, sa="client"),
        )
    )
    for pod in ("sink", "client"):
        cluster.wait_pod_ready(NS, pod)
        mh.wait_captured(cluster, NS, pod)
    sink_ip = cluster.pod_ip(NS, "sink")
    _until(cluster, f"sink.{NS}", 80, "ok", "the service to answer through the mesh")

    cluster.label_namespace(NS, {USE: "waypoint"})
    _until(cluster, f"sink.{NS}", 80, "refused", "the service call to be refused")
    refused = [
        r
        for r in mh.access_log(cluster)
        if r["direction"] == "outbound" and r["src.namespace"] == NS and r["error"]
    ]
    waypoint = f"waypoint {NS}/waypoint (waypoint.{NS}.svc.cluster.local) is unknown"
    assert waypoint in refused[-1]["error"]
    assert f"service sink.{NS}.svc.cluster.local must go through it" in refused[-1]["error"]
    # A namespace's waypoint is for its services' addresses: the pod IP is still served.
    assert _call(cluster, sink_ip, 8080) == "ok"
    # The pod's own label sends calls to its IP through a waypoint too: refused alike.
    pod_patch = {"metadata": {"labels": {USE: "waypoint"}}}
    cluster.call(lambda api: api.patch(resources.PODS, "sink", NS, pod_patch))
    _until(cluster, sink_ip, 8080, "refused", "the pod IP call to be refused")

    # `none` on the Service opts it out of the namespace's waypoint.
    patch = {"metadata": {"labels": {USE: "none"}}}
    cluster.call(lambda api: api.patch(resources.SERVICES, "sink", NS, patch))
    _until(cluster, f"sink.{NS}", 80, "ok", "the opted-out service to answer again")

    unlabel: dict[str, Any] = {"metadata": {"labels": {USE: None}}}
    cluster.call(lambda api: api.patch(resources.PODS, "sink", NS, unlabel))
    _until(cluster, sink_ip, 8080, "ok", "the pod to answer once its label is gone")


def _waypoint_gateway(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": ns},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def _ready_waypoint_pod(cluster: Playground, ns: str) -> dict[str, Any] | None:
    selector = "gateway.networking.k8s.io/gateway-name=waypoint"
    pods = cluster.call(lambda api: api.list(resources.PODS, ns, label_selector=selector))
    for pod in pods.items:
        conditions = (pod.get("status") or {}).get("conditions") or ()
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return pod
    return None


def test_service_traffic_goes_through_the_namespaces_waypoint(cluster: Playground) -> None:
    ns = "through"
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            mh.python_pod("sink", ns, HTTP_SERVER, sa="sink", port=8080),
            mh.service("sink", ns, 80, 8080),
            mh.sleeper_pod("client", ns, sa="client"),
            _waypoint_gateway(ns),
        )
    )
    for pod in ("sink", "client"):
        cluster.wait_pod_ready(ns, pod)
        mh.wait_captured(cluster, ns, pod)
    waypoint = mh.wait_until(
        lambda: _ready_waypoint_pod(cluster, ns), timeout=60, what="the waypoint pod"
    )
    waypoint_name = waypoint["metadata"]["name"]
    vip = cluster.get(resources.SERVICES, "sink", ns)["spec"]["clusterIP"]

    cluster.label_namespace(ns, {USE: "waypoint"})

    def through_waypoint() -> list[dict[str, Any]]:
        done = cluster.exec(ns, "client", [sys.executable, "-c", HTTP_CLIENT, f"http://sink.{ns}/"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello from sink"
        return [
            r
            for r in mh.access_log(cluster)
            if r["direction"] == "outbound"
            and r["src.workload"] == "client"
            and r["dst.workload"] == waypoint_name
        ]

    [outbound, *_] = mh.wait_until(through_waypoint, what="a call through the waypoint")
    # The client's ztunnel dialled the waypoint pod, asking for the service as the app did.
    assert outbound["dst.hbone_addr"] == f"{vip}:80"
    assert outbound["dst.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/waypoint"
    assert outbound["error"] is None
    # The sink's ztunnel saw the waypoint as its client: L4 policy there applies to it.
    assert any(
        r["direction"] == "inbound"
        and r["dst.workload"] == "sink"
        and r["src.workload"] == waypoint_name
        and r["error"] is None
        for r in mh.access_log(cluster)
    )
