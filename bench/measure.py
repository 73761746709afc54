"""The data-path measurements of `python -m bench`: what runs, where, and how it is read.

Method (copied from /work/shared/reference/perf-baselines.md, own code):
- throughput: ``iperf3 -c <entry> -n <bytes> -J`` with one and with eight streams;
  ``end.sum_received``;
- proxy CPU: utime+stime from /proc/<pid>/stat of the proxy processes and their descendants
  (both ztunnels; both nginx instances; HAProxy), read just before and after the one-stream
  transfer, per 10^9 bytes moved;
- latency: `bench/c/netbench.c` 1-byte ping-pong, 1,000 warm-up then 10,000 timed round trips
  per path, all paths at once over one connection each, interleaved in blocks of
  `LATENCY_BLOCK` round trips: a slow spell of the VM lands on every path alike instead of on
  whichever ran then (ratios of separate runs seconds apart had spread from 0.8 to 3.1);
- connection rate: the same program opening connections one after another (connect, 1-byte
  echo, close), with the latency of each; 100 warm-up connections, then 3,000 per path,
  interleaved the same way in blocks of `CONNECT_BLOCK`; a path's rate is its connections over
  the time of its own blocks;
- memory: VmRSS of the ztunnels idle, and with N connections held open through them; once per
  run, first thing, on fresh ztunnels (see `DataPath.measure_memory`).

Paths (client pod on node1 unless said):
- ``direct``: plain client -> plain server (node2), no proxy;
- ``mesh``: enrolled client -> enrolled server (node2): ztunnel -> HBONE -> ztunnel;
- ``mesh_same_node``: enrolled client -> enrolled ``local`` pod (node1);
- ``passthrough``: enrolled client -> plain server: one ztunnel hop, plain TCP;
- ``nginx``: plain client -> nginx (client pod, plain in, mTLS out) -> nginx (server pod,
  mTLS in) -> server; TLS 1.3 only, mutual, ECDSA P-256, one worker each;
- ``haproxy``: plain client -> HAProxy TCP mode (client pod, one thread) -> server.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import selectors
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.topology import MESH, PLAIN, Bench, BenchError
from meshcore.netns import NETNS_RUN_DIR

IPERF_PORT = 5201
ECHO_PORT = 7000
NGINX_OUT = {IPERF_PORT: 10000, ECHO_PORT: 10002}  # in the client pod, plain
NGINX_IN = {IPERF_PORT: 10001, ECHO_PORT: 10003}  # in the server pod, mTLS
HAPROXY = {IPERF_PORT: 10010, ECHO_PORT: 10012}  # in the client pod
LATENCY_BLOCK = 1000  # timed round trips on one path before the next path's turn
CONNECT_BLOCK = 300  # new connections on one path before the next path's turn
SERVER_NAME = "bench-server"  # what nginx-out verifies the server certificate against
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PACKAGES = ("nginx-light", "libnginx-mod-stream", "haproxy", "iperf3", "gcc")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    bulk_bytes: int = 1 << 30
    pingpong_round_trips: int = 10_000
    new_connections: int = 3_000
    held_connections: int = 10_000
    redirect_mode: str = "iptables"  # how the node agents capture the mesh pods

    @classmethod
    def quick(cls, redirect_mode: str = "iptables") -> Settings:
        return cls(
            bulk_bytes=256 << 20,
            new_connections=500,
            held_connections=2_000,
            redirect_mode=redirect_mode,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Path:
    """Where a configuration's client runs, where it connects, which processes are its proxy."""

    client: tuple[str, str]
    host: str
    ports: Mapping[int, int]  # server port -> port the client dials
    proxies: Callable[[], list[int]]


# -- host tools ------------------------------------------------------------------------------


def ensure_tools(log: Callable[[str], None]) -> None:
    """Install the C peers from Debian when missing (never in CI: only `bench` calls this)."""
    wanted = {"nginx": "nginx-light", "haproxy": "haproxy", "iperf3": "iperf3", "cc": "gcc"}
    missing = [pkg for tool, pkg in wanted.items() if shutil.which(tool) is None]
    if not os.path.exists(NGINX_STREAM_MODULE):
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, check=False)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"apt-get install {' '.join(missing)} failed: {done.stderr[-800:]}")


def build_netbench(out_dir: str) -> str:
    source = os.path.join(os.path.dirname(__file__), "c", "netbench.c")
    binary = os.path.join(out_dir, "netbench")
    done = subprocess.run(
        ["cc", "-O2", "-o", binary, source], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"cc {source} failed: {done.stderr}")
    return binary


def write_certs(out_dir: str) -> None:
    """A private CA and ECDSA P-256 server and client leaves (ca/server/client .pem/.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _save(out_dir, "ca", ca_key, ca)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"bench-{name}")]), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _save(out_dir, name, key, cert)


def _save(out_dir: str, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with open(os.path.join(out_dir, f"{name}.key"), "wb") as f:
        f.write(key_pem)
    with open(os.path.join(out_dir, f"{name}.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(out_dir, f"{name}-bundle.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM) + key_pem)


# -- peer configurations ---------------------------------------------------------------------


def build_nginx_conf(prefix: str, servers: str) -> str:
    return f"""load_module {NGINX_STREAM_MODULE};
user root;
worker_processes 1;
daemon off;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 65536; }}
stream {{
{servers}}}
"""


def build_nginx_out(certs: str, server_ip: str) -> str:
    return "".join(
        f"""  server {{ listen 127.0.0.1:{NGINX_OUT[port]}; proxy_pass {server_ip}:{NGINX_IN[port]};
    tcp_nodelay on; proxy_ssl on; proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate {certs}/client.pem; proxy_ssl_certificate_key {certs}/client.key;
    proxy_ssl_trusted_certificate {certs}/ca.pem; proxy_ssl_verify on;
    proxy_ssl_name {SERVER_NAME}; }}
"""
        for port in (IPERF_PORT, ECHO_PORT)
    )


def build_nginx_in(certs: str) -> str:
    return "".join(
        f"""  server {{ listen {NGINX_IN[port]} ssl; proxy_pass 127.0.0.1:{port}; tcp_nodelay on;
    ssl_protocols TLSv1.3; ssl_certificate {certs}/server.pem;
    ssl_certificate_key {certs}/server.key;
    ssl_client_certificate {certs}/ca.pem; ssl_verify_client on; }}
"""
        for port in (IPERF_PORT, ECHO_PORT)
    )


def build_haproxy_cfg(server_ip: str) -> str:
    listens = "".join(
        f"listen p{port}\n  bind 127.0.0.1:{HAPROXY[port]}\n  server s1 {server_ip}:{port}\n"
        for port in (IPERF_PORT, ECHO_PORT)
    )
    return f"""global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
{listens}"""


# -- /proc readings --------------------------------------------------------------------------


def find_descendants(pids: Sequence[int]) -> list[int]:
    """`pids` and every process below them (nginx's worker under its master)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def read_cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime (all threads) of `pids` and their descendants."""
    total = 0
    for pid in find_descendants(pids):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK


def read_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# -- the benchmark ---------------------------------------------------------------------------


class DataPath:
    """Servers and C peers placed in the pods of a started `Bench`; measures one repetition."""

    def __init__(self, bench: Bench, settings: Settings) -> None:
        self.bench = bench
        self.settings = settings
        self.netbench = ""
        self._nginx: list[int] = []
        self._haproxy: list[int] = []

    def setup(self) -> None:
        b = self.bench
        certs = os.path.join(b.work_dir, "certs")
        os.makedirs(certs, exist_ok=True)
        write_certs(certs)
        self.netbench = build_netbench(b.work_dir)
        for ns in (PLAIN, MESH):
            for pod in ("server", "local"):
                b.spawn((ns, pod), ["iperf3", "-s", "-p", str(IPERF_PORT)], f"iperf3-{ns}-{pod}")
                b.spawn((ns, pod), [self.netbench, "s", str(ECHO_PORT)], f"echo-{ns}-{pod}")
                b.wait_listening((ns, pod), IPERF_PORT)
                b.wait_listening((ns, pod), ECHO_PORT)
        server_ip = b.ips[PLAIN, "server"]
        nginx_in = self._nginx_instance("nginx-in", (PLAIN, "server"), build_nginx_in(certs))
        nginx_out = self._nginx_instance(
            "nginx-out", (PLAIN, "client"), build_nginx_out(certs, server_ip)
        )
        self._nginx = [nginx_in, nginx_out]
        cfg = os.path.join(b.work_dir, "haproxy.cfg")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(build_haproxy_cfg(server_ip))
        hap = b.spawn((PLAIN, "client"), ["haproxy", "-db", "-f", cfg], "haproxy")
        self._haproxy = [hap.pid]
        for port in (*NGINX_OUT.values(), *HAPROXY.values()):
            b.wait_listening((PLAIN, "client"), port)
        for port in NGINX_IN.values():
            b.wait_listening((PLAIN, "server"), port)

    def _nginx_instance(self, name: str, where: tuple[str, str], servers: str) -> int:
        prefix = os.path.join(self.bench.work_dir, name)
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(build_nginx_conf(prefix, servers))
        proc = self.bench.spawn(where, ["nginx", "-p", prefix, "-c", conf], name)
        return proc.pid

    def paths(self) -> dict[str, Path]:
        b = self.bench
        direct = {p: p for p in (IPERF_PORT, ECHO_PORT)}
        ztunnels = b.ztunnel_pids
        return {
            "direct": Path((PLAIN, "client"), b.ips[PLAIN, "server"], direct, list),
            "mesh": Path((MESH, "client"), b.ips[MESH, "server"], direct, ztunnels),
            "mesh_same_node": Path((MESH, "client"), b.ips[MESH, "local"], direct, ztunnels),
            "passthrough": Path((MESH, "client"), b.ips[PLAIN, "server"], direct, ztunnels),
            "nginx": Path((PLAIN, "client"), "127.0.0.1", NGINX_OUT, lambda: list(self._nginx)),
            "haproxy": Path((PLAIN, "client"), "127.0.0.1", HAPROXY, lambda: list(self._haproxy)),
        }

    # -- one repetition --

    def measure_memory(self, log: Callable[[str], None]) -> dict[str, float]:
        """ztunnel memory, once, on fresh ztunnels before any other traffic.

        Not per repetition: freed memory stays in the process's heap, so after the first bulk
        transfer or the first 10,000 connections neither "idle" nor "growth per connection"
        would mean anything any more.
        """
        memory: dict[str, float] = {}
        try:
            memory["idle_rss_mib"] = self.measure_idle_rss()
            memory.update(self.measure_held_connections())
        except (BenchError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
            log(f"ztunnel memory: {exc}")
        return memory

    def run_repetition(self, log: Callable[[str], None]) -> dict[str, dict[str, float]]:
        rep: dict[str, dict[str, float]] = {}
        paths = self.paths()
        # Metric by metric, every configuration back to back or interleaved: the two sides of
        # each ratio are measured as close together in time as possible (the machine's speed
        # drifts).
        log("  latency")
        self._all_at_once(rep, self.measure_latencies, paths, log)
        log("  bulk")
        for name, path in paths.items():
            try:
                rep.setdefault(name, {}).update(self.measure_bulk(path))
            except (BenchError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
                log(f"  {name}: bulk: {exc}")
        log("  conn_rate")
        self._all_at_once(rep, self.measure_conn_rates, paths, log)
        return rep

    @staticmethod
    def _all_at_once(
        rep: dict[str, dict[str, float]],
        step: Callable[[Mapping[str, Path]], dict[str, dict[str, float]]],
        paths: Mapping[str, Path],
        log: Callable[[str], None],
    ) -> None:
        try:
            for name, figures in step(paths).items():
                rep.setdefault(name, {}).update(figures)
        except (BenchError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            log(f"  {step.__name__}: {exc}")

    def measure_idle_rss(self) -> float:
        """The larger of the two ztunnels' RSS with every bench pod enrolled and idle."""
        return max(read_rss_kib(pid) for pid in self.bench.ztunnel_pids()) / 1024

    def _iperf(self, path: Path, streams: int) -> tuple[float, float]:
        argv = ["iperf3", "-c", path.host, "-p", str(path.ports[IPERF_PORT]), "-J"]
        argv += ["-n", str(self.settings.bulk_bytes), "-P", str(streams)]
        out = self.bench.run(path.client, argv, timeout=300)
        doc = json.loads(out)
        if "error" in doc:
            raise BenchError(f"iperf3: {doc['error']}")
        received = doc["end"]["sum_received"]
        return float(received["bits_per_second"]) / 1e9, float(received["bytes"])

    def measure_bulk(self, path: Path) -> dict[str, float]:
        proxies = path.proxies()
        cpu0 = read_cpu_seconds(proxies) if proxies else 0.0
        gbps_1, moved = self._iperf(path, 1)
        cpu1 = read_cpu_seconds(proxies) if proxies else 0.0
        metrics = {"gbps_1": gbps_1}
        if proxies:
            metrics["cpu_s_per_gb"] = (cpu1 - cpu0) / (moved / 1e9)
        metrics["gbps_8"] = self._iperf(path, 8)[0]
        return metrics

    def measure_latencies(self, paths: Mapping[str, Path]) -> dict[str, dict[str, float]]:
        """Every path's ping-pong p50/p99, measured interleaved (see the module's docstring)."""
        results = self._interleaved("i", self.settings.pingpong_round_trips, LATENCY_BLOCK, paths)
        return {
            name: {"p50_us": float(doc["p50_us"]), "p99_us": float(doc["p99_us"])}
            for name, doc in results.items()
        }

    def measure_conn_rates(self, paths: Mapping[str, Path]) -> dict[str, dict[str, float]]:
        """Every path's new-connection rate and connect latency, measured interleaved."""
        results = self._interleaved("c", self.settings.new_connections, CONNECT_BLOCK, paths)
        return {
            name: {
                "conn_errors": float(doc["errors"]),
                "conns_per_s": float(doc["conns_per_s"]),
                "connect_p50_us": float(doc["p50_us"]),
                "connect_p99_us": float(doc["p99_us"]),
            }
            for name, doc in results.items()
        }

    def _interleaved(
        self, mode: str, count: int, block: int, paths: Mapping[str, Path]
    ) -> dict[str, dict[str, float]]:
        """`netbench i|c` over all `paths`, each dialled from its own pod's namespace.

        A path that fails outright (a broken ping-pong, no connection at all in the warm-up)
        ends the whole step for this repetition; netbench's error names its namespace file."""
        names = list(paths)
        argv = [self.netbench, mode, str(count), str(block)]
        for name in names:
            path = paths[name]
            netns_file = os.path.join(NETNS_RUN_DIR, self.bench.netns[path.client])
            argv += [netns_file, path.host, str(path.ports[ECHO_PORT])]
        # Each path gets its own connections from its own pod; where the program starts is moot.
        out = self.bench.run(paths[names[0]].client, argv, 120 + len(names) * 120)
        results = json.loads(out)["paths"]
        if len(results) != len(names):
            raise BenchError(f"netbench answered for {len(results)} paths, asked {len(names)}")
        return dict(zip(names, results, strict=True))

    def measure_held_connections(self) -> dict[str, float]:
        """ztunnel RSS growth per connection while N cross-node connections are held open."""
        pids = self.bench.ztunnel_pids()
        count = self.settings.held_connections
        before = [read_rss_kib(pid) for pid in pids]
        argv = [self.netbench, "h", self.bench.ips[MESH, "server"], str(ECHO_PORT), str(count)]
        proc = self.bench.spawn((MESH, "client"), argv, "holder", stdin=subprocess.PIPE)
        try:
            line = _read_line(proc, timeout=600)
            if not line.startswith("ready"):
                raise BenchError(f"holder did not get its connections open: {line!r}")
            # Every connection has carried an echo end to end: both ztunnels hold all of them.
            during = [read_rss_kib(pid) for pid in pids]
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            self.bench.stop(proc)
        growth = max(d - b for d, b in zip(during, before, strict=True))
        return {
            "kib_per_conn": growth / count,
            "held_connections": float(count),
            "held_rss_mib": max(during) / 1024,
        }


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"no answer within {timeout:g}s")
        return proc.stdout.readline().decode(errors="replace").strip()
    finally:
        sel.close()


def run(
    settings: Settings, repetitions: int, log: Callable[[str], None]
) -> list[dict[str, dict[str, float]]]:
    """Build the topology, run `repetitions` interleaved repetitions, tear everything down."""
    ensure_tools(log)
    results = []
    with Bench(log, redirect_mode=settings.redirect_mode) as bench:
        bench.start()
        data = DataPath(bench, settings)
        data.setup()
        log("ztunnel memory (idle, then with connections held open)")
        memory = data.measure_memory(log)
        for i in range(repetitions):
            log(f"repetition {i + 1}/{repetitions}")
            results.append(data.run_repetition(log))
        if memory:
            results[0]["ztunnel"] = memory
    return results
