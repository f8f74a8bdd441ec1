"""The ``metrics`` section: Fulcrum with its admin ``/metrics`` scraped every second, as
Prometheus would, against never scraped (issue 12; runs never, scraped, scraped, never).
"""

from __future__ import annotations

import http.client
import threading

from bench.harness import Context, http_get
from bench.measure import L7Row, progress
from bench.variants import (
    BASELINE,
    CORE_NOTE,
    abba_labelled,
    compare_runs,
    order_text,
    render_comparison,
    render_runs,
    run_variant,
    spread_text,
    variant_load_text,
)

# Issue 12: CPU per request with /metrics scraped every second at most 3 % above never scraped
# (req/s held to the same); the scrape interval is Prometheus' usual 15 s made 15x harsher.
METRICS_TARGET = 0.03
SCRAPE_INTERVAL = 1.0


class Scraper:
    """GET /metrics on ``port`` every ``interval`` seconds in a thread, as Prometheus would,
    while the block runs (refused connections while lbnode starts are skipped)."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL) -> None:
        self.port, self.interval = port, interval
        self.scrapes = 0
        self.failures = 0
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                status, body = http_get(self.port, "/metrics")
            except (OSError, http.client.HTTPException):
                self.failures += 1
                continue
            if status == 200:
                self.scrapes += 1
                self.last_bytes = len(body)
            else:
                self.failures += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def metrics_runs(rounds: int = 1) -> list[tuple[str, bool]]:
    """Never scraped, scraped, scraped, never scraped, ``rounds`` times (ABBA, as the
    protections section)."""
    return abba_labelled("never scraped", False, f"scraped every {SCRAPE_INTERVAL:g} s", True, rounds)


def section_metrics(ctx: Context) -> str:
    ctx.backends()
    rows: list[L7Row] = []
    scrapers: list[Scraper] = []
    runs = metrics_runs(ctx.opts.variant_rounds)
    for i, (label, scraped) in enumerate(runs):
        if scraped:
            with Scraper(ctx.ports.fulcrum_admin) as scraper:
                rows.append(run_variant(ctx, label, BASELINE, f"fulcrum-metrics-{i}"))
            scrapers.append(scraper)
        else:
            rows.append(run_variant(ctx, label, BASELINE, f"fulcrum-metrics-{i}"))
        progress(rows[-1])
    never = [r for r, (_, s) in zip(rows, runs, strict=True) if not s]
    scraped_rows = [r for r, (_, s) in zip(rows, runs, strict=True) if s]
    comparison = compare_runs(never, scraped_rows, METRICS_TARGET, "never scraped", "scraped")
    ctx.results["metrics_comparison"] = comparison
    size = max((s.last_bytes for s in scrapers), default=0)
    return (
        render_runs(rows)
        + "\n\n"
        + render_comparison(comparison, "never", "scraped")
        + "\n\n"
        + f"Target: with GET /metrics every {SCRAPE_INTERVAL:g} s, CPU per request at most "
        f"{METRICS_TARGET * 100:.0f} % above (and req/s at most that far below) the runs never "
        "scraped. The scrapes' cost is in lbnode's CPU (the scraper is a thread of the bench "
        f"process): {sum(s.scrapes for s in scrapers)} scrapes answered, "
        f"{sum(s.failures for s in scrapers)} refused (while lbnode started), {size} bytes each. "
        + variant_load_text(ctx)
        + order_text("never", "scraped", ctx.opts.variant_rounds)
        + spread_text(never, "Never scraped")
        + " "
        + spread_text(scraped_rows, "Scraped")
        + CORE_NOTE
    )
