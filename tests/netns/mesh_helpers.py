"""Helpers for end-to-end mesh tests on a playground: pod manifests, packet captures, reading
ztunnel's access log, metrics and config dump."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import yaml

from meshcore.kube import resources
from meshctl.playground import sandbox
from tests.netns.playground_fixtures import Playground

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def namespace(name: str, *, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def python_pod(
    name: str,
    ns: str,
    script: str,
    *,
    sa: str | None = None,
    port: int | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod whose container runs a Python script (the playground runs commands, not images)."""
    container: dict[str, Any] = {"name": "app", "command": [sys.executable, "-c", script]}
    if port is not None:
        container["ports"] = [{"name": "tcp", "containerPort": port}]
    spec: dict[str, Any] = {"containers": [container]}
    if sa:
        spec["serviceAccountName"] = sa
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": spec,
    }


def sleeper_pod(name: str, ns: str, *, sa: str | None = None) -> dict[str, Any]:
    pod = python_pod(name, ns, "import time\nwhile True: time.sleep(3600)", sa=sa)
    return pod


def service(name: str, ns: str, port: int, target: int | str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target}]},
    }


def manifest(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def pod_netns(cluster: Playground, ns: str, name: str) -> str:
    pod = cluster.get(resources.PODS, name, ns)
    return sandbox.netns_name(cluster.prefix, pod["metadata"]["uid"])


def in_pod_netns(
    cluster: Playground, ns: str, name: str, argv: list[str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a host tool (iptables-save, tcpdump...) inside a pod's network namespace only."""
    return subprocess.run(
        ["ip", "netns", "exec", pod_netns(cluster, ns, name), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def is_captured(cluster: Playground, ns: str, name: str) -> bool:
    """The in-pod redirection rules are installed (what the node agent programs)."""
    saved = in_pod_netns(cluster, ns, name, ["iptables-save"])
    return "ISTIO_OUTPUT" in saved.stdout


def redirection_annotation(cluster: Playground, ns: str, name: str) -> str | None:
    pod = cluster.get(resources.PODS, name, ns)
    value = (pod["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection")
    return str(value) if value is not None else None


def access_log(cluster: Playground, node: str = "node1") -> list[dict[str, Any]]:
    """ztunnel's access-log records (JSON lines with scope "access")."""
    records = []
    for line in cluster.logs("ztunnel", node).splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("scope") == "access":
                records.append(entry)
    return records


def node_http(cluster: Playground, url: str, node: str = "node1") -> str:
    """GET `url` from inside a node's namespace (admin and metrics endpoints live there)."""
    done = cluster.in_node(node, ["curl", "-sf", "--max-time", "5", url])
    if done.returncode != 0:
        raise AssertionError(f"GET {url} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def config_dump(cluster: Playground, node: str = "node1") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        node_http(cluster, "http://127.0.0.1:15000/config_dump", node)
    )
    return data


def ztunnel_pod_uids(cluster: Playground, node: str = "node1") -> set[str]:
    return {w["uid"] for w in config_dump(cluster, node).get("workloadState", [])}


@contextlib.contextmanager
def capture(netns_name: str, path: str, snaplen: int = 256) -> Iterator[None]:
    """tcpdump of TCP on eth0 inside `netns_name`, written to `path`, for the body's duration."""
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns_name,
            "tcpdump",
            # Without it libpcap hands packets over in timed blocks, and a capture stopped
            # right after the traffic loses the last block.
            "--immediate-mode",
            "-i",
            "eth0",
            "-nn",
            "-U",
            "-s",
            str(snaplen),
            "-w",
            path,
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        # tcpdump says "listening on eth0" once the capture is live.
        line = proc.stderr.readline()
        if "listening on" not in line:
            raise AssertionError(f"tcpdump did not start: {line}{proc.stderr.read()}")
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_capture(path: str) -> list[str]:
    """One line per packet: `IP a.b.c.d.port > e.f.g.h.port: ...`."""
    done = subprocess.run(
        ["tcpdump", "-nn", "-r", path], capture_output=True, text=True, check=True
    )
    return [line for line in done.stdout.splitlines() if " IP " in line]


def packet_ports(line: str) -> tuple[int, int]:
    # "12:00:00.000000 IP 10.244.1.3.40000 > 10.244.1.4.15008: Flags [S], ..."
    parts = line.split(" IP ", 1)[1].split()
    src, dst = parts[0], parts[2].rstrip(":")
    return int(src.rsplit(".", 1)[1]), int(dst.rsplit(".", 1)[1])


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def wait_captured(cluster: Playground, ns: str, pod: str, timeout: float = 30.0) -> None:
    wait_until(
        lambda: redirection_annotation(cluster, ns, pod) == "enabled",
        timeout,
        what=f"pod {ns}/{pod} to be captured",
    )


def wait_released(cluster: Playground, ns: str, pod: str, timeout: float = 30.0) -> None:
    wait_until(
        lambda: redirection_annotation(cluster, ns, pod) is None,
        timeout,
        what=f"pod {ns}/{pod} to be released",
    )
