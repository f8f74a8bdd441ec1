"""The pure parts of bench.connections: the per-core rate ratio, the status, the table."""

from __future__ import annotations

from bench.connections import ConnRow, rate_ratio, render_connections, status_of
from bench.measure import L7Row


def _row(cpu_f: float | None, cpu_h: float | None, errors: int = 0, failed: str | None = None) -> ConnRow:
    f = L7Row("Fulcrum", failed=failed, rps=1000.0, cpu_us_per_req=cpu_f, requests=10_000, errors=errors)
    h = L7Row("HAProxy", rps=3000.0, cpu_us_per_req=cpu_h, requests=30_000)
    return ConnRow("L7", f, h, 0.6)


def test_rate_ratio_is_haproxy_cpu_over_fulcrum_cpu() -> None:
    assert rate_ratio(200.0, 60.0) == 0.3
    assert rate_ratio(None, 60.0) is None
    assert rate_ratio(100.0, 0.0) is None


def test_status_against_the_per_core_goal() -> None:
    assert status_of(_row(100.0, 60.0)) == "met"  # 0.6x
    assert status_of(_row(200.0, 60.0)) == "not met"
    assert status_of(_row(100.0, 60.0, errors=500)) == "not met (500 errors in 10000 requests)"
    assert status_of(_row(None, 60.0, failed="lbnode not installed")) == "not measured"


def test_table_gives_the_ratio_and_goal_on_fulcrum_rows_only() -> None:
    text = render_connections([_row(200.0, 60.0)])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    assert cells == [
        ["L7", "Fulcrum", "1,000", "200.0", "0.30x", ">= 0.6x", "not met", "0"],
        ["L7", "HAProxy", "3,000", "60.0", "—", "—", "—", "0"],
    ]
