"""The L4 mesh end to end on a real playground: namespaces, veths, bridge, iptables, mTLS.

One playground serves the module (starting one costs seconds); each test works in its own
Kubernetes namespace so tests don't see each other's pods.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.parse
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.identity import ca as ca_mod
from meshcore.identity import csr, spiffe
from meshcore.kube import resources
from meshctl import commands
from meshctl.demo import manifests as demo
from tests.netns import mesh_helpers as mh
from tests.netns.playground_fixtures import Playground, started

pytestmark = pytest.mark.netns

SIZE = 10 << 20
CANARY = b"MESH-PLAINTEXT-CANARY:" + hashlib.sha256(b"up").hexdigest().encode()

# A server that hashes what it receives, then answers with that hash and 10 MiB of its own.
SINK = textwrap.dedent(
    """
    import hashlib, socket, threading
    SIZE = 10 << 20
    BLOCK = hashlib.sha256(b"down").digest() * 2048
    def serve(conn):
        try:
            digest = hashlib.sha256()
            while chunk := conn.recv(1 << 18):
                digest.update(chunk)
            conn.sendall(digest.hexdigest().encode() + b"\\n")
            sent = 0
            while sent < SIZE:
                piece = BLOCK[: min(len(BLOCK), SIZE - sent)]
                conn.sendall(piece)
                sent += len(piece)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)

# Run inside the client pod: send 10 MiB (full of the canary), read the answer, report hashes.
CLIENT = textwrap.dedent(
    """
    import hashlib, json, socket, sys, threading
    SIZE = 10 << 20
    CANARY = sys.argv[3].encode()
    BLOCK = (CANARY * (65536 // len(CANARY) + 1))[:65536]
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    sent = hashlib.sha256()
    def send():
        n = 0
        while n < SIZE:
            piece = BLOCK[: min(len(BLOCK), SIZE - n)]
            sock.sendall(piece)
            sent.update(piece)
            n += len(piece)
        sock.shutdown(socket.SHUT_WR)
    writer = threading.Thread(target=send)
    writer.start()
    data = bytearray()
    while chunk := sock.recv(1 << 18):
        data += chunk
    writer.join()
    head, _, body = bytes(data).partition(b"\\n")
    print(json.dumps({"server_hash": head.decode(), "sent_hash": sent.hexdigest(),
                      "recv_hash": hashlib.sha256(body).hexdigest(), "recv_len": len(body)}))
    """
)


def _expected_download() -> str:
    block = hashlib.sha256(b"down").digest() * 2048
    data = (block * (SIZE // len(block) + 1))[:SIZE]
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Playground]:
    with started(Playground()) as pg:
        yield pg


def _deploy_sink_and_client(cluster: Playground, ns: str, *, ambient: bool) -> None:
    """Namespace `ns` with the sink (behind service `sink`, port 80) and an idle client pod;
    returns once both are Ready and, in an ambient namespace, captured."""
    cluster.apply(
        mh.manifest(
            mh.namespace(ns, ambient=ambient),
            mh.python_pod("sink", ns, SINK, sa="sink", port=8080),
            mh.service("sink", ns, 80, 8080),
            mh.sleeper_pod("client", ns, sa="client"),
        )
    )
    for pod in ("sink", "client"):
        cluster.wait_pod_ready(ns, pod)
        if ambient:
            mh.wait_captured(cluster, ns, pod)


def _exchange(cluster: Playground, ns: str, host: str, port: int) -> dict[str, object]:
    done = cluster.exec(
        ns, "client", [sys.executable, "-c", CLIENT, host, str(port), CANARY.decode()], timeout=120
    )
    assert done.returncode == 0, f"client failed: {done.stderr}\n{cluster.logs('ztunnel')[-3000:]}"
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_ten_megabytes_each_way_is_mutual_tls_on_the_wire(cluster: Playground) -> None:
    ns = "bulk"
    _deploy_sink_and_client(cluster, ns, ambient=True)

    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "client.pcap")
        with mh.capture(mh.pod_netns(cluster, ns, "client"), pcap):
            result = _exchange(cluster, ns, f"sink.{ns}", 80)
        packets = mh.read_capture(pcap)
        raw = mh.file_bytes(pcap)

    # Byte for byte, both ways.
    assert result["server_hash"] == result["sent_hash"]
    assert result["recv_len"] == SIZE
    assert result["recv_hash"] == _expected_download()

    # On the client pod's interface: only TLS to 15008, never the app's port or plaintext.
    assert len(packets) > 100
    assert all(15008 in mh.packet_ports(p) for p in packets), [
        p for p in packets if 15008 not in mh.packet_ports(p)
    ][:5]
    assert not any({80, 8080} & set(mh.packet_ports(p)) for p in packets)
    assert CANARY not in raw

    # The server side's ztunnel saw the caller's SPIFFE identity.
    inbound = mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster)
            if r["direction"] == "inbound"
            and r["dst.workload"] == "sink"
            and r["bytes_sent"] == SIZE
        ],
        what="the inbound access-log record",
    )
    assert inbound[0]["src.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/client"
    assert inbound[0]["dst.identity"] == f"spiffe://cluster.local/ns/{ns}/sa/sink"
    assert inbound[0]["error"] is None
    outbound = [
        r
        for r in mh.access_log(cluster)
        if r["direction"] == "outbound" and r["dst.workload"] == "sink"
    ]
    assert outbound
    assert outbound[-1]["dst.service"] == f"sink.{ns}.svc.cluster.local"
    assert outbound[-1]["dst.hbone_addr"].endswith(":8080")


def test_prometheus_scrapes_istio_tcp_metrics(cluster: Playground) -> None:
    ns = "metrics"
    _deploy_sink_and_client(cluster, ns, ambient=True)
    _exchange(cluster, ns, f"sink.{ns}", 80)

    node_ip = cluster.node_address()
    with tempfile.TemporaryDirectory(prefix="mt-prom-") as tmp:
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                "scrape_configs:\n"
                "  - job_name: ztunnel\n"
                f"    static_configs: [{{targets: ['{node_ip}:15020']}}]\n"
            )
        # A real Prometheus, in the node's namespace, scraping ztunnel's endpoint.
        prom = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                cluster.node_netns(),
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                "--web.listen-address=127.0.0.1:19090",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            labels = {
                "reporter": "destination",
                "source_principal": f"spiffe://cluster.local/ns/{ns}/sa/client",
                "destination_principal": f"spiffe://cluster.local/ns/{ns}/sa/sink",
                "destination_service": f"sink.{ns}.svc.cluster.local",
                "destination_workload_namespace": ns,
                "connection_security_policy": "mutual_tls",
                "request_protocol": "tcp",
            }
            selector = ",".join(f'{k}="{v}"' for k, v in labels.items())

            def query(metric: str) -> float | None:
                """The summed value, or None while Prometheus is starting or has no sample."""
                q = urllib.parse.quote(f"sum({metric}{{{selector}}})")
                done = cluster.in_node(
                    "node1", ["curl", "-sf", f"http://127.0.0.1:19090/api/v1/query?query={q}"]
                )
                if done.returncode != 0:
                    return None  # not listening yet, or 503 while it loads
                results = json.loads(done.stdout)["data"]["result"]
                return float(results[0]["value"][1]) if results else None

            opened = mh.wait_until(
                lambda: query("istio_tcp_connections_opened_total"),
                timeout=60,
                what="Prometheus to scrape the opened counter",
            )
            assert opened >= 1
            received = mh.wait_until(
                lambda: query("istio_tcp_received_bytes_total"),
                timeout=30,
                what="the received-bytes counter",
            )
            assert received >= SIZE
            sent = mh.wait_until(
                lambda: query("istio_tcp_sent_bytes_total"),
                timeout=30,
                what="the sent-bytes counter",
            )
            assert sent >= SIZE
        finally:
            prom.terminate()
            prom.wait(20)

    # The source side counts the same connection with reporter="source".
    text = mh.node_http(cluster, f"http://{node_ip}:15020/metrics")
    assert any(
        line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="source"' in line
        and f'source_principal="spiffe://cluster.local/ns/{ns}/sa/client"' in line
        for line in text.splitlines()
    )


def test_enrollment_follows_the_namespace_label(cluster: Playground) -> None:
    ns = "enroll"
    _deploy_sink_and_client(cluster, ns, ambient=False)
    uids = {p: cluster.get(resources.PODS, p, ns)["metadata"]["uid"] for p in ("sink", "client")}

    # Not labelled: not captured, and traffic still flows (as plain TCP).
    for pod in ("sink", "client"):
        assert not mh.is_captured(cluster, ns, pod)
        assert mh.redirection_annotation(cluster, ns, pod) is None
    assert not set(uids.values()) & mh.ztunnel_pod_uids(cluster)
    assert _small_call(cluster, ns)

    # Labelling the running namespace captures both pods without restarting them.
    pids_before = _container_pids(cluster, ns)
    cluster.label_namespace(ns, {"istio.io/dataplane-mode": "ambient"})
    for pod in ("sink", "client"):
        mh.wait_captured(cluster, ns, pod)
        assert mh.is_captured(cluster, ns, pod)
    assert set(uids.values()) <= mh.ztunnel_pod_uids(cluster)
    assert _container_pids(cluster, ns) == pids_before
    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "c.pcap")
        with mh.capture(mh.pod_netns(cluster, ns, "client"), pcap):
            assert _small_call(cluster, ns)
        assert all(15008 in mh.packet_ports(p) for p in mh.read_capture(pcap))

    # Removing the label releases them.
    cluster.label_namespace(ns, {"istio.io/dataplane-mode": None})
    for pod in ("sink", "client"):
        mh.wait_released(cluster, ns, pod)
        assert not mh.is_captured(cluster, ns, pod)
    mh.wait_until(
        lambda: not set(uids.values()) & mh.ztunnel_pod_uids(cluster),
        what="ztunnel to drop the released pods",
    )
    assert _small_call(cluster, ns)

    # Deleting a captured pod removes its rules (its namespace) and its ZDS entry.
    cluster.label_namespace(ns, {"istio.io/dataplane-mode": "ambient"})
    mh.wait_until(
        lambda: mh.redirection_annotation(cluster, ns, "sink") == "enabled",
        what="sink to be captured again",
    )
    sink_netns = mh.pod_netns(cluster, ns, "sink")
    cluster.call(lambda api: api.delete(resources.PODS, "sink", ns))
    mh.wait_until(
        lambda: not os.path.exists(f"/var/run/netns/{sink_netns}"),
        what="the deleted pod's namespace to go",
    )
    mh.wait_until(
        lambda: uids["sink"] not in mh.ztunnel_pod_uids(cluster),
        what="ztunnel to drop the deleted pod",
    )


def test_demo_shop_through_the_mesh(cluster: Playground) -> None:
    cluster.apply(demo.build_demo_manifest())
    cluster.call(
        lambda api: commands.wait_deployments_ready(api, demo.NAMESPACE, demo.DEPLOYMENTS, 120)
    )
    cluster.wait_pod_ready("shop", "client")
    cluster.label_namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    listed = cluster.call(lambda api: api.list(resources.PODS, "shop"))
    names = [p["metadata"]["name"] for p in listed.items]
    assert len(names) == sum(demo.REPLICAS.values()) + 1
    for pod in names:
        mh.wait_captured(cluster, "shop", pod)
    done = cluster.exec(
        "shop", "client", ["curl", "-s", "--max-time", "10", "http://product-catalog.shop/products"]
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["service"] == "product-catalog"
    # ztunnel connects to the app with the client's own address (transparent source).
    assert answer["caller"].split(":")[0] == cluster.pod_ip("shop", "client")
    orders = cluster.exec(
        "shop", "client", ["curl", "-s", "--max-time", "10", "http://order-management.shop/orders"]
    )
    assert orders.returncode == 0, orders.stderr
    assert "payment-processing" in orders.stdout


def _small_call(cluster: Playground, ns: str) -> bool:
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(('sink.{ns}',80),timeout=10)\n"
        "s.sendall(b'hello'); s.shutdown(socket.SHUT_WR)\n"
        "data=b''\n"
        "while (c:=s.recv(65536)): data+=c\n"
        "sys.exit(0 if len(data)==64+1+(10<<20) else 1)\n"
    )
    return cluster.exec(ns, "client", [sys.executable, "-c", script], timeout=60).returncode == 0


def _container_pids(cluster: Playground, ns: str) -> dict[str, object]:
    return {
        p: cluster.get(resources.PODS, p, ns).get("status", {}).get("containerStatuses")
        for p in ("sink", "client")
    }


def test_bad_input_is_refused_and_nothing_is_disturbed(cluster: Playground) -> None:
    ns = "robust"
    _deploy_sink_and_client(cluster, ns, ambient=True)
    assert _small_call(cluster, ns)

    def meshctl_apply(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshctl", "--state-dir", cluster.state_dir, "apply", "-f", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    malformed = meshctl_apply("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n")
    assert malformed.returncode == 1
    assert "error parsing" in malformed.stderr
    assert "line" in malformed.stderr

    unknown = meshctl_apply("apiVersion: v1\nkind: Frobnicator\nmetadata: {name: x}\n")
    assert unknown.returncode == 1
    assert 'no matches for kind "Frobnicator" in version "v1"' in unknown.stderr

    no_command = meshctl_apply(
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: nocmd, namespace: {ns}}}\n"
        "spec: {containers: [{name: app}]}\n"
    )
    assert no_command.returncode == 1
    assert "spec.containers[0].command" in no_command.stderr
    assert "Traceback" not in malformed.stderr + unknown.stderr + no_command.stderr

    # Garbage on the ZDS socket: the agent drops that connection, ztunnel keeps serving.
    zds = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zds.connect(cluster.paths.zds_socket("node1"))
    zds.send(b"\xff\x00garbage that is not a ZdsHello")
    zds.settimeout(10)
    assert zds.recv(1024) == b""  # the agent hung up on us
    zds.close()

    # A TLS peer with a certificate from another CA is refused at the handshake.
    now = datetime.datetime.now(datetime.UTC)
    rogue_ca = ca_mod.CertificateAuthority.generate("cluster.local", now=now)
    identity = spiffe.SpiffeId.parse(f"spiffe://cluster.local/ns/{ns}/sa/client")
    key = csr.generate_key()
    leaf = rogue_ca.sign_csr(
        csr.build_csr(key, identity), identity=identity, ttl=datetime.timedelta(hours=1), now=now
    )
    sink_ip = cluster.pod_ip(ns, "sink")
    refused = _rogue_handshake(cluster, sink_ip, leaf, key)
    assert refused, "a certificate from another CA must not get through"
    mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster)
            if r["direction"] == "inbound" and r["response_flags"] == "TLS_FAILURE"
        ],
        what="the refused handshake in the access log",
    )

    # Everything that was running still works, and new pods are still captured.
    assert _small_call(cluster, ns)
    cluster.apply(mh.manifest(mh.sleeper_pod("late", ns, sa="late")))
    cluster.wait_pod_ready(ns, "late")
    assert mh.redirection_annotation(cluster, ns, "late") == "enabled"
    assert cluster.call(lambda api: api.list(resources.PODS, ns)).items
    assert not [
        p
        for p in cluster.call(lambda api: api.list(resources.PODS, ns)).items
        if p["metadata"]["name"] == "nocmd"
    ]


def _rogue_handshake(
    cluster: Playground, ip: str, leaf: bytes, key: ec.EllipticCurvePrivateKey
) -> bool:
    """From the node's namespace (outside any captured pod, like any host on the network), try
    mTLS to the sink's 15008 with a rogue certificate; True when the server refuses it
    (handshake error or immediate EOF)."""
    with tempfile.TemporaryDirectory(prefix="mt-rogue-") as tmp:
        cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(cert_path, "wb") as f:
            f.write(leaf)
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        script = textwrap.dedent(
            f"""
            import socket, ssl, sys
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            ctx.load_cert_chain({cert_path!r}, {key_path!r})
            raw = socket.create_connection(({ip!r}, 15008), timeout=10)
            try:
                tls = ctx.wrap_socket(raw)
                tls.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n")
                data = tls.recv(1024)
                sys.exit(0 if data == b"" else 1)
            except (ssl.SSLError, ConnectionError, OSError):
                sys.exit(0)
            """
        )
        done = cluster.in_node("node1", [sys.executable, "-c", script])
        return done.returncode == 0


def test_destinations_outside_the_mesh_get_plain_tcp(cluster: Playground) -> None:
    """An enrolled client calling a pod that is not in the mesh: passthrough, from the pod."""
    _deploy_sink_and_client(cluster, "outside", ambient=False)
    cluster.apply(
        mh.manifest(mh.namespace("inside", ambient=True), mh.sleeper_pod("client", "inside"))
    )
    cluster.wait_pod_ready("inside", "client")
    mh.wait_captured(cluster, "inside", "client")
    with tempfile.TemporaryDirectory(prefix="mt-pcap-") as tmp:
        pcap = os.path.join(tmp, "p.pcap")
        with mh.capture(mh.pod_netns(cluster, "inside", "client"), pcap):
            result = _exchange(cluster, "inside", "sink.outside", 80)
        ports = [mh.packet_ports(p) for p in mh.read_capture(pcap)]
    assert result["server_hash"] == result["sent_hash"]
    assert result["recv_hash"] == _expected_download()
    # Plain TCP straight to the endpoint's port (ztunnel resolved the VIP), never HBONE.
    assert ports
    assert all(8080 in pair for pair in ports)
    outbound = [
        r
        for r in mh.access_log(cluster)
        if r["direction"] == "outbound"
        and r["src.namespace"] == "inside"
        and r["dst.workload"] == "sink"
    ]
    assert outbound
    assert outbound[-1]["dst.hbone_addr"] is None
    metrics = mh.node_http(cluster, f"http://{cluster.node_address()}:15020/metrics")
    assert any(
        'source_workload_namespace="inside"' in line
        and 'destination_workload_namespace="outside"' in line
        and 'connection_security_policy="unknown"' in line
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
    )


def test_tunnel_is_refused_when_the_app_is_not_listening(cluster: Playground) -> None:
    """ztunnel answers 200 only after it reached the app; otherwise the client is closed fast."""
    ns = "noapp"
    _deploy_sink_and_client(cluster, ns, ambient=True)
    sink_ip = cluster.pod_ip(ns, "sink")
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(({sink_ip!r}, 9999), timeout=10)\n"
        "try:\n"
        "    data=s.recv(1)\n"
        "except ConnectionError:\n"
        "    data=b''\n"
        "sys.exit(0 if data==b'' else 1)\n"
    )
    done = cluster.exec(ns, "client", [sys.executable, "-c", script], timeout=30)
    assert done.returncode == 0, done.stderr
    refused = mh.wait_until(
        lambda: [
            r
            for r in mh.access_log(cluster)
            if r["direction"] == "outbound" and r["dst.addr"] == f"{sink_ip}:9999"
        ],
        what="the refused tunnel in the access log",
    )
    assert "503" in refused[-1]["error"]
    inbound = [
        r
        for r in mh.access_log(cluster)
        if r["direction"] == "inbound" and r["dst.addr"] == f"{sink_ip}:9999"
    ]
    assert inbound
    assert "failed" in inbound[-1]["error"]
