"""Time from `meshctl apply` of an AuthorizationPolicy to its enforcement on every node.

Run (as root): `python -m bench.policy [repetitions]` (default 30). It starts its own 3-node
playground (prefix `mb<hex>`, state under /tmp, removed at the end), then repeatedly applies a
new DENY policy the way `meshctl apply` does (same parsing and API calls, in this process) and
watches each node's ztunnel admin endpoint (`/config_dump`, polled every few milliseconds from
inside the node's network namespace) until all three hold it. The policy is deleted again
between repetitions (not timed).

Printed: p50 / p99 / max milliseconds from the start of the apply to the last node having the
policy. "Enforced" means the ztunnel holds it; from then on it decides new connections with it
and its policy watcher closes what it newly denies (see `bench.recheck` for that part).
Writes `bench/results/<UTC timestamp>-policy.json` with `figures.policy_enforced_p99_ms`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import io as io_module
import json
import os
import secrets
import statistics
import sys
import time
import urllib.request

from meshcore import netns
from meshcore.kube import client as kube_client
from meshctl import commands
from meshctl.playground import control, paths, record

NODES = 3
NAMESPACE = "bench-policy"
POLL_SECONDS = 0.002
TIMEOUT = 30.0


def _policy(name: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  action: DENY
  rules:
    - to:
        - operation:
            ports: ["9999"]
"""


class NodeWatcher:
    """Polls one node's ztunnel config dump from inside that node's network namespace."""

    def __init__(self, netns_name: str) -> None:
        fd = os.open(f"/run/netns/{netns_name}", os.O_RDONLY)
        try:
            self._thread = netns.NetnsThread(fd, name=f"bench-{netns_name}")
        finally:
            os.close(fd)

    def wait_for(self, key: tuple[str, str], deadline: float) -> float:
        """Monotonic time at which the policy was first seen."""

        def poll() -> float:
            while time.monotonic() < deadline:
                with urllib.request.urlopen("http://127.0.0.1:15000/config_dump", timeout=5) as r:
                    dump = json.load(r)
                if any((p["namespace"], p["name"]) == key for p in dump.get("policies", [])):
                    return time.monotonic()
                time.sleep(POLL_SECONDS)
            raise TimeoutError(f"policy {key} did not arrive within {TIMEOUT:g}s")

        return self._thread.call(poll)

    def close(self) -> None:
        self._thread.close()


async def _measure(state_dir: str, nodes: list[record.NodeRecord], repetitions: int) -> list[float]:
    api = kube_client.ApiClient(f"unix://{paths.Paths(state_dir).api_socket}")
    watchers = [NodeWatcher(n.netns) for n in nodes]
    io = commands.Streams(io_module.StringIO(), sys.stderr)  # apply's "created" lines: unused
    pool = concurrent.futures.ThreadPoolExecutor(len(watchers))
    loop = asyncio.get_running_loop()
    latencies = []
    try:
        ns_doc = f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"
        await commands.apply(api, await commands.load_manifests(api, [(ns_doc, "ns")], None), io)
        for i in range(repetitions):
            name = f"deny-{i}"
            items = await commands.load_manifests(api, [(_policy(name), "policy")], None)
            deadline = time.monotonic() + TIMEOUT
            waits = [
                loop.run_in_executor(pool, w.wait_for, (NAMESPACE, name), deadline)
                for w in watchers
            ]
            started = time.monotonic()
            await commands.apply(api, items, io)
            seen = await asyncio.gather(*waits)
            latencies.append((max(seen) - started) * 1000)
            print(f"  {i + 1}/{repetitions}: {latencies[-1]:.1f} ms", file=sys.stderr, flush=True)
            await commands.delete_items(api, items, io, wait=True, timeout=TIMEOUT)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for w in watchers:
            w.close()
        await api.close()
    return latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


TARGETS = {"policy_enforced_p99_ms": 250.0}


def measure(repetitions: int) -> list[float]:
    """Milliseconds from apply to enforcement on every node, one per repetition."""
    token = secrets.token_hex(3)
    opts = control.UpOptions(
        state_dir=f"/tmp/mb-{token}",
        nodes=NODES,
        prefix=f"mb{token}",
        host_access=False,
        timeout=180.0,
        log_level="info",
        owner_pid=os.getpid(),
    )
    print(f"Starting a {NODES}-node playground ({opts.prefix})...", file=sys.stderr, flush=True)
    proc = control.launch_supervisor(opts, dict(os.environ))
    try:
        rec = control.wait_until_ready(opts.state_dir, proc, opts.timeout)
        assert rec.topology is not None
        return asyncio.run(_measure(opts.state_dir, list(rec.topology.nodes), repetitions))
    finally:
        control.shut_down_launched(proc, opts.state_dir, opts.prefix)


def run(quick: bool) -> dict[str, float]:
    """`figures` for `python -m bench`: the p99 over 10 (quick) or 30 repetitions."""
    return {"policy_enforced_p99_ms": round(_percentile(measure(10 if quick else 30), 0.99), 1)}


def main() -> int:
    if os.geteuid() != 0:
        print("bench.policy must run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    latencies = measure(repetitions)
    p50, p99 = statistics.median(latencies), _percentile(latencies, 0.99)
    print(f"policy apply -> enforced on {NODES} nodes, {repetitions} repetitions:")
    print(f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {max(latencies):.1f} ms")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stamp}-policy.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "figures": {"policy_enforced_p99_ms": round(p99, 1)},
                "policy_enforced_ms": {"p50": round(p50, 1), "samples": latencies},
                "nodes": NODES,
            },
            f,
            indent=2,
        )
    print(f"  written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
