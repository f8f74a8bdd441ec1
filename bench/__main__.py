"""``python -m bench [--quick] [--only SECTION] [--duration S]``: the side-by-side benchmark.

Starts nginx as three backends, then Fulcrum (lbnode), HAProxy and nginx as
balancers in front of them (and etcd for the cluster section), measures each,
prints a markdown report and writes it to ``bench/results/latest.md``. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bench import (
    accesslog,
    cluster,
    connections,
    metrics,
    policies,
    protections,
    report,
    routes,
    throughput,
    workers,
)
from bench.harness import Context, Options, Section

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "latest.md"


def sections() -> list[Section]:
    """The report, in order. Add a section here (or via ``report.OPTIONAL_MODULES``).

    The targets section reads what the l7 and l4 sections stored in ``ctx.results``,
    so it stays last. The policies, protections, metrics and cluster sections restart
    lbnode with their own configs on Fulcrum's ports (the l4 section starts the main
    one again), and carry their own targets; the cluster section also starts etcd.
    """
    return [
        Section("l7", "L7: HTTP/1.1 keep-alive, 100-byte responses", throughput.section_l7),
        Section("policies", "L7 per balancing policy (Fulcrum)", policies.section_policies),
        Section(
            "protections",
            "L7 with protections on vs off (Fulcrum)",
            protections.section_protections,
        ),
        Section(
            "metrics",
            "L7 with /metrics scraped every second vs never (Fulcrum)",
            metrics.section_metrics,
        ),
        Section("accesslog", "L7 with the access log on vs off (Fulcrum)", accesslog.section_access_log),
        Section("routes", "L7 with 1,000 routes vs 1 route (Fulcrum)", routes.section_routes),
        Section("workers", "L7 with 1 vs 2 workers (Fulcrum) and HAProxy nbthread 1 vs 2", workers.section_workers),
        Section("l4", "L4: bulk TCP, 64 MiB responses", throughput.section_l4),
        Section(
            "connections",
            "New connections per second, L7 and L4 (Fulcrum vs HAProxy)",
            connections.section_connections,
        ),
        Section(
            "cluster",
            "Cluster member vs standalone, and control-plane propagation (Fulcrum)",
            cluster.section_cluster,
        ),
        *report.optional_sections(),
        Section("targets", "Targets", throughput.section_targets),
    ]


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmark of Fulcrum, HAProxy and nginx (see docs/benchmarks.md).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short runs (3 s main L7 and cluster runs, 2 s per policy/protections run, 2 s L4) "
        "for a smoke check",
    )
    p.add_argument(
        "--only",
        choices=[n for n in names if n != "targets"],
        help="run one section (plus the targets)",
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of measured wrk load per balancer and per cluster-section run "
        "(default 10, 3 with --quick)",
    )
    p.add_argument(
        "--variant-duration",
        type=float,
        help="seconds of measured wrk load per run in the policies and protections sections "
        "(default 4, 2 with --quick)",
    )
    p.add_argument(
        "--bulk-duration",
        type=float,
        help="seconds of downloads per L4 path (default 4, 2 with --quick)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="interleaved runs per balancer in the l7, connections and tls sections, each row "
        "their median (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--variant-rounds",
        type=int,
        help="ABBA rounds (A, B, B, A) in the sections that compare two Fulcrum configs "
        "(protections, access log, metrics, routes, workers, cluster), each giving one ratio, "
        "the median reported (default 3, 1 with --quick)",
    )
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin wrk and the balancer to separate CPUs"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help=f"report path (default {RESULTS.relative_to(REPO)})",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    all_sections = sections()
    args = parse_args(argv, [s.name for s in all_sections])
    opts = Options(quick=args.quick, connections=args.connections, pin=not args.no_pin)
    if args.quick:
        opts.duration, opts.warmup, opts.bulk_duration = 3.0, 1.0, 2.0
        opts.variant_duration = 2.0
        opts.rounds = opts.variant_rounds = 1
    if args.duration is not None:
        opts.duration = max(1.0, args.duration)
    if args.variant_duration is not None:
        opts.variant_duration = max(1.0, args.variant_duration)
    if args.rounds is not None:
        opts.rounds = max(1, args.rounds)
    if args.variant_rounds is not None:
        opts.variant_rounds = max(1, args.variant_rounds)
    if args.bulk_duration is not None:
        opts.bulk_duration = max(0.5, args.bulk_duration)
    chosen = [s for s in all_sections if args.only is None or s.name in (args.only, "targets")]

    # SIGTERM (e.g. from make being stopped) must still run the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-bench-"))
    ctx = None
    try:
        ctx = Context(opts, REPO, tmp)
        text = report.run_sections(ctx, chosen)
    finally:
        if ctx is not None:
            ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    report.write_report(text, args.output)
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
