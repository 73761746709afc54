"""The mesh across a 3-node playground: load balancing over remote endpoints, HBONE between the
nodes' ztunnels, pooled connections, scaling, and a ztunnel restart that nobody else notices.

Node roles: node1 runs the clients; node2 and node3 carry the label `tier=backend` and run the
servers, so every call below crosses the routed fabric between node namespaces.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshcore.kube import client as kube_client
from meshcore.kube import resources
from meshctl.playground import procs, record
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

BACKEND = {"tier": "backend"}
CANARY = "MESH-MULTINODE-PLAINTEXT-CANARY"

# Answers every connection with its pod name; logs each request and SIGTERM with a timestamp.
WHOAMI = textwrap.dedent(
    """
    import os, signal, socket, sys, threading, time
    POD = os.environ["POD_NAME"]
    EVENTS = os.environ.get("EVENTS_DIR")
    def log(*parts):
        # Outside the pod directory, which the kubelet removes with the pod.
        if EVENTS:
            with open(os.path.join(EVENTS, POD), "a") as f:
                print(time.time(), *parts, file=f, flush=True)
    def on_term(signum, frame):
        log("SIGTERM")
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
    def serve(conn, peer):
        try:
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            log("request", peer[0])
            conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\n" + POD.encode())
        except OSError:
            pass
        finally:
            conn.close()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(256)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
    """
)

# Run in a client pod: N sequential HTTP calls, each on a new connection; prints who answered.
CALLER = textwrap.dedent(
    """
    import collections, json, socket, sys
    host, port, count, canary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    seen, failures = collections.Counter(), []
    for i in range(count):
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(f"GET /{canary} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            if not head.startswith(b"HTTP/1.0 200"):
                raise OSError(f"bad answer {data[:80]!r}")
            seen[body.decode()] += 1
        except OSError as exc:
            failures.append(f"{i}: {exc}")
    print(json.dumps({"seen": seen, "failures": failures}))
    """
)

# Run in a client pod: hold N connections open at once, each proven to reach the echo server,
# then wait for a line on stdin before closing them all.
HOLDER = textwrap.dedent(
    """
    import socket, sys, concurrent.futures
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def open_one(i):
        s = socket.create_connection((host, port), timeout=20)
        s.sendall(b"ping%d\\n" % i)
        got = b""
        while not got.endswith(b"\\n"):
            chunk = s.recv(64)
            if not chunk:
                raise OSError("closed before the echo")
            got += chunk
        assert got == b"ping%d\\n" % i, got
        return s
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        socks = list(pool.map(open_one, range(count)))
    print("ready", len(socks), flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    """
)

ECHO = textwrap.dedent(
    """
    import socket, threading
    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7000))
    srv.listen(512)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground().nodes(3)) as pg:
        patch = {"metadata": {"labels": BACKEND}}
        for node in ("node2", "node3"):

            async def label(api: kube_client.ApiClient, node: str = node) -> Any:
                return await api.patch(resources.NODES, node, None, patch)

            pg.call(label)
        yield pg


def _pod_env() -> list[dict[str, Any]]:
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]


def _deployment(
    name: str, ns: str, replicas: int, script: str, port: int, **pod_spec: Any
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app",
        "command": [sys.executable, "-c", script],
        "ports": [{"name": "http", "containerPort": port}],
        "env": _pod_env(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "serviceAccountName": name,
                    "nodeSelector": BACKEND,
                    "containers": [container],
                    **pod_spec,
                },
            },
        },
    }


def _client(ns: str, node: str = "node1") -> dict[str, Any]:
    pod = mh.sleeper_pod("client", ns, sa="client")
    pod["spec"]["nodeName"] = node
    return pod


def _pods_of(cluster: Playground, ns: str, app: str) -> list[dict[str, Any]]:
    listed = cluster.call(lambda api: api.list(resources.PODS, ns, label_selector=f"app={app}"))
    return [p for p in listed.items if not p["metadata"].get("deletionTimestamp")]


def _ready_pods(cluster: Playground, ns: str, app: str, count: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = _pods_of(cluster, ns, app)
        ok = [
            p
            for p in pods
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or ()
            )
        ]
        return ok if len(ok) == count and len(pods) == count else None

    return mh.wait_until(ready, 90, what=f"{count} ready pods of {ns}/{app}")


def _call(cluster: Playground, ns: str, host: str, port: int, count: int) -> dict[str, Any]:
    done = cluster.exec(
        ns,
        "client",
        [sys.executable, "-c", CALLER, host, str(port), str(count), CANARY],
        timeout=180,
    )
    assert done.returncode == 0, f"caller failed: {done.stderr}\n{cluster.logs('ztunnel')[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _known_everywhere(cluster: Playground, ip: str, *, healthy: bool) -> bool:
    """Every node's ztunnel has the workload with this IP in the given health."""
    for node in ("node1", "node2", "node3"):
        found = [
            w
            for w in mh.config_dump(cluster, node).get("workloads", [])
            if ip in w.get("addresses", ())
        ]
        if healthy and not (found and all(w.get("status") == "HEALTHY" for w in found)):
            return False
        if not healthy and any(w.get("status") == "HEALTHY" for w in found):
            return False
    return True


def test_calls_spread_over_every_remote_endpoint_and_nodes_speak_only_tls(
    cluster: Playground,
) -> None:
    ns = "spread"
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _deployment("echo", ns, 4, WHOAMI, 8080),
            mh.service("echo", ns, 80, "http"),
            _client(ns),
        )
    )
    pods = _ready_pods(cluster, ns, "echo", 4)
    nodes = collections.Counter(p["spec"]["nodeName"] for p in pods)
    assert set(nodes) == {"node2", "node3"}, nodes  # spread by the scheduler, off the client's node
    cluster.wait_pod_ready(ns, "client")
    for pod in [*(p["metadata"]["name"] for p in pods), "client"]:
        mh.wait_captured(cluster, ns, pod)
    for pod in pods:
        ip = pod["status"]["podIP"]
        mh.wait_until(
            functools.partial(_known_everywhere, cluster, ip, healthy=True),
            what=f"every ztunnel to know the endpoint {ip}",
        )
    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "fabric.pcap")
        with mh.capture(cluster.node_netns("node1"), pcap, snaplen=2048):
            result = _call(cluster, ns, "echo.spread", 80, 400)
        packets = mh.read_capture(pcap)
        raw = mh.file_bytes(pcap)
    assert result["failures"] == []
    assert sorted(result["seen"]) == sorted(p["metadata"]["name"] for p in pods)
    assert sum(result["seen"].values()) == 400
    # node1's fabric link carried the calls, and only as TLS to or from port 15008.
    pod_packets = [p for p in packets if "10.244." in p]
    assert len(pod_packets) > 400
    assert all(15008 in mh.packet_ports(p) for p in pod_packets)
    assert CANARY.encode() not in raw


def test_concurrent_connections_share_pooled_tls_connections(cluster: Playground) -> None:
    """50 at once to one remote pod: one TLS connection (no storm); 150: more than one (100
    streams per connection). Counted on the server side, in the destination pod's namespace."""
    ns = "pool"
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _deployment("echo", ns, 1, ECHO, 7000),
            _client(ns),
        )
    )
    (server,) = _ready_pods(cluster, ns, "echo", 1)
    cluster.wait_pod_ready(ns, "client")
    mh.wait_captured(cluster, ns, "client")
    mh.wait_captured(cluster, ns, server["metadata"]["name"])
    server_ip = server["status"]["podIP"]
    server_netns = mh.pod_netns(cluster, ns, server["metadata"]["name"])

    def tls_connections() -> int:
        done = subprocess.run(
            ["ip", "netns", "exec", server_netns, "ss", "-Htn", "state", "established",
             "( sport = :15008 )"],
            capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        return len(done.stdout.splitlines())

    checks: list[tuple[int, Callable[[int], bool]]] = [
        (50, lambda n: n == 1),
        (150, lambda n: n >= 2),
    ]
    for count, check in checks:
        holder = _start_holder(cluster, ns, server_ip, count)
        try:
            line = holder.stdout.readline() if holder.stdout else ""
            assert line.split() == ["ready", str(count)], (
                holder.stderr.read() if holder.stderr else ""
            )
            held = tls_connections()
        finally:
            _finish_holder(holder)
        assert check(held), f"{count} concurrent connections used {held} TLS connection(s)"
        # The pool drops a connection once it is idle (test ztunnels use the default 300 s, so
        # this only checks nothing was left half-open on the server side).
        assert tls_connections() <= held


def _start_holder(cluster: Playground, ns: str, ip: str, count: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "meshctl", "--state-dir", cluster.state_dir, "exec", "-n", ns]
    cmd += ["client", "--", sys.executable, "-c", HOLDER, ip, "7000", str(count)]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish_holder(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.stdin:
            proc.stdin.write("done\n")
            proc.stdin.close()
        proc.wait(30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def test_restarted_ztunnel_recovers_and_other_nodes_never_notice(cluster: Playground) -> None:
    ns = "restart"
    servers = []
    for name, node in (("echo-a", "node2"), ("echo-b", "node3")):
        server = mh.python_pod(name, ns, ECHO, sa="echo", port=7000, labels={"app": "echo"})
        server["spec"]["nodeName"] = node
        servers.append(server)
    cluster.apply(mh.manifest(mh.namespace(ns, ambient=True), *servers, _client(ns)))
    for name in ("echo-a", "echo-b", "client"):
        cluster.wait_pod_ready(ns, name)
        mh.wait_captured(cluster, ns, name)
    by_node = {
        node: cluster.get(resources.PODS, name, ns)
        for name, node in (("echo-a", "node2"), ("echo-b", "node3"))
    }
    victim, survivor = by_node["node2"], by_node["node3"]

    def ztunnel(node: str) -> record.ProcessRecord:
        (found,) = [p for p in cluster.record.processes if p.name == "ztunnel" and p.node == node]
        return found

    others = {n: (ztunnel(n).pid, ztunnel(n).restarts) for n in ("node1", "node3")}
    old = ztunnel("node2")
    # A long-lived connection between node1 and node3 runs through the whole restart.
    holder = _start_holder(cluster, ns, survivor["status"]["podIP"], 1)
    try:
        line = holder.stdout.readline() if holder.stdout else ""
        assert line.split() == ["ready", "1"]
        os.kill(old.pid, signal.SIGKILL)  # our own child's child: started by this playground
        mh.wait_until(
            lambda: ztunnel("node2").pid != old.pid and procs.is_record_alive(ztunnel("node2")),
            60,
            what="the supervisor to restart node2's ztunnel",
        )
        # Its pods come back over ZDS, its workloads over xDS; then it serves again.
        try:
            mh.wait_until(
                lambda: victim["metadata"]["uid"] in _pod_uids_once_up(cluster, "node2"),
                60,
                what="node2's ztunnel to get its pod back",
            )
        except AssertionError as exc:
            # Once seen in a full run and never reproduced: keep what would explain it.
            raise AssertionError(f"{exc}{cluster.log_tails('node2', 'ztunnel', 'agent')}") from None
        result = mh.wait_until(
            lambda: (r := _echo_once(cluster, ns, victim["status"]["podIP"])) == "ok" and r,
            60,
            what="a call to the pod on node2 to succeed again",
        )
        assert result == "ok"
        assert _echo_once(cluster, ns, survivor["status"]["podIP"]) == "ok"
    finally:
        _finish_holder(holder)
    # The held connection survived: the holder closed cleanly after its line on stdin.
    assert holder.returncode == 0, holder.stderr.read() if holder.stderr else ""
    assert {n: (ztunnel(n).pid, ztunnel(n).restarts) for n in ("node1", "node3")} == others


def _pod_uids_once_up(cluster: Playground, node: str) -> set[str]:
    """The pods a ztunnel serves; none while its admin endpoint is still starting."""
    try:
        return mh.ztunnel_pod_uids(cluster, node)
    except AssertionError:
        return set()


def _echo_once(cluster: Playground, ns: str, ip: str) -> str:
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r}, 7000), timeout=5)\n"
        "s.sendall(b'hello\\n')\n"
        "got=b''\n"
        "while not got.endswith(b'\\n'):\n"
        "    c=s.recv(64)\n"
        "    if not c: break\n"
        "    got+=c\n"
        "print('ok' if got==b'hello\\n' else 'bad')\n"
    )
    done = cluster.exec(ns, "client", [sys.executable, "-c", script], timeout=30)
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()}"


def test_services_without_usable_endpoints_fail_fast_with_a_reason(cluster: Playground) -> None:
    ns = "noendpoints"
    nothing = mh.service("nothing", ns, 80, 8080)
    nothing["spec"]["selector"] = {"app": "does-not-exist"}
    misnamed = mh.service("misnamed", ns, 80, "grpc")  # the pods only have a port named http
    misnamed["spec"]["selector"] = {"app": "echo"}
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _deployment("echo", ns, 1, WHOAMI, 8080),
            nothing,
            misnamed,
            _client(ns),
        )
    )
    _ready_pods(cluster, ns, "echo", 1)
    cluster.wait_pod_ready(ns, "client")
    mh.wait_captured(cluster, ns, "client")
    for host, reason in (
        ("nothing.noendpoints", "has no endpoints"),
        ("misnamed.noendpoints", "declares the target port"),
    ):
        result = _call(cluster, ns, host, 80, 1)
        assert result["seen"] == {}
        assert len(result["failures"]) == 1
        svc = f"{host.split('.')[0]}.{ns}.svc.cluster.local"

        def refused(svc: str = svc) -> list[dict[str, Any]]:
            return [
                r
                for r in mh.access_log(cluster, "node1")
                if r["direction"] == "outbound" and r.get("dst.service") == svc
            ]

        records = mh.wait_until(refused, what=f"the refused call to {host} in the access log")
        assert reason in records[-1]["error"], records[-1]
        assert records[-1]["response_flags"] == "CONNECT", records[-1]


def _app_log(events_dir: str, pod: dict[str, Any]) -> list[tuple[float, str]]:
    """(time, event) lines the WHOAMI app wrote."""
    path = os.path.join(events_dir, pod["metadata"]["name"])
    events: list[tuple[float, str]] = []
    if not os.path.exists(path):
        return events  # nothing happened to this pod yet
    with open(path, encoding="utf-8") as f:
        for line in f:
            stamp, _, event = line.strip().partition(" ")
            events.append((float(stamp), event))
    return events


def test_scale_down_withdraws_the_endpoint_everywhere_before_the_pod_stops(
    cluster: Playground, tmp_path: pathlib.Path
) -> None:
    ns = "scaledown"
    # The preStop sleep is what a Kubernetes user adds so the mesh hears about the deletion
    # before the app stops; the test checks the mesh actually used that window.
    hook = {"lifecycle": {"preStop": {"sleep": {"seconds": 3}}}}
    events_dir = str(tmp_path)
    deployment = _deployment("echo", ns, 2, WHOAMI, 8080)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container.update(hook)
    container["env"].append({"name": "EVENTS_DIR", "value": events_dir})
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            deployment,
            mh.service("echo", ns, 80, "http"),
            _client(ns),
        )
    )
    pods = _ready_pods(cluster, ns, "echo", 2)
    cluster.wait_pod_ready(ns, "client")
    for name in [*(p["metadata"]["name"] for p in pods), "client"]:
        mh.wait_captured(cluster, ns, name)
    for pod in pods:
        ip = pod["status"]["podIP"]
        mh.wait_until(
            functools.partial(_known_everywhere, cluster, ip, healthy=True),
            what=f"every ztunnel to know the endpoint {ip}",
        )
    _scale_down_while_calling(cluster, ns, pods, events_dir)


def _scale_down_while_calling(
    cluster: Playground, ns: str, pods: list[dict[str, Any]], events_dir: str
) -> None:
    caller = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "--state-dir", cluster.state_dir, "exec", "-n", ns,
         "client", "--", sys.executable, "-c", CALLER, "echo.scaledown", "80", "600", CANARY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Scale only once calls are flowing to both pods.
        mh.wait_until(
            lambda: all(
                any(e.startswith("request") for _, e in _app_log(events_dir, p)) for p in pods
            ),
            60,
            what="calls to reach both pods",
        )
        done = subprocess.run(
            [sys.executable, "-m", "meshctl", "--state-dir", cluster.state_dir, "scale", "-n", ns,
             "deployment/echo", "--replicas", "1"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "scaled" in done.stdout

        def removed() -> dict[str, Any] | None:
            gone = [p for p in pods if p["metadata"]["uid"] not in _live_uids(cluster, ns)]
            return gone[0] if gone else None

        victim = mh.wait_until(removed, 30, what="one pod to be picked for removal")
        ip = victim["status"]["podIP"]
        mh.wait_until(
            functools.partial(_known_everywhere, cluster, ip, healthy=False),
            30,
            what=f"every ztunnel to stop using {ip}",
        )
        withdrawn_by = time.time()  # an upper bound: all three had withdrawn it by now
        out, err = caller.communicate(timeout=180)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    result = json.loads(out)
    assert result["failures"] == [], err

    def terminated() -> list[tuple[float, str]] | None:
        events = _app_log(events_dir, victim)
        return events if events and events[-1][1] == "SIGTERM" else None

    events = mh.wait_until(terminated, 30, what="the removed pod to receive SIGTERM")
    sigterm_at = events[-1][0]
    assert withdrawn_by < sigterm_at, "the pod was stopped before every ztunnel withdrew it"
    last_request = max((t for t, e in events if e.startswith("request")), default=0.0)
    assert last_request < withdrawn_by, "a connection reached the pod after it was withdrawn"
    assert sum(result["seen"].values()) == 600


def _live_uids(cluster: Playground, ns: str) -> set[str]:
    return {p["metadata"]["uid"] for p in _pods_of(cluster, ns, "echo")}


def test_headless_service_names_reach_the_pods_through_the_mesh(cluster: Playground) -> None:
    ns = "headless"
    svc = mh.service("echo", ns, 8080, "http")
    svc["spec"]["clusterIP"] = "None"
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=True),
            _deployment("echo", ns, 2, WHOAMI, 8080),
            svc,
            _client(ns),
        )
    )
    pods = _ready_pods(cluster, ns, "echo", 2)
    cluster.wait_pod_ready(ns, "client")
    for name in [*(p["metadata"]["name"] for p in pods), "client"]:
        mh.wait_captured(cluster, ns, name)
    ips = {p["status"]["podIP"] for p in pods}
    # The name resolves to the pods themselves (no VIP), as cluster DNS answers for headless.
    lookup = (
        "import json, socket\n"
        "infos = socket.getaddrinfo('echo.headless', 8080, proto=socket.IPPROTO_TCP)\n"
        "print(json.dumps(sorted({info[4][0] for info in infos})))\n"
    )

    def resolves_to_both() -> bool:
        done = cluster.exec(ns, "client", [sys.executable, "-c", lookup])
        return done.returncode == 0 and set(json.loads(done.stdout)) == ips

    mh.wait_until(resolves_to_both, what="the headless name to resolve to both pods")
    result = _call(cluster, ns, "echo.headless", 8080, 20)
    assert result["failures"] == []
    assert set(result["seen"]) <= {p["metadata"]["name"] for p in pods}
    outbound = [
        r
        for r in mh.access_log(cluster, "node1")
        if r["direction"] == "outbound" and r["src.namespace"] == ns
    ]
    assert len(outbound) >= 20
    assert all(r["dst.hbone_addr"] and r["dst.hbone_addr"].split(":")[0] in ips for r in outbound)
