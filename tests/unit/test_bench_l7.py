"""bench.l7 reads wrk's report: requests per second and the p99 line, in any unit."""

from __future__ import annotations

import pytest

from bench import l7
from bench.topology import BenchError

WRK = """\
Running 10s test @ http://127.0.0.1:8080/index.html
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.32ms  412.05us  12.41ms   91.12%
    Req/Sec    48.71k     2.10k   52.12k    70.00%
  Latency Distribution
     50%    1.25ms
     75%    1.40ms
     90%    1.62ms
     99%  {p99}
  484612 requests in 10.00s, 119.28MB read
Requests/sec:  48447.21
Transfer/sec:     11.92MB
"""


@pytest.mark.parametrize(("p99", "ms"), [("2.85ms", 2.85), ("850.00us", 0.85), ("1.20s", 1200.0)])
def test_wrk_report_is_read_in_milliseconds(p99: str, ms: float) -> None:
    rps, latency = l7.parse_wrk(WRK.format(p99=p99))
    assert rps == pytest.approx(48447.21)
    assert latency == pytest.approx(ms)


def test_an_unreadable_report_is_an_error_not_a_zero() -> None:
    with pytest.raises(BenchError, match="unreadable wrk output"):
        l7.parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused")


@pytest.mark.parametrize(
    "line",
    ["  Non-2xx or 3xx responses: 12", "  Socket errors: connect 0, read 3, write 0, timeout 0"],
)
def test_failed_requests_make_the_run_an_error(line: str) -> None:
    with pytest.raises(BenchError, match="wrk saw failures"):
        l7.parse_wrk(WRK.format(p99="2.85ms").replace("Requests/sec", f"{line}\nRequests/sec"))
