"""The application tunnel end to end: the demo app names its caller's SPIFFE identity.

A pod annotated ``ambient.istio.io/application-tunnel: PROXY/15088`` runs
``mesh-demo-app serve --service x --port 8080 --proxy-port 15088``. Through the mesh, the
server's ztunnel connects to 15088 and writes a PROXY v2 header first, so the app's answer names
the client's SPIFFE ID and real pod IP. Without the mesh (or from a client outside it, through
the plaintext inbound port) the request reaches 8080 as before and ``caller_identity`` is null.

One playground serves the module; each test uses its own Kubernetes namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

TUNNEL_ANNOTATION = "ambient.istio.io/application-tunnel"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground()) as pg:
        yield pg


def _app_pod(ns: str) -> dict[str, Any]:
    """What the lead is asked to add to the demo's pod template, on a pod named x."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "x",
            "namespace": ns,
            "labels": {"app": "x"},
            "annotations": {TUNNEL_ANNOTATION: "PROXY/15088"},
        },
        "spec": {
            "serviceAccountName": "x",
            "containers": [
                {
                    "name": "app",
                    "command": [
                        "mesh-demo-app",
                        "serve",
                        "--service",
                        "x",
                        "--port",
                        "8080",
                        "--proxy-port",
                        "15088",
                    ],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        }
                    ],
                }
            ],
        },
    }


def _deploy(cluster: Playground, ns: str, *, ambient: bool) -> None:
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=ambient),
            _app_pod(ns),
            mh.service("x", ns, 80, "http"),
            mh.sleeper_pod("client", ns, sa="client"),
        )
    )
    for pod in ("x", "client"):
        cluster.wait_pod_ready(ns, pod)
        if ambient:
            mh.wait_captured(cluster, ns, pod)


def _call(cluster: Playground, ns: str, url: str) -> dict[str, Any] | None:
    """The app's JSON answer to the client pod's GET, or None if it failed (not up yet)."""
    done = cluster.exec(ns, "client", ["mesh-demo-app", "get", "--timeout", "5", url])
    if done.returncode != 0:
        return None
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _wait_answer(cluster: Playground, ns: str, url: str) -> dict[str, Any]:
    # The app binds its ports some moments after its pod is Ready (there is no probe).
    return mh.wait_until(
        lambda: _call(cluster, ns, url), timeout=60, what=f"an answer from {url} in {ns}"
    )


def _ztunnel_knows_the_tunnel(cluster: Playground, ns: str) -> bool:
    """The node's ztunnel has x's record with HBONE and the application tunnel: before that,
    a client's ztunnel would still send plain TCP (x is not known to be in the mesh yet)."""
    for wl in mh.config_dump(cluster).get("workloads", []):
        if wl.get("namespace") == ns and wl.get("name") == "x":
            return bool(
                wl.get("tunnelProtocol") == "HBONE"
                and wl.get("applicationTunnel") == {"protocol": "PROXY", "port": 15088}
            )
    return False


def test_through_the_mesh_the_app_sees_the_callers_identity(cluster: Playground) -> None:
    ns = "tunnel"
    _deploy(cluster, ns, ambient=True)
    mh.wait_until(
        lambda: _ztunnel_knows_the_tunnel(cluster, ns),
        what="ztunnel to learn x's application tunnel",
    )

    answer = _wait_answer(cluster, ns, f"http://x.{ns}/")
    assert answer["caller_identity"] == f"spiffe://cluster.local/ns/{ns}/sa/client"
    # The client's real pod IP, from the header (the app's TCP peer is ztunnel's connection).
    assert answer["caller"].split(":")[0] == cluster.pod_ip(ns, "client")
    assert answer["pod"] == "x"
    assert answer["service"] == "x"

    # The server side's ztunnel recorded the tunnel it carried to the app.
    inbound = mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster)
            if r["direction"] == "inbound"
            and r["dst.workload"] == "x"
            and r["src.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/client"
            and r["error"] is None
        ],
        what="the inbound access-log record",
    )
    assert inbound[-1]["dst.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/x"

    # A client outside the mesh reaches the same app through ztunnel's plaintext inbound
    # port, which never uses the tunnel: port 8080, no header, no identity.
    outside = f"{ns}-outside"
    cluster.apply(
        mh.manifest(
            mh.namespace(outside, ambient=False), mh.sleeper_pod("client", outside, sa="client")
        )
    )
    cluster.wait_pod_ready(outside, "client")
    plain = _wait_answer(cluster, outside, f"http://x.{ns}/")
    assert plain["caller_identity"] is None
    assert plain["caller"].split(":")[0] == cluster.pod_ip(outside, "client")


def test_without_the_mesh_caller_identity_is_null(cluster: Playground) -> None:
    ns = "no-tunnel"
    _deploy(cluster, ns, ambient=False)
    assert not mh.is_captured(cluster, ns, "x")

    answer = _wait_answer(cluster, ns, f"http://x.{ns}/")
    assert answer["caller_identity"] is None
    assert answer["caller"].split(":")[0] == cluster.pod_ip(ns, "client")
    assert answer["pod"] == "x"
