"""HTTP/2 beside HAProxy (issue 14): h2load over TLS, 100 streams per connection.

Both balancers get the same certificate (``bench.tls``), one thread (HAProxy ``nbthread 1``),
ALPN h2 to the client and HTTP/1.1 keep-alive to the same nginx backends; the client is
h2load (``-c 4 -m 100``: four connections, 100 concurrent streams each). The figure is
requests per CPU-second of the balancer's process tree, the issue's measure. A section of
``python -m bench`` (see ``report.OPTIONAL_MODULES``); everything on 127.0.0.1.

Then gRPC: unary calls/s of a grpcio client (``GRPC_THREADS`` threads on one channel, one
call at a time each) to a grpcio server, directly and through Fulcrum (h2c listener, pool
``protocol = "h2"``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from bench.configs import HOST, SMALL_PATH
from bench.harness import Context, StartError, pick_port, port_accepts, ports_of
from bench.procstat import tree_cpu_seconds
from bench.tables import fmt_num, fmt_ratio, render_table
from bench.tls import _certificate, fulcrum_tls_config, haproxy_tls_config

# Issue 14's target: Fulcrum's requests per CPU-second >= 0.25x HAProxy's.
H2_TARGET = 0.25
CONNECTIONS = 4
STREAMS = 100
GRPC_THREADS = 8

# A grpcio server answering /bench.Echo/Say with its request (generic handler, no .proto).
GRPC_SERVER = """
import sys, time, grpc
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
handler = grpc.method_handlers_generic_handler(
    "bench.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""
# GRPC_THREADS threads calling Say for argv[2] seconds; prints the calls made.
GRPC_CLIENT = """
import sys, threading, time, grpc
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
say = channel.unary_unary("/bench.Echo/Say")
say(b"warm", timeout=10)
end = time.monotonic() + float(sys.argv[2])
counts = []
def loop():
    n = 0
    while time.monotonic() < end:
        say(b"x" * 100, timeout=10)
        n += 1
    counts.append(n)
threads = [threading.Thread(target=loop) for _ in range(int(sys.argv[3]))]
started = time.monotonic()
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(counts), time.monotonic() - started)
"""


def fulcrum_grpc_config(backend: int, port: int, admin: int) -> str:
    return f"""[node]
id = "bench-grpc"
admin = "{HOST}:{admin}"
workers = 1

[[pools]]
name = "grpc"
protocol = "h2"
  [[pools.backends]]
  address = "{HOST}:{backend}"

[[listeners]]
name = "grpc"
protocol = "http"
bind = "{HOST}:{port}"
pool = "grpc"
  [listeners.http2]
  enabled = true
"""


def _grpc_calls(ctx: Context, port: int, seconds: float) -> float:
    argv = [sys.executable, "-c", GRPC_CLIENT, str(port), str(seconds), str(GRPC_THREADS)]
    cp = subprocess.run(ctx._pinned(argv, ctx.client_cpu), capture_output=True, text=True, timeout=seconds + 60)
    try:
        calls, wall = cp.stdout.split()
        return int(calls) / float(wall)
    except ValueError:
        raise StartError(f"grpc client: {cp.stdout[-200:]} {cp.stderr[-300:]}") from None


def run_grpc(ctx: Context) -> str:
    taken = set(ports_of(ctx.ports))
    server_port, f_port, f_admin = pick_port(28601, taken), pick_port(28602, taken), pick_port(28603, taken)
    try:
        server = ctx.spawn("grpc-server", [sys.executable, "-c", GRPC_SERVER, str(server_port)])
        # grpcio listens on a dual-stack socket (::ffff:127.0.0.1), which wait_ready's IPv4
        # listening-port check does not see: wait for it to accept instead.
        deadline = time.monotonic() + ctx.opts.start_timeout
        while not port_accepts(server_port):
            if server.exited() is not None or time.monotonic() > deadline:
                raise StartError(f"grpc server not accepting on {HOST}:{server_port}")
            time.sleep(0.1)
        ctx.fulcrum(fulcrum_grpc_config(server_port, f_port, f_admin), key="fulcrum-grpc", ready_ports=[f_port],
                    admin_port=f_admin)
    except StartError as exc:
        return f"not run: {exc}\n"
    rates: dict[str, float] = {}
    rows: list[list[object]] = []
    for name, port in (("direct", server_port), ("through Fulcrum", f_port)):
        try:
            _grpc_calls(ctx, port, ctx.opts.warmup)
            rates[name] = _grpc_calls(ctx, port, ctx.opts.duration)
            rows.append([name, fmt_num(rates[name], 0, thousands=True)])
        except (StartError, subprocess.TimeoutExpired) as exc:
            rows.append([name, f"failed: {exc}"])
    ctx.stop("fulcrum-grpc")
    ctx.stop("grpc-server")
    d, f = rates.get("direct"), rates.get("through Fulcrum")
    return (render_table([f"gRPC unary ({GRPC_THREADS} client threads)", "calls/s"], rows, "lr")
            + f"\n\nThrough Fulcrum / direct: {fmt_ratio(f, d)} (no target in the issue).\n")


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
        + "\n\n" + run_grpc(ctx)
    )


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from bench.harness import Options

    with tempfile.TemporaryDirectory() as tmp:
        context = Context(Options(duration=5.0, warmup=1.0), Path(__file__).resolve().parent.parent, Path(tmp))
        try:
            print(run(context))
        finally:
            context.close()
