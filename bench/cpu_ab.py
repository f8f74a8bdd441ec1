"""``python -m bench.cpu_ab``: CPU per request of lbnode from several source trees, beside
HAProxy, in interleaved rounds; and the profiles behind docs/performance.md.

Each tree (``--rev`` a git revision, ``--tree`` a directory holding ``lbnode/``; default: this
checkout) runs as its own lbnode, all started once beside the bench's nginx backends and
HAProxy, pinned like the main bench (balancers on one CPU, wrk on the other). A round drives
every balancer in turn with the same wrk command, forward in even rounds and backward in odd
ones (ABBA), and takes the balancer's CPU time from /proc (user + system) over the requests
wrk completed: a figure less sensitive to a shared machine than throughput. The summary gives
each one's median and range, its ratio to HAProxy, the kernel's part (system time), and the
per-round ratio of every other tree to the first.

``--config`` runs each tree with several node.toml variants (``plain``, ``protections``: the
protections section's settings, or a balancing policy such as ``least_connections``), each its
own lbnode: ``--config plain --config protections
--config plain`` measures what the protections cost beside what two identical nodes differ by
(an A/A pair), in the same rounds.

Modes: ``keepalive`` (the main L7 figure), ``close`` (wrk's ``Connection: close``: a new client
connection per request through the http listener), ``l4`` (the same through the tcp listener:
one short TCP session per request), ``h2`` (h2load over TLS, ``bench.http2``'s command: an
https listener and HAProxy with ALPN h2, 4 connections of 100 concurrent streams),
``tls-new`` (bench/tls.py's full handshake: ``openssl s_time -new``, a new connection, a
full TLS 1.3 handshake with ECDSA P-256 and one request each) and ``tls-keepalive`` (wrk
over 16 persistent TLS connections), both through an https listener beside HAProxy's
``ssl crt`` frontend with the same certificate.

``--py-spy OUT`` records the first tree with py-spy (raw collapsed stacks) during one extra run;
``--shares OUT`` then prints the share of samples by function (self and inclusive).
py-spy is a profiling tool only: ``.venv/bin/pip install py-spy`` (not in the lock).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bench.configs import HOST, SMALL_PATH, fulcrum_config
from bench.harness import Context, Options, Proc, StartError, pick_port, ports_of
from bench.http2 import _h2load as h2load_run
from bench.measure import paired_ratios, round_order
from bench.procstat import tree_cpu_split
from bench.tls import _certificate, _s_time, certificate_in, fulcrum_tls_config, haproxy_tls_config
from bench.wrk import WrkParseError, parse_wrk

REPO = Path(__file__).resolve().parent.parent
MODES = ("keepalive", "close", "l4", "h2", "tls-new", "tls-keepalive")
# node.toml variants (--config) for the plain listeners (keepalive, close, l4): the standalone
# config, the same with the protections section's settings (bench/configs.py, PROTECTIONS), or
# with another balancing policy that needs no other setting (round robin in the others).
POLICY_CONFIGS = ("random", "least_connections", "least_loaded", "least_latency", "source_hash")
CONFIGS = ("plain", "protections", *POLICY_CONFIGS)

HAPROXY = "haproxy"


def algorithm_of(variant: str) -> str:
    """The pool's balancing policy for a node.toml variant: its own name for a policy's, else round robin."""
    return variant if variant in POLICY_CONFIGS else "round_robin"


def summarize(results: dict[str, list[float]], reference: str = HAPROXY) -> list[str]:
    """One line per balancer: median µs/request, range, ratio to ``reference``'s median."""
    ref = statistics.median(results[reference]) if results.get(reference) else None
    lines = []
    for name, figures in results.items():
        if not figures:
            lines.append(f"{name}: no figures")
            continue
        med = statistics.median(figures)
        ratio = f", {med / ref:.2f} x {reference}" if ref else ""
        lines.append(f"{name}: median {med:.1f} us/request (range {min(figures):.1f}-{max(figures):.1f}, "
                     f"{len(figures)} runs){ratio}")
    return lines


def shares(lines: Iterable[str]) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """py-spy's raw output (``frame;frame;... count``) -> (samples, self, inclusive) by function."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    return total, self_c, incl


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/trio/_core/_run.py:123)`` -> ``func (trio/_core/_run.py)``."""
    def path(m: re.Match[str]) -> str:
        p = m.group(1)
        for marker in ("site-packages/", "/lib/python3."):
            if marker in p:
                p = p.split(marker, 1)[1]
        i = p.find("lbnode/")
        return f" ({p[i:] if i >= 0 else p})"

    return re.sub(r" \((.*?):\d+\)", path, frame)


def variant_list(
    trees: list[tuple[str, Path]], pythons: list[str], configs: list[str],
) -> list[tuple[str, Path, str, str]]:
    """(name, tree, python, config) for every tree under every interpreter with every config,
    named for each of those that has several; a repeated one (an A/A pair) is numbered."""
    variants: list[tuple[str, Path, str, str]] = []
    seen: collections.Counter[str] = collections.Counter()
    for name, tree in trees:
        for py in pythons:
            for config in configs:
                label = name + (f" ({py})" if len(pythons) > 1 else "") + (f" [{config}]" if len(configs) > 1 else "")
                seen[label] += 1
                variants.append((label + (f" #{seen[label]}" if seen[label] > 1 else ""), tree, py, config))
    return variants


def _export(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "lbnode"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _start_lbnode(ctx: Context, tree: Path, i: int, taken: set[int], h2: bool = False,
                  tls: tuple[Path, Path] | None = None, python: str = sys.executable,
                  config: str = "plain") -> tuple[Proc, int, int]:
    ports = dataclasses.replace(
        ctx.ports,
        fulcrum_web=pick_port(28080 + 10 * i, taken),
        fulcrum_bulk=pick_port(28081 + 10 * i, taken),
        fulcrum_admin=pick_port(28082 + 10 * i, taken),
    )
    taken.update((ports.fulcrum_web, ports.fulcrum_bulk, ports.fulcrum_admin))
    conf = ctx.tmp / f"ab{i}.toml"
    if h2:  # the https listener of bench.http2 (h2 by ALPN), on the "web" port
        cert, key, _ = certificate_in(ctx.tmp / "h2cert")
        conf.write_text(fulcrum_tls_config(list(ctx.ports.backends), ports.fulcrum_web, ports.fulcrum_admin, cert, key))
    elif tls is not None:  # the https listener on fulcrum_web, the tls (L4) one on fulcrum_bulk
        conf.write_text(fulcrum_tls_config(list(ctx.ports.backends), ports.fulcrum_web, ports.fulcrum_admin,
                                           tls[0], tls[1], ports.fulcrum_bulk))
    else:
        conf.write_text(fulcrum_config(ports, node_id=f"ab{i}", protections=config == "protections",
                                       algorithm=algorithm_of(config)))
    # PYTHONPATH puts this tree's lbnode ahead of the venv's editable install.
    argv = ["env", f"PYTHONPATH={tree}", python, "-c",
            "import sys; from lbnode.cli import main; sys.exit(main())", "run", "--config", str(conf)]
    proc = ctx.spawn(f"ab{i}", argv, pin_balancer=True)
    proc.wait_ready([ports.fulcrum_web] if h2 else [ports.fulcrum_web, ports.fulcrum_bulk], ctx.opts.start_timeout)
    return proc, ports.fulcrum_web, ports.fulcrum_bulk


def _haproxy_h2(ctx: Context, taken: set[int]) -> tuple[Proc, int]:
    """HAProxy with ALPN h2 as bench.http2 configures it."""
    port = pick_port(28543, taken)
    _, _, pem = certificate_in(ctx.tmp / "h2cert")
    conf = ctx.tmp / "haproxy-h2.cfg"
    conf.write_text(haproxy_tls_config(list(ctx.ports.backends), port, pem).replace("alpn http/1.1", "alpn h2,http/1.1"))
    proc = ctx.spawn("haproxy-h2", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
    proc.wait_ready([port], ctx.opts.start_timeout)
    return proc, port


def _h2load(ctx: Context, port: int, seconds: float) -> int:
    """Requests succeeded in one h2load run (bench.http2's command)."""
    ok, failed, _ = h2load_run(ctx, port, seconds)
    if failed:
        print(f"  {failed} failed of {ok + failed} requests on port {port}", file=sys.stderr)
    return ok


def _wrk(ctx: Context, port: int, seconds: float, mode: str, connections: int) -> int:
    """Requests completed by one wrk run (errors are reported, not hidden)."""
    if mode == "tls-new":
        return _s_time(ctx, port, seconds)[0]
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "--latency"]
    if mode in ("close", "l4"):
        argv += ["-H", "Connection: close"]
    scheme = "https" if mode.startswith("tls") else "http"
    argv.append(f"{scheme}://{HOST}:{port}{SMALL_PATH}")
    cp = subprocess.run(ctx._pinned(argv, ctx.client_cpu), capture_output=True, text=True, timeout=seconds + 30)
    try:
        res = parse_wrk(cp.stdout)
    except WrkParseError as exc:
        raise StartError(f"wrk: {exc}: {cp.stderr.strip()[-200:]}") from None
    if res.errors:
        print(f"  {res.errors} errors of {res.requests} requests on port {port}", file=sys.stderr)
    return res.requests


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-cpu-ab-"))
    trees: list[tuple[str, Path]] = []
    for i, rev in enumerate(args.rev or []):
        trees.append((rev, _export(rev, tmp / f"rev{i}")))
    for tree in args.tree or []:
        trees.append((str(tree), Path(tree).resolve()))
    if not trees:
        trees.append(("worktree", REPO))
    variants = variant_list(trees, args.python or [sys.executable], args.config or ["plain"])
    ctx = Context(Options(start_timeout=30.0), REPO, tmp)
    try:
        ctx.backends()
        taken = set(ports_of(ctx.ports))
        h2 = args.mode == "h2"
        certificate: tuple[Path, Path] | None = None
        if h2:
            haproxy, port = _haproxy_h2(ctx, taken)
            procs: dict[str, Proc] = {HAPROXY: haproxy}
            ports = {HAPROXY: port}
        elif args.mode.startswith("tls"):
            cert, key, pem = _certificate(tmp)
            certificate = cert, key
            h_port = pick_port(27543, taken)
            taken.add(h_port)
            conf = tmp / "haproxy-tls.cfg"
            conf.write_text(haproxy_tls_config(list(ctx.ports.backends), h_port, pem))
            haproxy = ctx.spawn("haproxy-tls", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
            haproxy.wait_ready([h_port], ctx.opts.start_timeout)
            procs = {HAPROXY: haproxy}
            ports = {HAPROXY: h_port}
        else:
            procs = {HAPROXY: ctx.haproxy()}
            ports = {HAPROXY: ctx.ports.haproxy_bulk if args.mode == "l4" else ctx.ports.haproxy_web}
        for i, (name, tree, py, config) in enumerate(variants):
            proc, web, bulk = _start_lbnode(ctx, tree, i, taken, h2, certificate, py, config)
            procs[name] = proc
            ports[name] = bulk if args.mode == "l4" else web
        names = [name for name, _, _, _ in variants] + [HAPROXY]
        system: dict[str, list[float]] = {name: [] for name in names}  # the kernel's part, µs/request

        def measure(name: str, seconds: float) -> float:
            user0, sys0 = tree_cpu_split([procs[name].pid])
            if h2:
                requests = _h2load(ctx, ports[name], seconds)
            else:
                requests = _wrk(ctx, ports[name], seconds, args.mode, args.connections)
            user1, sys1 = tree_cpu_split([procs[name].pid])
            system[name].append((sys1 - sys0) * 1e6 / max(requests, 1))
            return (user1 - user0 + sys1 - sys0) * 1e6 / max(requests, 1)

        for name in names:
            measure(name, 2)  # warm-up: pools, caches, the first connections
        if args.py_spy:
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy") or shutil.which("py-spy", path=str(REPO / ".venv" / "bin"))
            if spy is None:
                raise StartError("py-spy not installed (.venv/bin/pip install py-spy)")
            first = names[0]
            rec = subprocess.Popen([spy, "record", "-p", str(procs[first].pid), "-r", "250", "-d",
                                    str(round(args.seconds)), "-f", "raw", "-o", str(args.py_spy)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"{first} under py-spy: {measure(first, args.seconds):.1f} us/request", flush=True)
            rec.wait()
        if args.perf:
            first = names[0]
            rec = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-o", str(args.perf), "-p",
                                    str(procs[first].pid), "--", "sleep", str(round(args.seconds))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"{first} under perf: {measure(first, args.seconds):.1f} us/request", flush=True)
            rec.wait()
        results: dict[str, list[float]] = {name: [] for name in names}
        for figures in system.values():
            figures.clear()  # the warm-up's and the profiled run's
        for rnd in range(args.rounds):
            for name in round_order(names, rnd):
                us = measure(name, args.seconds)
                results[name].append(us)
                print(f"round {rnd} {name}: {us:.1f} us/request ({system[name][-1]:.1f} system)", flush=True)
            print(f"  load average {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
        client = "h2load -c4 -m100 (TLS)" if h2 else f"wrk -t1 -c{args.connections}"
        print(f"## {args.mode}, {client}, {args.seconds:g} s runs")
        for line in summarize(results):
            print(line)
        print("system (kernel) part, median us/request: "
              + ", ".join(f"{name} {statistics.median(system[name]):.1f}" for name in names if system[name]))
        for other in names[1:len(variants)]:
            ratios = paired_ratios(results[names[0]], results[other])
            print(f"{other} / {names[0]} by round: " + " ".join(f"{r:.3f}" for r in ratios)
                  + f" (median {statistics.median(ratios):.3f})")
    except StartError as exc:
        print(f"cpu_ab: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def print_shares(path: Path, top: int) -> int:
    with open(path) as f:
        total, self_c, incl = shares(f)
    if not total:
        print(f"{path}: no samples", file=sys.stderr)
        return 1
    print(f"{total} samples; self (the function on top of the stack):")
    for frame, n in self_c.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("inclusive (on the stack):")
    for frame, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="keepalive")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (default 4: ABBA twice)")
    p.add_argument("--seconds", type=float, default=5.0, help="wrk seconds per run (default 5)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--rev", action="append", help="a git revision to measure (repeatable)")
    p.add_argument("--tree", action="append", type=Path, help="a directory holding lbnode/ (repeatable)")
    p.add_argument("--config", action="append", choices=CONFIGS,
                   help="the node.toml of every tree (repeatable, e.g. plain and protections, or plain twice for "
                        "an A/A pair; default plain); modes keepalive, close and l4 only")
    p.add_argument("--python", action="append",
                   help="an interpreter to run every tree with (repeatable; it must have the dependencies, "
                        "e.g. a venv's bin/python; default: this one)")
    p.add_argument("--py-spy", type=Path, help="record the first tree with py-spy into this file first")
    p.add_argument("--perf", type=Path, help="record the first tree with perf record -g into this file first")
    p.add_argument("--shares", type=Path, help="print the shares of a py-spy raw file, and exit")
    p.add_argument("--top", type=int, default=30, help="functions listed by --shares (default 30)")
    args = p.parse_args(argv)
    if args.shares:
        return print_shares(args.shares, args.top)
    if args.config and args.mode not in ("keepalive", "close", "l4"):
        p.error(f"--config: mode {args.mode} has its own node.toml")
    os.environ.pop("PYTHONPATH", None)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
