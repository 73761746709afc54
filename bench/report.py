"""Turning raw benchmark measurements into the figures of `python -m bench all` (pure).

A *repetition* holds one measurement of every configuration, taken back to back:
``{config: {metric: value}}``. Each figure is a ratio computed inside one repetition (so a slow
moment of the shared machine hits both sides of a ratio alike); the reported figure is the
median of those per-repetition ratios. A ratio whose inputs are missing or whose denominator is
not positive is left out of that repetition rather than guessed.

Configurations (names used by `bench.measure`): ``direct`` (client pod to server pod, no
mesh), ``mesh`` (enrolled pods on two nodes: HBONE between the two ztunnels), ``mesh_same_node``,
``passthrough`` (enrolled client to a pod outside the mesh: one ztunnel hop, plain TCP),
``nginx`` (nginx stream mTLS pair), ``haproxy`` (HAProxy TCP, one hop) and ``ztunnel`` (memory).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Repetition = Mapping[str, Mapping[str, float]]


class Goal(enum.Enum):
    AT_LEAST = ">="
    AT_MOST = "<="


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    key: str
    goal: Goal
    target: float
    compute: Callable[[Repetition], float | None]
    description: str


@dataclasses.dataclass(frozen=True, slots=True)
class FigureResult:
    key: str
    value: float | None  # median over the repetitions that had it; None when none did
    samples: tuple[float, ...]
    goal: Goal | None = None  # None for figures whose target this module does not know
    target: float | None = None

    @property
    def meets_target(self) -> bool | None:
        if self.value is None or self.goal is None or self.target is None:
            return None
        if self.goal is Goal.AT_LEAST:
            return self.value >= self.target
        return self.value <= self.target


def _metric(rep: Repetition, config: str, metric: str) -> float | None:
    value = rep.get(config, {}).get(metric)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _over(config: str, reference: str, metric: str) -> Callable[[Repetition], float | None]:
    def compute(rep: Repetition) -> float | None:
        return _ratio(_metric(rep, config, metric), _metric(rep, reference, metric))

    return compute


def _added_over(config: str, reference: str, metric: str) -> Callable[[Repetition], float | None]:
    """(config - direct) / (reference - direct): compares only what the proxies add."""

    def compute(rep: Repetition) -> float | None:
        base = _metric(rep, "direct", metric)
        ours, theirs = _metric(rep, config, metric), _metric(rep, reference, metric)
        if base is None or ours is None or theirs is None:
            return None
        return _ratio(ours - base, theirs - base)

    return compute


def _value(config: str, metric: str) -> Callable[[Repetition], float | None]:
    def compute(rep: Repetition) -> float | None:
        return _metric(rep, config, metric)

    return compute


FIGURES: tuple[Figure, ...] = (
    Figure(
        "hbone_throughput_vs_nginx",
        Goal.AT_LEAST,
        1.0,
        _over("mesh", "nginx", "gbps_1"),
        "HBONE pair throughput (1 stream) / nginx mTLS pair",
    ),
    Figure(
        "hbone_cpu_per_gb_vs_nginx",
        Goal.AT_MOST,
        1.1,
        _over("mesh", "nginx", "cpu_s_per_gb"),
        "proxy CPU-s per GB, both ztunnels / both nginx",
    ),
    Figure(
        "hbone_added_p50_vs_nginx",
        Goal.AT_MOST,
        1.5,
        _added_over("mesh", "nginx", "p50_us"),
        "p50 latency added over direct, HBONE pair / nginx pair",
    ),
    Figure(
        "hbone_added_p99_vs_nginx",
        Goal.AT_MOST,
        1.5,
        _added_over("mesh", "nginx", "p99_us"),
        "p99 latency added over direct, HBONE pair / nginx pair",
    ),
    Figure(
        "conn_rate_vs_nginx",
        Goal.AT_LEAST,
        1.5,
        _over("mesh", "nginx", "conns_per_s"),
        "new connections/s, mesh / nginx pair",
    ),
    Figure(
        "passthrough_throughput_vs_haproxy",
        Goal.AT_LEAST,
        1.0,
        _over("passthrough", "haproxy", "gbps_1"),
        "plain passthrough throughput / HAProxy TCP mode",
    ),
    Figure(
        "ztunnel_kib_per_conn",
        Goal.AT_MOST,
        10.0,
        _value("ztunnel", "kib_per_conn"),
        "ztunnel KiB per open proxied connection",
    ),
    Figure(
        "ztunnel_idle_rss_mib",
        Goal.AT_MOST,
        60.0,
        _value("ztunnel", "idle_rss_mib"),
        "ztunnel RSS, pods enrolled and idle",
    ),
)


def build_results(
    repetitions: Sequence[Repetition], figures: Sequence[Figure] = FIGURES
) -> list[FigureResult]:
    results = []
    for fig in figures:
        samples = tuple(s for s in (fig.compute(rep) for rep in repetitions) if s is not None)
        value = statistics.median(samples) if samples else None
        results.append(FigureResult(fig.key, value, samples, fig.goal, fig.target))
    return results


def build_extra_results(
    values: Mapping[str, float], upper_bounds: Mapping[str, float] | None = None
) -> list[FigureResult]:
    """Figures computed elsewhere (the controller and policy benchmarks): one value each, with
    the module's own upper bound as target when it gives one."""
    bounds = upper_bounds or {}
    return [
        FigureResult(
            key,
            float(v),
            (float(v),),
            Goal.AT_MOST if key in bounds else None,
            bounds.get(key),
        )
        for key, v in sorted(values.items())
    ]


def build_medians(repetitions: Sequence[Repetition]) -> dict[str, dict[str, float]]:
    """Median of every raw metric over the repetitions (for reading, not for the ratios)."""
    gathered: dict[str, dict[str, list[float]]] = {}
    for rep in repetitions:
        for config, metrics in rep.items():
            for metric, value in metrics.items():
                if math.isfinite(value):
                    gathered.setdefault(config, {}).setdefault(metric, []).append(value)
    return {
        config: {m: round(statistics.median(v), 3) for m, v in sorted(metrics.items())}
        for config, metrics in sorted(gathered.items())
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"


def build_table(results: Sequence[FigureResult]) -> str:
    """Markdown table: figure, target, median, per-repetition values, verdict."""
    lines = [
        "| figure | target | median | per repetition | meets target |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        target = f"{r.goal.value} {r.target:g}" if r.goal and r.target is not None else "-"
        samples = " / ".join(_fmt(s) for s in r.samples) or "-"
        verdict = {True: "yes", False: "NO", None: "-"}[r.meets_target]
        lines.append(f"| {r.key} | {target} | {_fmt(r.value)} | {samples} | {verdict} |")
    return "\n".join(lines)


def build_json(
    results: Sequence[FigureResult],
    repetitions: Sequence[Repetition],
    meta: Mapping[str, Any],
) -> str:
    """The results file: `figures` (key -> median, rounded), then everything behind them."""
    doc: dict[str, Any] = {
        "figures": {r.key: None if r.value is None else round(r.value, 3) for r in results},
        "samples": {r.key: [round(s, 4) for s in r.samples] for r in results},
        "targets": {
            r.key: f"{r.goal.value} {r.target:g}"
            for r in results
            if r.goal is not None and r.target is not None
        },
        "medians": build_medians(repetitions),
        "repetitions": [{c: dict(m) for c, m in rep.items()} for rep in repetitions],
        **dict(meta),
    }
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
