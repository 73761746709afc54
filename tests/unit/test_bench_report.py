"""bench.report: per-repetition ratios, their medians, the table and the results JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from bench import report


def _rep(**configs: Mapping[str, float]) -> dict[str, dict[str, float]]:
    return {name: dict(metrics) for name, metrics in configs.items()}


def _by_key(results: list[report.FigureResult]) -> dict[str, report.FigureResult]:
    return {r.key: r for r in results}


REP_A = _rep(
    direct={"gbps_1": 20.0, "p50_us": 20.0, "p99_us": 40.0},
    mesh={"gbps_1": 4.0, "cpu_s_per_gb": 3.0, "p50_us": 120.0, "p99_us": 240.0, "conns_per_s": 900},
    nginx={"gbps_1": 2.0, "cpu_s_per_gb": 3.0, "p50_us": 70.0, "p99_us": 140.0, "conns_per_s": 600},
    passthrough={"gbps_1": 12.0},
    haproxy={"gbps_1": 10.0},
    ztunnel={"kib_per_conn": 6.5, "idle_rss_mib": 48.0},
)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param("hbone_throughput_vs_nginx", 2.0, id="throughput-ratio"),
        pytest.param("hbone_cpu_per_gb_vs_nginx", 1.0, id="cpu-ratio"),
        # (120 - 20) / (70 - 20): only the latency the proxies add is compared.
        pytest.param("hbone_added_p50_vs_nginx", 2.0, id="added-p50-over-direct"),
        pytest.param("hbone_added_p99_vs_nginx", 2.0, id="added-p99-over-direct"),
        pytest.param("conn_rate_vs_nginx", 1.5, id="conn-rate"),
        pytest.param("passthrough_throughput_vs_haproxy", 1.2, id="passthrough-vs-haproxy"),
        pytest.param("ztunnel_kib_per_conn", 6.5, id="memory-per-conn-as-is"),
        pytest.param("ztunnel_idle_rss_mib", 48.0, id="idle-rss-as-is"),
    ],
)
def test_each_figure_is_computed_from_one_repetition(key: str, expected: float) -> None:
    result = _by_key(report.build_results([REP_A]))[key]
    assert result.value == pytest.approx(expected)
    assert result.samples == pytest.approx((expected,))


def test_every_issue_figure_is_defined_once() -> None:
    keys = [f.key for f in report.FIGURES]
    assert keys == [
        "hbone_throughput_vs_nginx",
        "hbone_cpu_per_gb_vs_nginx",
        "hbone_added_p50_vs_nginx",
        "hbone_added_p99_vs_nginx",
        "conn_rate_vs_nginx",
        "passthrough_throughput_vs_haproxy",
        "ztunnel_kib_per_conn",
        "ztunnel_idle_rss_mib",
    ]


def test_ratios_are_taken_inside_each_repetition_then_medianed() -> None:
    # A 3x slower repetition slows both sides: its ratio is unchanged. Pooling the raw numbers
    # first (median mesh / median nginx) would give 4/2 = 2.0 here too, so make them differ.
    reps = [
        _rep(mesh={"gbps_1": 4.0}, nginx={"gbps_1": 2.0}),  # 2.0
        _rep(mesh={"gbps_1": 1.0}, nginx={"gbps_1": 1.0}),  # 1.0
        _rep(mesh={"gbps_1": 9.0}, nginx={"gbps_1": 3.0}),  # 3.0
    ]
    result = _by_key(report.build_results(reps))["hbone_throughput_vs_nginx"]
    assert result.samples == pytest.approx((2.0, 1.0, 3.0))
    assert result.value == pytest.approx(2.0)


@pytest.mark.parametrize(
    "rep",
    [
        pytest.param(_rep(mesh={"gbps_1": 4.0}), id="reference-missing"),
        pytest.param(_rep(mesh={"gbps_1": 4.0}, nginx={"gbps_1": 0.0}), id="zero-denominator"),
        pytest.param(_rep(mesh={"gbps_1": float("nan")}, nginx={"gbps_1": 2.0}), id="nan"),
    ],
)
def test_unusable_repetition_is_left_out_not_guessed(rep: report.Repetition) -> None:
    reps = [rep, _rep(mesh={"gbps_1": 3.0}, nginx={"gbps_1": 2.0})]
    result = _by_key(report.build_results(reps))["hbone_throughput_vs_nginx"]
    assert result.samples == pytest.approx((1.5,))


def test_added_latency_needs_the_direct_baseline() -> None:
    rep = _rep(mesh={"p50_us": 100.0}, nginx={"p50_us": 50.0})
    result = _by_key(report.build_results([rep]))["hbone_added_p50_vs_nginx"]
    assert result.value is None
    assert result.meets_target is None


@pytest.mark.parametrize(
    ("goal", "target", "value", "meets"),
    [
        pytest.param(report.Goal.AT_LEAST, 1.0, 1.0, True, id="at-least-equal"),
        pytest.param(report.Goal.AT_LEAST, 1.0, 0.99, False, id="at-least-below"),
        pytest.param(report.Goal.AT_MOST, 1.5, 1.5, True, id="at-most-equal"),
        pytest.param(report.Goal.AT_MOST, 1.5, 1.51, False, id="at-most-above"),
    ],
)
def test_meets_target(goal: report.Goal, target: float, value: float, meets: bool) -> None:
    assert report.FigureResult("x", value, (value,), goal, target).meets_target is meets


def test_table_lists_each_figure_with_target_median_and_samples() -> None:
    reps = [REP_A, REP_A]
    results = report.build_results(reps) + report.build_extra_results({"ctl_ms": 12.0})
    lines = report.build_table(results).splitlines()
    assert lines[0].startswith("| figure | target | median |")
    row = next(line for line in lines if line.startswith("| hbone_throughput_vs_nginx "))
    assert row == "| hbone_throughput_vs_nginx | >= 1 | 2.00 | 2.00 / 2.00 | yes |"
    row = next(line for line in lines if line.startswith("| hbone_added_p50_vs_nginx "))
    assert row.endswith("| NO |")
    assert "| ctl_ms | - | 12.00 | 12.00 | - |" in lines


def test_json_has_figures_keyed_like_the_table() -> None:
    results = report.build_results([REP_A, _rep()])
    doc = json.loads(report.build_json(results, [REP_A, _rep()], {"quick": True}))
    assert list(doc["figures"]) == [f.key for f in report.FIGURES]
    assert doc["figures"]["hbone_throughput_vs_nginx"] == 2.0
    assert doc["targets"]["ztunnel_idle_rss_mib"] == "<= 60"
    assert doc["medians"]["mesh"]["gbps_1"] == 4.0
    assert doc["quick"] is True
    assert len(doc["repetitions"]) == 2


def test_json_writes_null_for_a_figure_nobody_measured() -> None:
    results = report.build_results([_rep()])
    doc = json.loads(report.build_json(results, [_rep()], {}))
    assert doc["figures"]["conn_rate_vs_nginx"] is None


def test_extra_results_take_their_module_upper_bounds() -> None:
    results = report.build_extra_results(
        {"snapshot_10k_s": 0.05, "controller_rss_mib": 350.0, "other": 1.0},
        {"snapshot_10k_s": 1.0, "controller_rss_mib": 300.0},
    )
    verdicts = {r.key: r.meets_target for r in results}
    assert verdicts == {"controller_rss_mib": False, "other": None, "snapshot_10k_s": True}
