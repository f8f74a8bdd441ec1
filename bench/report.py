"""The report: the environment block, each section run in turn (a failing one becomes a
``failed: ...`` line), the file written atomically; and the sections of modules listed
in ``OPTIONAL_MODULES`` (``run() -> str`` or ``run(ctx) -> str``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.harness import Context, Section, StartError

# Optional sections provided by other modules: (section name, module, title).
OPTIONAL_MODULES: list[tuple[str, str, str]] = [
    ("pick", "bench.pick", "Policy pick cost"),
    (
        "tail",
        "bench.tail",
        "Tail latency under a slow backend (least_latency vs HAProxy leastconn)",
    ),
    (
        "tls",
        "bench.tls",
        "TLS termination: CPU per handshake and per keep-alive request (with HAProxy)",
    ),
    ("reload", "bench.reload", "Reload and binary upgrade under load (Fulcrum)"),
    (
        "slowloris",
        "bench.slowloris",
        "Ordinary clients beside 10,000 slowloris connections (with HAProxy)",
    ),
    ("http2", "bench.http2", "HTTP/2 over TLS: h2load, 100 streams per connection (with HAProxy)"),
]


def optional_sections() -> list[Section]:
    """Sections from modules that may not exist yet (see ``OPTIONAL_MODULES``)."""
    import importlib

    out = []
    for name, module, title in OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            if exc.name != module:  # the module exists but its own import failed
                out.append(Section(name, title, _failing(f"import {module}: {exc}")))
            continue
        run = getattr(mod, "run", None)
        if callable(run):
            out.append(Section(name, title, _adapt(run)))
    return out


def _failing(reason: str) -> Callable[[Context], str]:
    return lambda ctx: f"failed: {reason}"


def _adapt(run: Callable[..., str]) -> Callable[[Context], str]:
    try:
        takes_ctx = len(inspect.signature(run).parameters) >= 1
    except (TypeError, ValueError):
        takes_ctx = False
    return (lambda ctx: run(ctx)) if takes_ctx else (lambda ctx: run())


def _cmd_first_line(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (cp.stdout + cp.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def environment(ctx: Context) -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = _cmd_first_line(["git", "-C", str(ctx.repo), "rev-parse", "--short", "HEAD"])
    if ctx.client_cpu is not None:
        pin = (
            f"wrk and the L4 client pinned to CPU {ctx.client_cpu}, the balancer under test to "
            f"CPU {ctx.balancer_cpu} (taskset); the backend nginx (1 worker) is not pinned and "
            "shares both"
        )
    else:
        pin = "no CPU pinning (fewer than 2 CPUs, taskset missing or --no-pin)"
    items = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"host: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        # Which interpreter runs lbnode matters (docs/performance.md, "The interpreter").
        f"Fulcrum: git {rev}, Python {platform.python_version()} "
        f"({os.path.realpath(getattr(sys, '_base_executable', sys.executable))})",
        f"HAProxy: {_cmd_first_line(['haproxy', '-v'])}",
        f"nginx: {_cmd_first_line(['nginx', '-v'])}",
        f"wrk: {_cmd_first_line(['wrk', '-v'])}",
        f"pinning: {pin}",
        "mode: " + ("--quick" if ctx.opts.quick else "full"),
        f"load average at start: {_loadavg()} (other work on the machine skews every figure)",
    ]
    return "\n".join(f"- {i}" for i in items)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_sections(ctx: Context, sections: Sequence[Section]) -> str:
    """Run each section, turning a crash into a 'failed' block, and assemble the report."""
    blocks = ["# Fulcrum benchmark", "", environment(ctx)]
    for sec in sections:
        print(f"== {sec.title}", file=sys.stderr, flush=True)
        try:
            body = sec.run(ctx)
        except StartError as exc:
            body = f"failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - one broken section must not sink the rest
            body = f"failed: {type(exc).__name__}: {exc}"
        blocks += ["", f"## {sec.title}", "", body.rstrip()]
    blocks += ["", f"Load average at the end: {_loadavg()}."]
    return "\n".join(blocks) + "\n"


def write_report(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
