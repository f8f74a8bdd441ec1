"""HTTP/2 beside HAProxy (issue 14): h2load over TLS, 100 streams per connection.

Both balancers get the same certificate (``bench.tls``), one thread (HAProxy ``nbthread 1``),
ALPN h2 to the client and HTTP/1.1 keep-alive to the same nginx backends; the client is
h2load (``-c 4 -m 100``: four connections, 100 concurrent streams each). The figure is
requests per CPU-second of the balancer's process tree, the issue's measure. A section of
``python -m bench`` (see ``report.OPTIONAL_MODULES``); everything on 127.0.0.1.
"""

from __future__ import annotations

import re
import subprocess

from bench.configs import HOST, SMALL_PATH
from bench.harness import Context, StartError, pick_port, ports_of
from bench.procstat import tree_cpu_seconds
from bench.tables import fmt_num, fmt_ratio, render_table
from bench.tls import _certificate, fulcrum_tls_config, haproxy_tls_config

# Issue 14's target: Fulcrum's requests per CPU-second >= 0.25x HAProxy's.
H2_TARGET = 0.25
CONNECTIONS = 4
STREAMS = 100


def _h2load(ctx: Context, port: int, seconds: float) -> tuple[int, int, float]:
    """(requests succeeded, requests failed, wall seconds) of one h2load run."""
    argv = ["h2load", f"-c{CONNECTIONS}", f"-m{STREAMS}", f"-D{max(1, round(seconds))}",
            f"https://{HOST}:{port}{SMALL_PATH}"]
    cp = subprocess.run(ctx._pinned(argv, ctx.client_cpu), capture_output=True, text=True, timeout=seconds + 60)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", cp.stdout)
    wall = re.search(r"finished in ([\d.]+)s", cp.stdout)
    if done is None or wall is None:
        raise StartError(f"h2load: {cp.stdout[-300:]} {cp.stderr[-300:]}")
    return int(done.group(1)), int(done.group(2)), float(wall.group(1))


def run(ctx: Context) -> str:
    directory = ctx.tmp / "http2"
    directory.mkdir(exist_ok=True)
    cert, key, pem = _certificate(directory)
    taken = set(ports_of(ctx.ports))
    f_port, f_admin, h_port = pick_port(28443, taken), pick_port(28444, taken), pick_port(28543, taken)
    try:
        ctx.backends()
        backends = list(ctx.ports.backends)
        fulcrum = ctx.fulcrum(fulcrum_tls_config(backends, f_port, f_admin, cert, key),  # https: h2 by default
                              key="fulcrum-h2", ready_ports=[f_port], admin_port=f_admin)
        conf = directory / "haproxy-h2.cfg"
        conf.write_text(haproxy_tls_config(backends, h_port, pem).replace("alpn http/1.1", "alpn h2,http/1.1"))
        haproxy = ctx.spawn("haproxy-h2", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
        haproxy.wait_ready([h_port], ctx.opts.start_timeout)
    except StartError as exc:
        return f"not run: {exc}\n"
    rows: list[list[object]] = []
    per_cpu: dict[str, float] = {}
    for name, port, pid in (("Fulcrum", f_port, fulcrum.pid), ("HAProxy", h_port, haproxy.pid)):
        try:
            _h2load(ctx, port, ctx.opts.warmup)
            cpu0 = tree_cpu_seconds([pid])
            ok, failed, wall = _h2load(ctx, port, ctx.opts.duration)
            cpu = tree_cpu_seconds([pid]) - cpu0
        except (StartError, subprocess.TimeoutExpired) as exc:
            rows.append([name, "-", "-", "-", f"failed: {exc}"])
            continue
        per_cpu[name] = ok / cpu if cpu > 0 else 0.0
        rows.append([name, fmt_num(ok / wall, 0, thousands=True), fmt_num(per_cpu[name], 0, thousands=True), ok,
                     f"{failed} failed" if failed else ""])
    ctx.stop("fulcrum-h2")
    ctx.stop("haproxy-h2")
    f, h = per_cpu.get("Fulcrum"), per_cpu.get("HAProxy")
    ratio = f / h if f and h else None
    verdict = "-" if ratio is None else ("met" if ratio >= H2_TARGET else "not met")
    return (
        render_table(["balancer", "req/s", "req per CPU-second", "requests", "note"], rows, "lrrrl") + "\n\n"
        + render_table(["target", "Fulcrum", "HAProxy", "ratio", "goal", "status"],
                       [["h2load TLS, 100 streams/conn: req per CPU-second", fmt_num(f, 0, thousands=True),
                         fmt_num(h, 0, thousands=True), fmt_ratio(f, h), f">= {H2_TARGET}x", verdict]], "lrrrll")
        + "\n"
    )
