"""Identity-based authorization and mTLS modes with real traffic on a 3-node playground:
Istio's AuthorizationPolicy and PeerAuthentication applied with `meshctl apply`, enforced by the
destination node's ztunnel.

Layout: servers run on node2 (and node3 for the push test), clients on node1, so every decision
is made by another node's ztunnel than the client's.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

# Echo on two ports, so a policy can treat them differently; port 7002 answers with how many
# connections and bytes ever reached port 7001.
ECHO = textwrap.dedent(
    """
    import socket, threading
    seen = {"conns": 0, "bytes": 0}
    def serve(conn, port):
        with conn:
            if port == 7002:
                conn.sendall(f"{seen['conns']} {seen['bytes']}\\n".encode())
                return
            while data := conn.recv(65536):
                if port == 7001:
                    seen["bytes"] += len(data)
                conn.sendall(data)
    def listen(port):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(128)
        while True:
            conn, _ = srv.accept()
            if port == 7001:
                seen["conns"] += 1
            threading.Thread(target=serve, args=(conn, port), daemon=True).start()
    threading.Thread(target=listen, args=(7001,), daemon=True).start()
    threading.Thread(target=listen, args=(7002,), daemon=True).start()
    listen(7000)
    """
)

# What the server saw on port 7001: "<connections> <bytes>".
SEEN = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], 7002), timeout=5)
    print(s.makefile().readline().strip())
    """
)

# One round trip on a new connection: prints ok, or what went wrong.
PING = textwrap.dedent(
    """
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"ping\\n")
        got = b""
        while not got.endswith(b"\\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
        print("ok" if got == b"ping\\n" else f"closed after {got!r}")
    except OSError as exc:
        print(f"error {exc}")
    """
)

# Holds one connection open, echoing a line whenever the test asks, and reports when it ends.
HOLDER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    s.sendall(b"hello\\n"); assert s.recv(64) == b"hello\\n"
    print("ready", flush=True)
    s.settimeout(None)
    try:
        data = s.recv(64)
    except OSError as exc:
        data = b""
    print("closed" if not data else f"data {data!r}", time.time(), flush=True)
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground().nodes(3)) as pg:
        yield pg


def _pinned(pod: dict[str, Any], node: str) -> dict[str, Any]:
    pod["spec"]["nodeName"] = node
    return pod


def _server(ns: str, name: str = "server", node: str = "node2") -> dict[str, Any]:
    return _pinned(mh.python_pod(name, ns, ECHO, sa=name, port=7000), node)


def _client(ns: str, name: str, node: str = "node1") -> dict[str, Any]:
    return _pinned(mh.sleeper_pod(name, ns, sa=name), node)


def _setup(cluster: Playground, ns: str, *docs: dict[str, Any], ambient: bool = True) -> None:
    cluster.apply(mh.manifest(mh.namespace(ns, ambient=ambient), *docs))
    for doc in docs:
        if doc["kind"] == "Pod":
            name = doc["metadata"]["name"]
            cluster.wait_pod_ready(doc["metadata"]["namespace"], name)
            if ambient and doc["metadata"]["namespace"] == ns:
                mh.wait_captured(cluster, ns, name)


def _ping(cluster: Playground, ns: str, client: str, host: str, port: int) -> str:
    done = cluster.exec(ns, client, [sys.executable, "-c", PING, host, str(port)], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _apply(cluster: Playground, *docs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    done = cluster.meshctl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs, sort_keys=False))
    assert done.returncode == 0, done.stderr
    return done


def _delete(cluster: Playground, *docs: dict[str, Any]) -> None:
    done = cluster.meshctl("delete", "-f", "-", stdin=yaml.safe_dump_all(docs, sort_keys=False))
    assert done.returncode == 0, done.stderr


def _policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def _peer_auth(
    ns: str, name: str, mode: str, selector: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def _has_policy(cluster: Playground, node: str, ns: str, name: str, present: bool = True) -> bool:
    keys = {
        (p.get("namespace"), p.get("name"))
        for p in mh.config_dump(cluster, node).get("policies", [])
    }
    return ((ns, name) in keys) == present


def _inbound_denials(cluster: Playground, node: str, ns: str) -> list[dict[str, Any]]:
    return [
        r
        for r in mh.access_log(cluster, node)
        if r["direction"] == "inbound"
        and r.get("dst.namespace") == ns
        and r.get("response_flags") == "DENY"
    ]


def test_allow_list_by_principal_admits_one_client_and_refuses_another(cluster: Playground) -> None:
    ns = "allowlist"
    _setup(cluster, ns, _server(ns), _client(ns, "frontend"), _client(ns, "intruder"))
    server_ip = cluster.pod_ip(ns, "server")
    assert _ping(cluster, ns, "intruder", server_ip, 7000) == "ok"  # no policy: allowed
    policy = _policy(
        ns,
        "frontend-only",
        {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/frontend"]}}]}
            ],
        },
    )
    done = _apply(cluster, policy)
    assert "Warning" not in done.stderr  # every field is enforced at L4
    mh.wait_until(
        lambda: _has_policy(cluster, "node2", ns, "frontend-only"), what="the policy on node2"
    )
    assert _ping(cluster, ns, "frontend", server_ip, 7000) == "ok"
    assert _ping(cluster, ns, "intruder", server_ip, 7000) != "ok"
    denied = mh.wait_until(
        lambda: _inbound_denials(cluster, "node2", ns), what="the refusal in node2's access log"
    )
    assert denied[-1]["src.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/intruder"
    outbound = [
        r
        for r in mh.access_log(cluster, "node1")
        if r["direction"] == "outbound" and r.get("src.workload") == "intruder"
    ]
    assert outbound[-1]["response_flags"] == "DENY"
    metrics = mh.node_http(cluster, f"http://{cluster.node_address('node2')}:15020/metrics")
    assert any(
        'response_flags="DENY"' in line and f'destination_workload_namespace="{ns}"' in line
        for line in metrics.splitlines()
        if line.startswith(
            ("istio_tcp_connections_opened_total{", "istio_tcp_connections_closed_total{")
        )
    )
    # meshctl check explains it without sending traffic.
    allowed = cluster.meshctl("check", "-n", ns, "frontend", "server:7000")
    refused = cluster.meshctl("check", "-n", ns, "intruder", "server:7000")
    assert allowed.returncode == 0, allowed.stderr
    assert "ALLOW" in allowed.stdout
    assert f"{ns}/frontend-only" in allowed.stdout
    assert "DENY" in refused.stdout
    assert refused.returncode == 1


def test_deny_on_one_port_leaves_the_other_open(cluster: Playground) -> None:
    ns = "denyport"
    _setup(cluster, ns, _server(ns), _client(ns, "client"))
    server_ip = cluster.pod_ip(ns, "server")
    _apply(
        cluster,
        _policy(
            ns,
            "no-7001",
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["7001"]}}]}]},
        ),
    )
    mh.wait_until(lambda: _has_policy(cluster, "node2", ns, "no-7001"), what="the policy on node2")
    assert _ping(cluster, ns, "client", server_ip, 7000) == "ok"
    assert _ping(cluster, ns, "client", server_ip, 7001) != "ok"
    # The client's bytes left right behind its CONNECT (optimistic data); the refusal must
    # have dropped them: the app on 7001 never saw a connection, let alone a byte.
    seen = cluster.exec(ns, "client", [sys.executable, "-c", SEEN, server_ip], timeout=30)
    assert seen.stdout.strip() == "0 0", seen.stderr
    check = cluster.meshctl("check", "-n", ns, "client", "server:7001")
    assert "DENY" in check.stdout
    assert f"{ns}/no-7001" in check.stdout


def test_strict_refuses_plaintext_from_outside_the_mesh_and_permissive_admits_it(
    cluster: Playground,
) -> None:
    ns, outside = "mtlsmode", "mtlsmode-outside"
    _setup(cluster, ns, _server(ns))
    _setup(cluster, outside, _client(outside, "legacy"), ambient=False)
    server_ip = cluster.pod_ip(ns, "server")
    assert _ping(cluster, outside, "legacy", server_ip, 7000) == "ok"  # PERMISSIVE by default
    strict = _peer_auth(ns, "default", "STRICT")
    _apply(cluster, strict)
    mh.wait_until(
        lambda: _ping(cluster, outside, "legacy", server_ip, 7000) != "ok",
        what="STRICT to refuse the plaintext client",
    )
    assert _inbound_denials(cluster, "node2", ns)
    _apply(cluster, _peer_auth(ns, "default", "PERMISSIVE"))
    mh.wait_until(
        lambda: _ping(cluster, outside, "legacy", server_ip, 7000) == "ok",
        what="PERMISSIVE to admit the plaintext client again",
    )


def test_open_connection_is_closed_within_two_seconds_of_a_deny(cluster: Playground) -> None:
    ns = "latedeny"
    _setup(cluster, ns, _server(ns), _client(ns, "client"), _client(ns, "other"))
    server_ip = cluster.pod_ip(ns, "server")
    holders = {}
    for name in ("client", "other"):
        cmd = [sys.executable, "-m", "meshctl", "--state-dir", cluster.state_dir, "exec", "-n", ns]
        cmd += [name, "--", sys.executable, "-c", HOLDER, server_ip, "7000"]
        holders[name] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        for proc in holders.values():
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        deny = _policy(
            ns,
            "cut-client",
            {
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/client"]}}]}
                ],
            },
        )
        applied_at = time.time()
        _apply(cluster, deny)
        out, _ = holders["client"].communicate(timeout=10)
        state, stamp = out.split()[:2]
        assert state == "closed"
        assert float(stamp) - applied_at < 2.0, (
            f"closed {float(stamp) - applied_at:.2f}s after apply"
        )
        assert holders["other"].poll() is None, "a connection the policy does not cover was closed"
        assert _ping(cluster, ns, "other", server_ip, 7000) == "ok"
    finally:
        for proc in holders.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    late = mh.wait_until(
        lambda: _inbound_denials(cluster, "node2", ns), what="the late rejection in the access log"
    )
    assert f"{ns}/cut-client" in late[-1]["error"]


def test_policy_reaches_every_node(cluster: Playground) -> None:
    """A namespace-wide DENY applies on all three nodes' ztunnels after one `meshctl apply`."""
    ns = "everynode"
    servers = [_server(ns, f"server{i}", f"node{i}") for i in (1, 2, 3)]
    _setup(cluster, ns, *servers, _client(ns, "client"))
    deny = _policy(
        ns,
        "deny-all-7001",
        {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["7001"]}}]}]},
    )
    _apply(cluster, deny)
    for node in ("node1", "node2", "node3"):
        mh.wait_until(
            functools.partial(_has_policy, cluster, node, ns, "deny-all-7001"),
            what=f"the policy on {node}",
        )
    for i in (1, 2, 3):
        ip = cluster.pod_ip(ns, f"server{i}")
        assert _ping(cluster, ns, "client", ip, 7001) != "ok"
        assert _ping(cluster, ns, "client", ip, 7000) == "ok"
    _delete(cluster, deny)
    for node in ("node1", "node2", "node3"):
        mh.wait_until(
            functools.partial(_has_policy, cluster, node, ns, "deny-all-7001", present=False),
            what=f"the policy gone from {node}",
        )
    assert _ping(cluster, ns, "client", cluster.pod_ip(ns, "server3"), 7001) == "ok"


def test_policies_with_l7_fields_are_applied_with_warnings(cluster: Playground) -> None:
    ns = "l7warn"
    _setup(cluster, ns, _server(ns), _client(ns, "client"))
    policy = _policy(
        ns,
        "get-only",
        {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["7000"]}}]}],
        },
    )
    done = _apply(cluster, policy)
    assert "Warning:" in done.stderr
    assert "methods" in done.stderr
    mh.wait_until(lambda: _has_policy(cluster, "node2", ns, "get-only"), what="the policy on node2")
    # The ALLOW rule with an HTTP field never matches at L4: stricter than written, fails closed.
    assert _ping(cluster, ns, "client", cluster.pod_ip(ns, "server"), 7000) != "ok"
    status = mh.wait_until(
        lambda: (
            cluster.meshctl(
                "get", "authorizationpolicies", "get-only", "-n", ns, "-o", "yaml"
            ).stdout
            if "UnsupportedValue"
            in cluster.meshctl(
                "get", "authorizationpolicies", "get-only", "-n", ns, "-o", "yaml"
            ).stdout
            else None
        ),
        what="the policy status to report the unsupported field",
    )
    assert "ZtunnelAccepted" in status


def test_bad_policies_are_rejected_whole(cluster: Playground) -> None:
    ns = "badpolicy"
    cluster.apply(mh.manifest(mh.namespace(ns, ambient=True)))
    cases = [
        ({"action": "AUDIT", "rules": [{}]}, "ztunnel does not support the AUDIT action"),
        (
            {"action": "ALLOW", "rules": [{"from": [{"source": {"principal": ["x"]}}]}]},
            "spec.rules[0].from[0].source.principal",
        ),
        (
            {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": [7000]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]",
        ),
    ]
    for spec, message in cases:
        done = cluster.meshctl(
            "apply",
            "-f",
            "-",
            stdin=yaml.safe_dump(_policy(ns, "bad", spec), sort_keys=False),
        )
        assert done.returncode != 0
        assert message in done.stderr, done.stderr
    listed = cluster.meshctl("get", "authorizationpolicies", "-n", ns)
    assert "bad" not in listed.stdout
