"""`istio.io/use-waypoint` end to end on a playground, when the named waypoint does not exist.

The label reaches ztunnel through the controller and xDS; from then on ztunnel must send the
labelled traffic to the waypoint, and with no waypoint to send it to it refuses the connection
and names the waypoint in its access log. It never falls back to going direct, which would skip
the L7 policy the waypoint is there to enforce. `none` on the Service opts it back out.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from meshcore.kube import resources
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground

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
    pg = Playground()
    try:
        pg.start()
        yield pg
    finally:
        report = pg.stop()
        assert report.is_clean, f"playground teardown left things behind: {report.leftovers}"


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
    # The namespace label names the pods' waypoint too: dialling the pod IP is refused alike.
    assert _call(cluster, sink_ip, 8080) == "refused"

    # `none` on the Service opts it out of the namespace's waypoint; its pod keeps it.
    patch = {"metadata": {"labels": {USE: "none"}}}
    cluster.call(lambda api: api.patch(resources.SERVICES, "sink", NS, patch))
    _until(cluster, f"sink.{NS}", 80, "ok", "the opted-out service to answer again")
    assert _call(cluster, sink_ip, 8080) == "refused"

    cluster.label_namespace(NS, {USE: None})
    _until(cluster, sink_ip, 8080, "ok", "the pod to answer once the namespace label is gone")
