"""Reload and binary upgrade under load (issue 13): requests failed and connections refused
(target 0 each), and the longest request around each change.

One lbnode in front of the nginx backends, with an http and a tcp listener and its admin
endpoint. Clients (``bench.reloadload``) run all along: 4 HTTP keep-alive connections,
2 clients opening a connection per request, 2 through the tcp listener, 1 polling /healthz.
The changes run in turn, each with load before and after: a listener's settings changed,
a listener added and another removed, an invalid file refused, a SIGHUP reload, and an
upgrade by ``lbnode run --takeover``. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence

from bench.configs import HOST, SMALL_PATH
from bench.harness import Context, StartError, _lbnode_path, pick_port, ports_of
from bench.reloadload import Load
from bench.tables import render_table

SETTLE = 1.5  # seconds of load before and after each change (1.0 with --quick)


def reload_config(web: int, tcp: int, admin: int, extra: int | None, backends: Sequence[int], state_dir: str,
                  pool: str = "all", workers: int = 1) -> str:
    servers = "".join(f'  [[pools.backends]]\n  address = "{HOST}:{p}"\n' for p in backends)
    first = f'  [[pools.backends]]\n  address = "{HOST}:{backends[0]}"\n'
    extra_listener = (f'[[listeners]]\nname = "extra"\nprotocol = "http"\nbind = "{HOST}:{extra}"\npool = "all"\n\n'
                      if extra is not None else "")
    return f"""\
[node]
id = "bench-reload"
admin = "{HOST}:{admin}"
state_dir = "{state_dir}"
drain_timeout = "5s"
workers = {workers}

[[listeners]]
name = "web"
protocol = "http"
bind = "{HOST}:{web}"
pool = "{pool}"

[[listeners]]
name = "bulk"
protocol = "tcp"
bind = "{HOST}:{tcp}"
pool = "first"

{extra_listener}[[pools]]
name = "all"
{servers}
[[pools]]
name = "first"
{first}"""


def haproxy_reload_config(web: int, tcp: int, backends: Sequence[int], first_only: bool = False) -> str:
    """HAProxy in front of the same backends, for its master-worker reload (SIGUSR2)."""
    chosen = backends[:1] if first_only else backends
    servers = "".join(f"    server b{i} {HOST}:{p}\n" for i, p in enumerate(chosen, 1))
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend web
    mode http
    bind {HOST}:{web}
    default_backend web

backend web
    mode http
{servers}
frontend bulk
    mode tcp
    bind {HOST}:{tcp}
    default_backend bulk

backend bulk
    mode tcp
    server b1 {HOST}:{backends[0]}
"""


def measure(web: int, tcp: int, admin: int | None, change: Callable[[], None], settle: float) -> tuple[Load, float, float]:
    """Clients before, during and after ``change``; (load, change start, change end)."""
    load = Load(http_port=web, tcp_port=tcp, admin_port=admin, path=SMALL_PATH).start()
    time.sleep(settle)
    t0 = time.monotonic()
    try:
        change()
    finally:
        t1 = time.monotonic()
        time.sleep(settle)
        load.stop()
    return load, t0, t1


def row(name: str, load: Load, t0: float, t1: float) -> list[object]:
    kinds = ("keepalive", "fresh", "tcp")
    failed, refused = len(load.failed()), len(load.refused())
    return [name, load.count() - load.count("admin"), load.count("admin") or "—", failed - refused, refused,
            f"{load.longest(t0, t1, kinds) * 1000:.0f}", f"{load.longest(0.0, t0 - 0.001, kinds) * 1000:.0f}"]


def haproxy_rows(ctx: Context, taken: set[int], settle: float) -> list[list[object]]:
    """HAProxy's seamless reload beside ours: master-worker mode (-W), SIGUSR2 to the master;
    the new worker gets the listening sockets from the master (no -x needed in 2.x)."""
    import shutil

    if not shutil.which("haproxy"):
        return [["HAProxy: not installed", "—", "—", "—", "—", "—", "—"]]
    web, tcp = pick_port(27700, taken), pick_port(27700, taken)
    conf = ctx.tmp / "haproxy-reload.cfg"
    conf.write_text(haproxy_reload_config(web, tcp, ctx.ports.backends))
    proc = ctx.spawn("haproxy-reload", ["haproxy", "-W", "-f", str(conf), "-db"], pin_balancer=True)
    proc.wait_ready([web, tcp], ctx.opts.start_timeout)

    def reload() -> None:
        conf.write_text(haproxy_reload_config(web, tcp, ctx.ports.backends, first_only=True))
        proc.popen.send_signal(signal.SIGUSR2)
        time.sleep(0.2)  # like our SIGHUP row: the signal returns at once

    try:
        return [row("HAProxy: -W master-worker reload (SIGUSR2), backend changed", *measure(web, tcp, None, reload,
                                                                                          settle))]
    finally:
        ctx.stop("haproxy-reload")


def run(ctx: Context) -> str:
    lbnode = _lbnode_path(ctx.repo)
    if lbnode is None:
        raise StartError("lbnode not installed (run make venv)")
    ctx.backends()
    taken = set(ports_of(ctx.ports))
    settle = 1.0 if ctx.opts.quick else SETTLE
    rows: list[list[object]] = []
    failed_total = refused_total = 0
    for workers in (1, 2):
        more, failed, refused = fulcrum_rows(ctx, lbnode, taken, settle, workers)
        rows += more
        failed_total += failed
        refused_total += refused
    rows += haproxy_rows(ctx, taken, settle)
    verdict = "met" if failed_total == 0 and refused_total == 0 else "NOT met"
    return (
        render_table(["change", "requests", "/healthz", "failed", "refused", "longest around it (ms)",
                      "longest before it (ms)"], rows)
        + "\n\n"
        + f"Target (issue 13): zero failed requests and zero refused connections across every change: "
        f"**{verdict}** ({failed_total} failed, {refused_total} refused; Fulcrum's rows). The \"workers = 2\" "
        "rows are the same node as a supervisor and two worker processes (the reload goes to both workers; "
        "the takeover starts a new supervisor and its workers on the handed-over sockets). The HAProxy row "
        "is its own seamless reload under the same clients (no admin endpoint there), for comparison. Clients: 4 HTTP keep-alive, 2 a "
        "connection per request, 2 through the tcp listener (all to nginx's 100-byte answer), 1 polling "
        "/healthz (it must answer 200 all along, from the old process or the new one). \"Longest around it\" "
        "is the longest request in flight at any moment of the change; \"before it\" the longest of the "
        f"{settle:g} s before, for scale. One run per change on a shared machine: the delays are noise-level "
        "figures, not a comparison."
    )


def fulcrum_rows(ctx: Context, lbnode: str, taken: set[int], settle: float,
                 workers: int) -> tuple[list[list[object]], int, int]:
    """One lbnode (``workers`` processes) through every change in turn; (rows, failed, refused)."""
    backends = ctx.ports.backends
    web, tcp, admin, extra = (pick_port(27600, taken) for _ in range(4))
    suffix = "" if workers == 1 else f"-w{workers}"
    state_dir = str(ctx.tmp / f"reload{suffix}-state")
    conf = ctx.tmp / f"reload{suffix}.toml"
    label = "" if workers == 1 else f"workers = {workers}: "

    def write(pool: str = "all", with_extra: bool = False) -> None:
        conf.write_text(reload_config(web, tcp, admin, extra if with_extra else None, backends, state_dir, pool,
                                      workers))

    write()
    old = ctx.fulcrum(conf.read_text(), key=f"reload{suffix}", ready_ports=[web, tcp], admin_port=admin)

    def lbnode_reload(pool: str = "first", with_extra: bool = False) -> None:
        write(pool, with_extra)
        done = subprocess.run([lbnode, "reload", "-c", str(conf)], capture_output=True, text=True, timeout=60,
                              cwd=ctx.tmp)
        if done.returncode != 0:
            raise StartError(f"lbnode reload: {done.stderr.strip()}")

    def refused_reload() -> None:
        conf.write_text(conf.read_text() + "\n[[listeners]]\nname = 'broken'\n")
        done = subprocess.run([lbnode, "reload", "-c", str(conf)], capture_output=True, text=True, timeout=60,
                              cwd=ctx.tmp)
        if done.returncode != 1:
            raise StartError(f"an invalid file was not refused: {done.stdout.strip()}")

    def sighup() -> None:
        write()
        old.popen.send_signal(signal.SIGHUP)
        time.sleep(0.2)  # the node reads and applies the file in milliseconds; the load goes on

    def takeover() -> None:
        ctx.spawn(f"reload-upgraded{suffix}", [lbnode, "run", "--config", str(conf), "--takeover"],
                  pin_balancer=True)
        deadline = time.monotonic() + 30
        while old.exited() is None:
            if time.monotonic() > deadline:
                raise StartError("the old lbnode did not exit after --takeover")
            time.sleep(0.05)

    changes: list[tuple[str, Callable[[], None]]] = [
        ("reload: http listener's pool changed", lambda: lbnode_reload()),
        ("reload: a listener added", lambda: lbnode_reload(with_extra=True)),
        ("reload: a listener removed", lambda: lbnode_reload()),
        ("reload refused: invalid file", refused_reload),
        ("SIGHUP reload", sighup),
        ("upgrade: lbnode run --takeover", takeover),
    ]
    rows = []
    failed_total = refused_total = 0
    for name, change in changes:
        load, t0, t1 = measure(web, tcp, admin, change, settle)
        refused = len(load.refused())
        failed_total += len(load.failed()) - refused
        refused_total += refused
        rows.append(row(label + name, load, t0, t1))
    ctx.stop(f"reload-upgraded{suffix}")
    ctx.stop(f"reload{suffix}")
    return rows, failed_total, refused_total
