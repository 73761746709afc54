"""A full node on a real playground (one node, ``max_pods`` 2): the scheduler leaves a third pod
Pending with kube-scheduler's reason, the kubelet fails a pod named onto the full node with
OutOfpods before making anything for it, and a deleted pod's slot goes to the waiting one."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshcore.kube import resources
from meshctl.playground import sandbox
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

NS = "cap"
FULL = "0/1 nodes are available: 1 Too many pods."
REJECTED = (
    "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2"
)


@pytest.fixture
def cluster() -> Iterator[Playground]:
    with started(Playground().max_pods(2)) as pg:
        yield pg


def _get(cluster: Playground, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cluster.get(resources.PODS, name, NS)
    return pod


def _pod_when(
    cluster: Playground, name: str, check: Callable[[dict[str, Any]], bool]
) -> Callable[[], dict[str, Any] | None]:
    """For `mh.wait_until`: the pod once `check` holds for it."""

    def probe() -> dict[str, Any] | None:
        pod = _get(cluster, name)
        return pod if check(pod) else None

    return probe


def _scheduled_condition(pod: dict[str, Any]) -> dict[str, Any] | None:
    for c in pod.get("status", {}).get("conditions", []):
        if c.get("type") == "PodScheduled":
            return dict(c)
    return None


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _traces_of(cluster: Playground, uid: str) -> list[str]:
    """Whatever the pod runtime keeps for pod `uid` on node1: its pod directory, and any CNI
    state (cached ADD results, host-local address leases) that names it."""
    node_dir = cluster.paths.node_dir("node1")
    found = []
    if os.path.exists(os.path.join(node_dir, "pods", uid)):
        found.append(os.path.join(node_dir, "pods", uid))
    for root, _, files in os.walk(os.path.join(node_dir, "cni")):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if uid in name or uid in text:
                found.append(path)
    return found


def _meshctl(cluster: Playground, *args: str) -> str:
    done = cluster.meshctl(*args, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_full_node_refuses_pods_clearly_and_frees_slots(cluster: Playground) -> None:
    node = cluster.get(resources.NODES, "node1")
    assert node["status"]["capacity"]["pods"] == node["status"]["allocatable"]["pods"] == "2"

    cluster.apply(
        mh.manifest(
            mh.namespace(NS, ambient=False),
            mh.sleeper_pod("first", NS),
            mh.sleeper_pod("second", NS),
        )
    )
    cluster.wait_pod_ready(NS, "first")
    cluster.wait_pod_ready(NS, "second")

    # A third pod: the scheduler has no room for it and says so in its PodScheduled condition.
    cluster.apply(mh.manifest(mh.sleeper_pod("third", NS)))
    third = mh.wait_until(
        _pod_when(cluster, "third", lambda p: _scheduled_condition(p) is not None),
        what="third's PodScheduled condition",
    )
    condition = _scheduled_condition(third)
    assert condition is not None
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "False",
        "Unschedulable",
        FULL,
    )
    assert third["status"]["phase"] == "Pending"
    assert not third["spec"].get("nodeName")

    # A pod that names the full node itself bypasses the scheduler; its kubelet refuses it.
    direct = mh.sleeper_pod("direct", NS)
    direct["spec"]["nodeName"] = "node1"
    cluster.apply(mh.manifest(direct))
    rejected = mh.wait_until(
        _pod_when(cluster, "direct", lambda p: p["status"].get("phase") == "Failed"),
        what="the kubelet to reject the pod named onto the full node",
    )
    status = rejected["status"]
    assert (status["reason"], status["message"]) == ("OutOfpods", REJECTED)
    assert not status.get("podIP")
    assert not status.get("containerStatuses")
    uid = rejected["metadata"]["uid"]
    # Nothing was made for it: no network namespace, no pod directory, no CNI state.
    assert sandbox.netns_name(cluster.prefix, uid) not in _netns_names()
    assert _traces_of(cluster, uid) == []
    # The tables show both reasons (STATUS column and `-o yaml`).
    table = {
        line.split()[0]: line for line in _meshctl(cluster, "get", "pods", "-n", NS).splitlines()
    }
    assert "OutOfpods" in table["direct"]
    assert REJECTED in table["direct"]
    assert "Pending" in table["third"]
    assert "Too many pods" in _meshctl(cluster, "get", "pod", "third", "-n", NS, "-o", "yaml")

    # Deleting a running pod frees its slot: the waiting pod is bound and runs.
    cluster.call(lambda api: api.delete(resources.PODS, "first", NS))
    cluster.wait_pod_ready(NS, "third")
    third = _get(cluster, "third")
    assert third["spec"]["nodeName"] == "node1"
    assert sandbox.netns_name(cluster.prefix, third["metadata"]["uid"]) in _netns_names()
    mh.wait_until(
        lambda: _pod_gone(cluster, "first"), what="the deleted pod to be gone from the API"
    )

    # The rejected pod stays failed and is never started, even with a slot free... until it
    # is deleted, which takes no kubelet work at all.
    still = _get(cluster, "direct")
    assert still["status"]["phase"] == "Failed"
    assert sandbox.netns_name(cluster.prefix, uid) not in _netns_names()
    assert _traces_of(cluster, uid) == []
    cluster.call(lambda api: api.delete(resources.PODS, "direct", NS))
    assert _pod_gone(cluster, "direct")
    lines = cluster.logs("kubelet").splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert {
        "message": "pod rejected",
        "pod": f"{NS}/direct",
        "reason": "OutOfpods",
        "detail": REJECTED,
    }.items() <= next(r for r in records if r.get("message") == "pod rejected").items()


def _pod_gone(cluster: Playground, name: str) -> bool:
    names = cluster.call(lambda api: api.list(resources.PODS, NS))
    return name not in {p["metadata"]["name"] for p in names.items}
