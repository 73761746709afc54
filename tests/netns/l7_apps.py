"""The HTTP backend and client the waypoint tests run in playground pods (as ``python -c``
scripts: the playground runs commands, not images), and the manifests around them."""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground

PORT = 8080

# HTTP/1.1 keep-alive server: answers JSON naming its pod and version, the request it got and
# its headers. FAIL_EVERY=N answers every Nth request 500; /status/<code> answers that code;
# ?delay_ms=N waits first.
BACKEND = textwrap.dedent(
    """
    import http.server, json, os, threading, time, urllib.parse
    lock = threading.Lock()
    count = 0
    fail_every = int(os.environ.get("FAIL_EVERY") or 0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self):
            global count
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            with lock:
                count += 1
                n = count
            if "delay_ms" in query:
                time.sleep(int(query["delay_ms"][0]) / 1000)
            status = 200
            if fail_every and n % fail_every == 0:
                status = 500
            if url.path.startswith("/status/"):
                status = int(url.path.split("/")[2])
            body = json.dumps({
                "pod": os.environ["POD_NAME"],
                "version": os.environ.get("VERSION", ""),
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "n": n,
            }).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = answer

    http.server.ThreadingHTTPServer.daemon_threads = True
    http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
    """
).replace("PORT", str(PORT))

# Sends COUNT requests on keep-alive connections (a new one when the server closes) and prints
# one JSON line per request: status, the backend's answer (or null), response headers, ms.
CLIENT = textwrap.dedent(
    """
    import http.client, json, sys, time, urllib.parse
    url, count, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    headers = json.loads(sys.argv[4])
    parts = urllib.parse.urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    conn = None
    for _ in range(count):
        if conn is None:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=20)
        start = time.monotonic()
        try:
            conn.request(method, target, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            print(json.dumps({"status": 0, "error": repr(exc)}), flush=True)
            conn.close()
            conn = None
            continue
        ms = (time.monotonic() - start) * 1000
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        print(json.dumps({
            "status": answer.status,
            "body": body,
            "text": None if body is not None else data.decode(errors="replace"),
            "headers": {k.lower(): v for k, v in answer.getheaders()},
            "ms": ms,
        }), flush=True)
        if answer.will_close:
            conn.close()
            conn = None
    """
)


# COUNT requests at once, each on its own connection; one JSON line each: status, body text.
BURST = textwrap.dedent(
    """
    import http.client, json, sys, threading, urllib.parse
    url, count = sys.argv[1], int(sys.argv[2])
    parts = urllib.parse.urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    results = []
    def one():
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
            conn.request("GET", target)
            answer = conn.getresponse()
            text = answer.read().decode(errors="replace")
            results.append({"status": answer.status, "text": text})
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            results.append({"status": 0, "text": repr(exc)})
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r))
    """
)

# An OTLP/HTTP collector: keeps every POST /v1/traces body, answers GET /spans with them all.
COLLECTOR = textwrap.dedent(
    """
    import http.server, json, threading
    lock = threading.Lock()
    received = []
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args):
            pass
        def reply(self, status, body):
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            data = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path != "/v1/traces":
                return self.reply(404, b"{}")
            with lock:
                received.append(json.loads(data))
            self.reply(200, b"{}")
        def do_GET(self):
            with lock:
                body = json.dumps(received).encode()
            self.reply(200, body)
    http.server.ThreadingHTTPServer(("0.0.0.0", 4318), Handler).serve_forever()
    """
)


# HTTP/2 with prior knowledge (h2c): COUNT requests as concurrent streams on one connection;
# one JSON line per stream: status, the backend's answer.
H2_CLIENT = textwrap.dedent(
    """
    import json, socket, sys, urllib.parse
    import h2.config, h2.connection, h2.events
    url, count = sys.argv[1], int(sys.argv[2])
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    streams = {}
    for _ in range(count):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":path", parts.path or "/"),
                                (":scheme", "http"), (":authority", parts.netloc)],
                          end_stream=True)
        streams[sid] = {"status": 0, "data": b""}
    sock.sendall(conn.data_to_send())
    done = set()
    while len(done) < count:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                streams[event.stream_id]["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                streams[event.stream_id]["data"] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                done.add(event.stream_id)
        sock.sendall(conn.data_to_send())
    for sid, got in sorted(streams.items()):
        print(json.dumps({"stream": sid, "status": got["status"],
                          "body": json.loads(got["data"] or b"null")}))
    """
)


def backend(name: str, ns: str, version: str, *, app: str, fail_every: int = 0) -> dict[str, Any]:
    """A Deployment of one backend pod labelled app=`app`, version=`version`."""
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "VERSION", "value": version},
        {"name": "FAIL_EVERY", "value": str(fail_every)},
    ]
    labels = {"app": app, "version": version}
    container = {
        "name": "app",
        "command": [sys.executable, "-c", BACKEND],
        "env": env,
        "ports": [{"name": "http", "containerPort": PORT}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": app, "containers": [container]},
            },
        },
    }


def http_service(name: str, ns: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": selector or {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": PORT}],
        },
    }


def request(
    cluster: Playground,
    ns: str,
    client: str,
    url: str,
    *,
    count: int = 1,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """`count` requests from pod `client`; one result per request."""
    argv = [sys.executable, "-c", CLIENT, url, str(count), method, json.dumps(headers or {})]
    done = cluster.exec(ns, client, argv, timeout=timeout)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(results) == count, done.stdout[-2000:]
    return results


def versions(results: list[dict[str, Any]]) -> dict[str, int]:
    """How many answers came from each version (non-200s under their status)."""
    out: dict[str, int] = {}
    for r in results:
        key = r["body"]["version"] if r["status"] == 200 and r["body"] else str(r["status"])
        out[key] = out.get(key, 0) + 1
    return out


def client_pod(name: str, ns: str) -> dict[str, Any]:
    return mh.sleeper_pod(name, ns, sa=name)


def burst(cluster: Playground, ns: str, client: str, url: str, count: int) -> list[dict[str, Any]]:
    done = cluster.exec(ns, client, [sys.executable, "-c", BURST, url, str(count)], timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def h2_request(
    cluster: Playground, ns: str, client: str, url: str, count: int
) -> list[dict[str, Any]]:
    """`count` concurrent HTTP/2 streams on one h2c connection from pod `client`."""
    done = cluster.exec(ns, client, [sys.executable, "-c", H2_CLIENT, url, str(count)], timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def collector_pod(name: str, ns: str) -> dict[str, Any]:
    return mh.python_pod(name, ns, COLLECTOR, port=4318)


def collected_spans(cluster: Playground, ns: str, collector: str) -> list[dict[str, Any]]:
    """Every span the collector received so far."""
    fetch = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:4318/spans', timeout=5).read().decode())"
    )
    done = cluster.exec(ns, collector, [sys.executable, "-c", fetch], timeout=30)
    assert done.returncode == 0, done.stderr
    return [
        span
        for body in json.loads(done.stdout)
        for resource in body.get("resourceSpans", ())
        for scope in resource.get("scopeSpans", ())
        for span in scope.get("spans", ())
    ]
