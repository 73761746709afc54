"""`python -m bench all [--quick] [--repetitions N]` (as root): the mesh's benchmark figures.

- ``dataplane``: builds its own 2-node playground and measures ztunnel against direct traffic,
  an nginx stream mTLS pair and HAProxy in TCP mode (see `bench.measure`);
- ``controller``: the control plane: the controller figures (`bench.controller`) and the time
  from `meshctl apply` of a policy to its enforcement on 3 nodes (`bench.policy`);
- ``l7``: the waypoint's HTTP/1.1 engine against HAProxy in HTTP mode, with wrk (`bench.l7`);
- ``all``: all three.

Prints the table of figures (median over repetitions of ratios taken inside one repetition) and
writes ``bench/results/<UTC timestamp>.json`` with a top-level ``figures`` object. ``--quick``
runs one repetition with smaller transfers: a smoke check, not figures to quote.
``--redirect-mode ebpf`` captures the data-plane benchmark's mesh pods with the eBPF programs
instead of iptables rules (the node agents' REDIRECT_MODE).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
from collections.abc import Sequence

from bench import report
from bench.topology import BenchError, log_to_stderr
from meshcore import envconfig

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_REPETITIONS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=("all", "dataplane", "controller", "l7"))
    parser.add_argument("--quick", action="store_true", help="one short repetition (smoke check)")
    parser.add_argument(
        "--repetitions",
        type=int,
        default=None,
        help=f"interleaved repetitions (default {DEFAULT_REPETITIONS}, at least 3 for figures)",
    )
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where the JSON file goes")
    parser.add_argument(
        "--redirect-mode",
        choices=envconfig.REDIRECT_MODES,
        default="iptables",
        help="how the data-plane benchmark's mesh pods are captured (default iptables)",
    )
    return parser


def run_control_plane(quick: bool) -> list[report.FigureResult]:
    """The controller figures and apply -> enforcement of a policy on 3 nodes, with targets."""
    from bench import controller, policy  # each starts its own processes: only when asked

    results = report.build_extra_results(controller.run(quick), controller.TARGETS)
    results += report.build_extra_results(policy.run(quick), policy.TARGETS)
    return results


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repetitions = 1 if args.quick else (args.repetitions or DEFAULT_REPETITIONS)
    if repetitions < 1:
        print("--repetitions must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("python -m bench must run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    # `kill` gets the same clean-up as Ctrl-C: unwinding runs the topology's teardown, which
    # stops every process we started inside the pods before the playground goes.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    reps: list[dict[str, dict[str, float]]] = []
    results: list[report.FigureResult] = []
    if args.suite in ("all", "dataplane"):
        from bench import measure  # needs `cryptography` and the host tools: only when asked

        settings = (
            measure.Settings.quick(args.redirect_mode)
            if args.quick
            else measure.Settings(redirect_mode=args.redirect_mode)
        )
        try:
            reps = measure.run(settings, repetitions, log_to_stderr)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        results += report.build_results(reps)
    if args.suite in ("all", "controller"):
        results += run_control_plane(args.quick)
    if args.suite in ("all", "l7"):
        from bench import l7

        try:
            results += l7.run(args.quick)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    print(report.build_table(results))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{stamp}.json")
    meta = {
        "suite": args.suite,
        "quick": args.quick,
        "repetition_count": repetitions,
        "redirect_mode": args.redirect_mode,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(report.build_json(results, reps, meta))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
