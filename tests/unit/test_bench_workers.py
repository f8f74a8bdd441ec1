"""The workers section's projection for a 16-core host (pure: figures in, text out)."""

from __future__ import annotations

from bench.measure import L7Row
from bench.workers import projection


def row(cpu: float, failed: str | None = None) -> L7Row:
    return L7Row("r", cpu_us_per_req=cpu, failed=failed)


def test_projection_scales_the_two_worker_cost_to_16_cores_with_its_assumptions() -> None:
    text = projection([row(80.0), row(100.0), row(90.0)], [row(20.0), row(25.0), row(1.0, failed="boom")])
    # medians: 90 µs (ours) and 22.5 µs (HAProxy's two runs that did not fail)
    assert "about 177,778 keep-alive req/s" in text  # 16 x 10^6 / 90
    assert "about 711,111 (0.25x)" in text  # 16 x 10^6 / 22.5
    assert "(90.0 µs, the supervisor's share included)" in text and "(22.5 µs)" in text
    assert "Assumptions:" in text and "SO_REUSEPORT" in text


def test_no_projection_without_figures() -> None:
    assert "not made" in projection([row(80.0, failed="wrk: boom")], [row(20.0)])
    assert "not made" in projection([row(80.0)], [])
    assert "8-core" in projection([row(80.0)], [row(20.0)], cores=8)
