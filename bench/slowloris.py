"""Ordinary clients beside 10,000 slowloris connections: Fulcrum and HAProxy, one after the other.

For each balancer and round: an ordinary keep-alive client and an ordinary new-connection
client, each alone (unloaded), then again while ``tests.slowclients`` holds ``ATTACKERS``
connections open sending a request head one byte every 2-5 s; the balancer's RSS and open
descriptors with the attackers held. Issue 10's target: the loaded p99 under 2x the
unloaded one, memory bounded. Talks to 127.0.0.1 only.

The clients are closed loops with a pause between requests (an ordinary client, not a load
generator: the balancer is mostly idle, so the figure is what the attackers add). A closed
loop sees a stall of the balancer once per stall, not once per request it would have
delayed: the p99 here is the share of requests that met a busy loop, and ``max`` shows the
longest stall a request met.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.configs import HOST, SMALL_BODY, SMALL_PATH
from bench.harness import Context, Proc, StartError, http_get, pick_port
from bench.tables import fmt_num, render_table

ATTACKERS = 10_000  # the figure
INTERVAL = (2.0, 5.0)  # seconds between an attacker's bytes: "one byte every few seconds"
# Both balancers give a request head this long (Fulcrum's default is 10 s, HAProxy's none):
# long enough that no attacker is cut and reconnects while a round measures, so the 10,000
# are all held open at once, the worst case for memory.
HEAD_TIMEOUT_S = 120
# Room above the attackers for the ordinary clients; under the host's hard descriptor limit
# (20,000 here) with a descriptor per held attacker and a few hundred spare.
MAX_CONNECTIONS = ATTACKERS + 500
PHASE_S = 2 * INTERVAL[1]  # each client measures this long: every attacker sends twice in it
PAUSE_S = 0.002  # between an ordinary client's requests
ROUNDS = 2  # unloaded / loaded pairs per balancer, balancers interleaved
TARGET = 2.0  # loaded p99 < 2x unloaded (issue 10)
HELD_SHARE = 0.95  # a round measures once this share of the attackers is held open


def fulcrum_config(port: int, admin: int, backend: int, state_dir: str) -> str:
    return f"""\
[node]
id = "bench-slowloris"
admin = "{HOST}:{admin}"
state_dir = "{state_dir}"
max_connections = {MAX_CONNECTIONS}
workers = 1

[[listeners]]
name = "web"
protocol = "http"
bind = "{HOST}:{port}"
pool = "web"
backlog = 4096
  [listeners.timeouts]
  header = "{HEAD_TIMEOUT_S}s"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "{HOST}:{backend}"
"""


def haproxy_config(port: int, backend: int, maxconn: int) -> str:
    return f"""\
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request {HEAD_TIMEOUT_S}s

frontend web
    option http-keep-alive
    bind {HOST}:{port} backlog 4096
    default_backend web

backend web
    http-reuse always
    server b1 {HOST}:{backend}
"""


@dataclass
class Phase:
    """One client's latencies (seconds) in one phase."""

    samples: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class Round:
    balancer: str
    keepalive: tuple[Phase, Phase] = field(default_factory=lambda: (Phase(), Phase()))  # unloaded, loaded
    new_conn: tuple[Phase, Phase] = field(default_factory=lambda: (Phase(), Phase()))
    held: int = 0  # attackers' connections open at the balancer while loaded
    rss_idle: int = 0
    rss_loaded: int = 0
    fds_idle: int = 0
    fds_loaded: int = 0
    failed: str = ""
    gc_loaded: tuple[int, ...] = ()  # Fulcrum: collections by generation during the loaded phases
    load: float = 0.0  # the host's 1-minute load average after the loaded phases


def gc_collections(admin: int) -> tuple[int, ...]:
    """Fulcrum's ``python_gc_collections_total`` by generation, from its /metrics."""
    status, body = http_get(admin, "/metrics", timeout=10)
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("python_gc_collections_total{"):
            gen = line.split('generation="', 1)[1].split('"', 1)[0]
            counts[int(gen)] = int(float(line.rsplit(" ", 1)[1]))
    return tuple(counts[g] for g in sorted(counts))


def _read_response(sock: socket.socket, buf: bytes) -> bytes:
    """Read one response to SMALL_PATH; return what follows it. Raise on anything else."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("the balancer closed an ordinary client's connection")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200 "):
        raise OSError(f"ordinary client got {head.splitlines()[0]!r}")
    while len(body) < len(SMALL_BODY):
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("response cut short")
        body += chunk
    if body[: len(SMALL_BODY)] != SMALL_BODY:
        raise OSError("wrong response body")
    return body[len(SMALL_BODY) :]


REQUEST = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: ordinary\r\n\r\n".encode()
REQUEST_CLOSE = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: ordinary\r\nConnection: close\r\n\r\n".encode()


def keepalive_client(port: int, seconds: float) -> Phase:
    """One keep-alive connection, a request every PAUSE_S after the last answer."""
    out = Phase()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        rest = b""
        while time.monotonic() < end:
            t0 = time.perf_counter()
            s.sendall(REQUEST)
            rest = _read_response(s, rest)
            out.samples.append(time.perf_counter() - t0)
            time.sleep(PAUSE_S)
    return out


def new_connection_client(port: int, seconds: float) -> Phase:
    """A new connection per request (connect, request, response, close), timed from connect."""
    out = Phase()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(REQUEST_CLOSE)
            _read_response(s, b"")
        out.samples.append(time.perf_counter() - t0)
        time.sleep(PAUSE_S)
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait(what: str, ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise StartError(f"{what} after {timeout:.0f}s")
        time.sleep(0.2)


def haproxy_maxconn(hard_nofile: int) -> int:
    """HAProxy refuses to start unless the descriptor limit covers two per connection (client
    and server side) plus a few: under a hard limit of 20,000 that is 9,993."""
    return min(MAX_CONNECTIONS, (hard_nofile - 14) // 2)


def attackers_for(maxconn: int) -> int:
    """``ATTACKERS``, or fewer when the balancer's connection cap is lower (HAProxy here),
    leaving room for the ordinary clients: a capped balancer would leave them in the backlog."""
    return min(ATTACKERS, maxconn - 100)


def _start_attackers(ctx: Context, port: int, count: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.slowclients", "--port", str(port), "--count", str(count),
            "--interval", str(INTERVAL[0]), "--max-interval", str(INTERVAL[1])]
    return subprocess.Popen(ctx._pinned(argv, ctx.client_cpu), cwd=ctx.repo, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def measure_round(ctx: Context, name: str, port: int, pid: int, admin: int | None, count: int) -> Round:
    """Unloaded phases, then the attackers, the loaded phases and the memory figures."""
    r = Round(name)
    keepalive_client(port, 1.0)  # warm-up: backend connection, code paths
    r.rss_idle, r.fds_idle = rss_bytes(pid), open_fds(pid)
    r.keepalive[0].samples += keepalive_client(port, PHASE_S).samples
    r.new_conn[0].samples += new_connection_client(port, PHASE_S).samples
    attackers = _start_attackers(ctx, port, count)
    try:
        # Each attacker holds one descriptor at the balancer once accepted.
        want = r.fds_idle + int(count * HELD_SHARE)
        _wait(f"{name} holds fewer than {int(count * HELD_SHARE)} attackers",
              lambda: attackers.poll() is None and open_fds(pid) >= want, timeout=120)
        time.sleep(INTERVAL[1])  # every attacker has sent a byte since it connected
        gc0 = gc_collections(admin) if admin is not None else ()
        r.keepalive[1].samples += keepalive_client(port, PHASE_S).samples
        r.new_conn[1].samples += new_connection_client(port, PHASE_S).samples
        r.rss_loaded, r.fds_loaded = rss_bytes(pid), open_fds(pid)
        r.load = os.getloadavg()[0]
        if admin is not None:
            r.gc_loaded = tuple(b - a for a, b in zip(gc0, gc_collections(admin), strict=True))
        r.held = r.fds_loaded - r.fds_idle
    finally:
        attackers.kill()
        attackers.wait(10)
    # Their connections close with them (RSTs); wait until the balancer let go of them.
    _wait(f"{name} still holds attackers' connections", lambda: open_fds(pid) <= r.fds_idle + 50, timeout=60)
    return r


def run(ctx: Context) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = MAX_CONNECTIONS + 1_000
    if hard < need:
        return f"failed: ulimit -n hard limit {hard} < {need} (the balancers need a descriptor per attacker)"
    # Inherited by the balancers and the attackers' process.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    ctx.backends()
    backend = ctx.ports.backends[0]
    taken = set(ctx.ports.backends) | {ctx.ports.fulcrum_web, ctx.ports.fulcrum_admin, ctx.ports.haproxy_web}
    f_port, f_admin, h_port = pick_port(27530, taken), pick_port(27531, taken), pick_port(27540, taken)
    fulcrum = ctx.fulcrum(fulcrum_config(f_port, f_admin, backend, str(ctx.tmp / "slowloris-state")),
                          key="fulcrum-slowloris", ready_ports=[f_port], admin_port=f_admin)
    conf = ctx.tmp / "haproxy-slowloris.cfg"
    conf.write_text(haproxy_config(h_port, backend, haproxy_maxconn(hard)))
    haproxy = ctx.spawn("haproxy-slowloris", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
    haproxy.wait_ready([h_port], ctx.opts.start_timeout)
    h_count = attackers_for(haproxy_maxconn(hard))
    rounds: list[Round] = []
    for i in range(1, (1 if ctx.opts.quick else ROUNDS) + 1):
        for name, port, proc, admin, count in (("Fulcrum", f_port, fulcrum, f_admin, ATTACKERS),
                                               ("HAProxy", h_port, haproxy, None, h_count)):
            rounds.append(_one(ctx, f"{name} ({i})", port, proc, admin, count))
    ctx.stop("fulcrum-slowloris")
    ctx.stop("haproxy-slowloris")
    return render(rounds)


def _one(ctx: Context, name: str, port: int, proc: Proc, admin: int | None, count: int) -> Round:
    try:
        r = measure_round(ctx, name, port, proc.pid, admin, count)
    except (StartError, OSError) as exc:
        return Round(name, failed=str(exc))
    ka, nc = r.keepalive, r.new_conn
    print(f"  {name}: keep-alive p99 {_ms(ka[0].pct(0.99))} -> {_ms(ka[1].pct(0.99))} ms, new connection "
          f"p99 {_ms(nc[0].pct(0.99))} -> {_ms(nc[1].pct(0.99))} ms, {r.held} held, "
          f"RSS +{(r.rss_loaded - r.rss_idle) / 2**20:.1f} MiB, GC while loaded {r.gc_loaded}", file=sys.stderr, flush=True)
    return r


def _ms(v: float | None) -> str:
    return fmt_num(None if v is None else v * 1000, 2)


def _ratio(loaded: float | None, unloaded: float | None) -> float | None:
    return loaded / unloaded if loaded is not None and unloaded else None


def render(rounds: Sequence[Round]) -> str:
    """The table; memory per held connection is against the balancer's RSS before its first
    round (after one, its allocator keeps the memory for the next: the RSS does not go back)."""
    rows = []
    base: dict[str, int] = {}
    for r in rounds:
        if r.failed:
            rows.append([r.balancer, "", r.failed, "", "", "", "", "", "", "", ""])
            continue
        rss0 = base.setdefault(r.balancer.split(" ")[0], r.rss_idle)
        for client, (u, ld) in (("keep-alive", r.keepalive), ("new connection", r.new_conn)):
            ratio = _ratio(ld.pct(0.99), u.pct(0.99))
            rows.append([
                r.balancer, client, f"{_ms(u.pct(0.5))} / {_ms(u.pct(0.99))}",
                f"{_ms(ld.pct(0.5))} / {_ms(ld.pct(0.99))}", _ms(max(ld.samples, default=None)),
                "—" if ratio is None else f"{ratio:.2f}x", f"{len(u.samples)} / {len(ld.samples)}",
                f"{r.held:,}", f"{r.rss_idle / 2**20:.1f} -> {r.rss_loaded / 2**20:.1f}",
                f"{(r.rss_loaded - rss0) / max(r.held, 1) / 1024:.1f}", f"{r.load:.1f}",
            ])
    table = render_table(
        ["Run", "client", "unloaded p50 / p99 ms", "loaded p50 / p99 ms", "loaded max ms", "p99 ratio",
         "requests", "attackers held", "RSS MiB", "KiB per held", "load avg"],
        rows, "llrrrrrrrrr",
    )
    lines = [table, ""]
    for who in ("Fulcrum", "HAProxy"):
        ratios = [x for r in rounds if r.balancer.startswith(who) and not r.failed
                  for u, ld in (r.keepalive, r.new_conn) if (x := _ratio(ld.pct(0.99), u.pct(0.99))) is not None]
        if ratios:
            verdict = "**met**" if max(ratios) < TARGET else "**not met**"
            lines.append(f"{who}: p99 loaded / unloaded, median {statistics.median(ratios):.2f}x, worst "
                         f"{max(ratios):.2f}x (target < {TARGET:g}x): {verdict}")
    gcs = [f"{r.balancer}: {' / '.join(map(str, r.gc_loaded))}" for r in rounds if r.gc_loaded]
    if gcs:
        lines.append("Fulcrum's garbage collections (generation 0 / 1 / 2) during the loaded phases: "
                     + "; ".join(gcs) + ".")
    lines.append(f"\n{ATTACKERS:,} slowloris connections against Fulcrum (`tests.slowclients`, one byte every "
                 f"{INTERVAL[0]:g}-{INTERVAL[1]:g} s, on the client's CPU), and as many against HAProxy as "
                 "its maxconn allows under this host's descriptor limit (two descriptors a connection); "
                 f"request-head timeout {HEAD_TIMEOUT_S} s on both so that all are held at once; ordinary "
                 f"clients pause {PAUSE_S * 1000:g} ms between requests, {PHASE_S:g} s per phase. KiB per held: "
                 "RSS growth since the balancer's first round began, over the attackers held. Load avg: the "
                 "host's, after the loaded phases (other work on the host moves every p99 here).")
    return "\n".join(lines)
