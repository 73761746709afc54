"""The waypoint's HTTP/1.1 engine against HAProxy in HTTP mode, on the same path in the same run.

Run (as root, it installs wrk/nginx/haproxy from Debian when missing): `python -m bench.l7
[--quick]`, or as part of `python -m bench all`. On 127.0.0.1: nginx (one worker) serves a
56-byte file; HAProxy (`mode http`, one thread, keep-alive both sides) and the waypoint engine
(one process on uvloop, a route table sending every request to nginx) each proxy it; `wrk -t1
-c64` drives each for `DURATION` seconds after a warm-up, interleaved, `REPETITIONS` times.
Direct requests to nginx are measured too, for scale.

Figures (ratios inside each repetition, median over them): `waypoint_rps_vs_haproxy` (target
>= 0.25) and `waypoint_p99_vs_haproxy` (p99 latency, target <= 10).

`python -m bench.l7 serve LISTEN_PORT UPSTREAM_PORT` is the waypoint side (used by the above).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

from bench import report
from bench.topology import BenchError, log_to_stderr

DURATION = 10
WARMUP = 2
REPETITIONS = 3
CONNECTIONS = 64
BODY = b"x" * 55 + b"\n"  # 56 bytes, as perf-baselines measured
TARGETS = {"waypoint_rps_vs_haproxy": 0.25, "waypoint_p99_vs_haproxy": 10.0}
_LATENCY_RE = re.compile(r"^\s+99%\s+([0-9.]+)(us|ms|s)\s*$", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def ensure_tools(log: object = log_to_stderr) -> None:
    missing = [
        pkg
        for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light"), ("haproxy", "haproxy"))
        if shutil.which(tool) is None
    ]
    if not missing:
        return
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", *missing]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, check=False)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"apt-get install {' '.join(missing)} failed: {done.stderr[-800:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_wrk(output: str) -> tuple[float, float]:
    """Requests per second and p99 latency in milliseconds from `wrk --latency` output; a run
    with failed requests or socket errors is an error, not a figure."""
    for problem in ("Non-2xx or 3xx responses", "Socket errors"):
        if problem in output:
            line = next(ln for ln in output.splitlines() if problem in ln)
            raise BenchError(f"wrk saw failures, the figures would mean nothing: {line.strip()}")
    rps = _RPS_RE.search(output)
    p99 = _LATENCY_RE.search(output)
    if rps is None or p99 is None:
        raise BenchError(f"unreadable wrk output: {output[-400:]!r}")
    return float(rps.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)]


@contextlib.contextmanager
def _process(argv: Sequence[str], ready: str | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if ready not in line:
                raise BenchError(f"{argv[0]} did not start: {line!r}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(port: int) -> None:
    import socket
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port}")


def _wrk(port: int, seconds: int) -> tuple[float, float]:
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    done = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/index.html"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {done.stderr[-400:]}")
    return parse_wrk(done.stdout)


def run(quick: bool) -> list[report.FigureResult]:
    ensure_tools()
    repetitions, seconds = (1, 3) if quick else (REPETITIONS, DURATION)
    work = tempfile.mkdtemp(prefix="bench-l7-")
    os.chmod(work, 0o755)  # nginx's worker runs as www-data and must read the file
    try:
        nginx_port, haproxy_port, waypoint_port = _free_port(), _free_port(), _free_port()
        os.makedirs(f"{work}/www")
        with open(f"{work}/www/index.html", "wb") as f:
            f.write(BODY)
        with open(f"{work}/nginx.conf", "w") as f:
            f.write(
                f"worker_processes 1; daemon off; pid {work}/nginx.pid;\n"
                f"error_log {work}/nginx-error.log;\n"
                "events { worker_connections 4096; }\n"
                f"http {{ access_log off; keepalive_requests 1000000;\n"
                f"  server {{ listen 127.0.0.1:{nginx_port}; root {work}/www; }} }}\n"
            )
        with open(f"{work}/haproxy.cfg", "w") as f:
            f.write(
                "global\n  nbthread 1\n  maxconn 4096\n"
                "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
                "  timeout server 30s\n  http-reuse always\n"
                f"frontend fe\n  bind 127.0.0.1:{haproxy_port}\n  default_backend be\n"
                f"backend be\n  server s1 127.0.0.1:{nginx_port}\n"
            )
        serve = [sys.executable, "-m", "bench.l7", "serve", str(waypoint_port), str(nginx_port)]
        with (
            _process(["nginx", "-c", f"{work}/nginx.conf"]),
            _process(["haproxy", "-f", f"{work}/haproxy.cfg", "-db"]),
            _process(serve, ready="ready"),
        ):
            for port in (nginx_port, haproxy_port, waypoint_port):
                _wait_listening(port)
            reps: list[dict[str, tuple[float, float]]] = []
            for i in range(repetitions):
                log_to_stderr(f"l7 repetition {i + 1}/{repetitions}")
                rep = {}
                for name, port in (
                    ("direct", nginx_port),
                    ("haproxy", haproxy_port),
                    ("waypoint", waypoint_port),
                ):
                    _wrk(port, WARMUP)
                    rep[name] = _wrk(port, seconds)
                    log_to_stderr(f"  {name}: {rep[name][0]:.0f} req/s, p99 {rep[name][1]:.2f} ms")
                reps.append(rep)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rps = tuple(r["waypoint"][0] / r["haproxy"][0] for r in reps)
    p99 = tuple(r["waypoint"][1] / r["haproxy"][1] for r in reps)
    return [
        report.FigureResult(
            "waypoint_rps_vs_haproxy",
            statistics.median(rps),
            rps,
            report.Goal.AT_LEAST,
            TARGETS["waypoint_rps_vs_haproxy"],
        ),
        report.FigureResult(
            "waypoint_p99_vs_haproxy",
            statistics.median(p99),
            p99,
            report.Goal.AT_MOST,
            TARGETS["waypoint_p99_vs_haproxy"],
        ),
    ]


# -- the waypoint side ---------------------------------------------------------------------------


def serve(listen_port: int, upstream_port: int) -> None:
    from meshcore.aio import runtime
    from meshcore.traffic import routes
    from waypoint import downstream, upstream
    from waypoint import engine as waypoint_engine

    table = routes.build_route_table(
        {
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {"hosts": ["*"], "http": [{"route": [{"destination": {"host": "nginx"}}]}]},
        }
    )

    class Tables:
        def find_route_table(self, host: str, port: int) -> routes.RouteTable:
            return table

    class Endpoints:
        def find_endpoints(
            self, host: str, subset: str | None, port: int | None
        ) -> Sequence[upstream.Endpoint]:
            return [("127.0.0.1", upstream_port)]

    async def main() -> None:
        engine = waypoint_engine.Engine(Tables(), Endpoints(), upstream.UpstreamPool())
        server = await asyncio.get_running_loop().create_server(
            lambda: downstream.DownstreamProtocol(engine, listen_port), "127.0.0.1", listen_port
        )
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    runtime.run(main(), collector_tuned=True)  # as `python -m waypoint` runs


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), int(argv[2]))
        return 0
    results = run("--quick" in argv)
    print(report.build_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
