"""Measurements shared by several sections: one wrk run (``measure_l7``) or a series of
64 MiB downloads (``measure_bulk``) through a port, with the CPU the given processes
spent on it, as an ``L7Row`` / ``L4Row``.

Every load loop is bounded in time; ``wrk_argv`` is the one wrk command line.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from bench.configs import BULK_PATH, BULK_SIZE, HOST, SMALL_BODY, SMALL_PATH
from bench.harness import Context, Options, StartError, http_get
from bench.procstat import tree_cpu_seconds
from bench.tables import fmt_num
from bench.wrk import WrkParseError, WrkResult, parse_wrk

T = TypeVar("T")

MAX_ERROR_SHARE = 0.001  # a Fulcrum L7 row with more errors than this does not meet a target


@dataclass
class L7Row:
    name: str
    failed: str | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_req: float | None = None  # balancer; None for direct
    backend_cpu_us_per_req: float | None = None
    requests: int = 0
    errors: int = 0
    note: str = ""


@dataclass
class L4Row:
    name: str
    failed: str | None = None
    gbps: float | None = None  # 1e9 bytes / s
    cpu_ms_per_gb: float | None = None  # balancer CPU per 1e9 bytes; None for direct
    downloads: int = 0
    note: str = ""


def round_order(names: Sequence[str], rnd: int) -> list[str]:
    """The order of one round: forward in even rounds, backward in odd ones (ABBA)."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def interleaved(names: Sequence[str], rounds: int, run: Callable[[str], T]) -> dict[str, list[T]]:
    """``run(name)`` for every name in each of ``rounds`` rounds, in ``round_order``: a drift of
    the machine's load falls on every name alike, and the runs of one round ran back to back."""
    results: dict[str, list[T]] = {name: [] for name in names}
    for rnd in range(rounds):
        for name in round_order(names, rnd):
            results[name].append(run(name))
    return results


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """b / a round by round (the two ran back to back, so the machine's load was alike)."""
    return [y / x for x, y in zip(a, b, strict=False) if x > 0]


def median_run(runs: Sequence[L7Row]) -> L7Row:
    """The run of median CPU per request (requests per second where there is no CPU figure:
    the direct row), the lower of the two middle ones for an even number; its note gives the
    number of runs and their range, its requests and errors are all the runs'. A run that
    failed fails the row."""
    failed = next((r for r in runs if r.failed), None)
    if failed is not None or len(runs) == 1:
        return failed or runs[0]
    key = "cpu_us_per_req" if runs[0].cpu_us_per_req is not None else "rps"
    ordered = sorted(runs, key=lambda r: getattr(r, key) or 0.0)
    middle = ordered[(len(ordered) - 1) // 2]
    lo, hi = getattr(ordered[0], key), getattr(ordered[-1], key)
    spread = (f"{len(runs)} runs, CPU µs/req {lo:.1f}-{hi:.1f}" if key == "cpu_us_per_req"
              else f"{len(runs)} runs, req/s {lo:,.0f}-{hi:,.0f}")
    # Requests and errors of every run: an error in a run that is not the median one still counts.
    return replace(middle, note=f"{middle.note}; {spread}" if middle.note else spread,
                   requests=sum(r.requests for r in runs), errors=sum(r.errors for r in runs))


def cpu_ratios(a: Sequence[L7Row], b: Sequence[L7Row]) -> list[float]:
    """b's CPU per request over a's, round by round; [] for fewer than two rounds or a failed run."""
    ratios = paired_ratios([r.cpu_us_per_req or 0.0 for r in a if not r.failed],
                           [r.cpu_us_per_req or 0.0 for r in b if not r.failed])
    if len(ratios) < 2 or len(ratios) != len(a) or len(a) != len(b):
        return []
    return ratios


def ratio_spread(a: Sequence[L7Row], b: Sequence[L7Row]) -> str:
    """``cpu_ratios`` as "median (min-max) over N rounds"; "" when there are none."""
    ratios = cpu_ratios(a, b)
    if not ratios:
        return ""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rounds"


def too_many_errors(errors: int, requests: int) -> bool:
    return errors > MAX_ERROR_SHARE * max(requests, 1)


def wrk_argv(
    opts: Options,
    port: int,
    seconds: float,
    path: str = SMALL_PATH,
    script: Path | None = None,
    headers: Sequence[str] = (),
) -> list[str]:
    """The wrk command line (unpinned): the same settings for every L7 figure, plus an
    optional Lua ``script`` and extra ``headers`` (``"Name: value"``)."""
    argv = [
        "wrk",
        f"-t{opts.threads}",
        f"-c{opts.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    for h in headers:
        argv += ["-H", h]
    if script is not None:
        argv += ["-s", str(script)]
    return argv + [f"http://{HOST}:{port}{path}"]


def run_wrk(
    ctx: Context,
    port: int,
    seconds: float,
    path: str = SMALL_PATH,
    script: Path | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    argv = ctx._pinned(wrk_argv(ctx.opts, port, seconds, path, script, headers), ctx.client_cpu)
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise StartError("wrk did not finish in time") from None
    except OSError as exc:
        raise StartError(f"cannot run wrk: {exc}") from None
    try:
        return parse_wrk(cp.stdout)
    except WrkParseError as exc:
        err = (cp.stderr or cp.stdout).strip().splitlines()
        raise StartError(f"wrk: {exc}" + (f" ({err[-1][:120]})" if err else "")) from None


def measure_l7(
    ctx: Context,
    name: str,
    port: int,
    pids: Sequence[int],
    duration: float | None = None,
    warmup: float | None = None,
    script: Path | None = None,
    headers: Sequence[str] = (),
) -> L7Row:
    """Warm up, then one measured wrk run against ``port``; CPU of ``pids``' trees per request.

    ``duration`` and ``warmup`` default to the options' (the main L7 section's);
    ``script`` and ``headers`` go to wrk (warm-up and measured run alike)."""
    duration = ctx.opts.duration if duration is None else duration
    warmup = ctx.opts.warmup if warmup is None else warmup
    try:
        status, body = http_get(port, SMALL_PATH)
    except (OSError, http.client.HTTPException) as exc:
        return L7Row(name, failed=f"GET {SMALL_PATH}: {exc}")
    if status != 200 or body != SMALL_BODY:
        return L7Row(name, failed=f"GET {SMALL_PATH} answered {status} with {len(body)} bytes")
    try:
        if warmup > 0:
            run_wrk(ctx, port, warmup, script=script, headers=headers)
        backend_pid = ctx.backends().pid
        cpu0, b0 = tree_cpu_seconds(pids), tree_cpu_seconds([backend_pid])
        res = run_wrk(ctx, port, duration, script=script, headers=headers)
        cpu1, b1 = tree_cpu_seconds(pids), tree_cpu_seconds([backend_pid])
    except StartError as exc:
        return L7Row(name, failed=str(exc))
    if res.requests == 0:
        return L7Row(name, failed="no requests completed")
    note = ""
    if res.errors:
        parts = [f"{res.non_2xx_3xx} non-2xx"] if res.non_2xx_3xx else []
        parts += [f"{v} {k}" for k, v in res.socket_errors.items() if v]
        note = ", ".join(parts)
    return L7Row(
        name,
        rps=res.rps,
        p50_ms=res.latency_ms[50],
        p99_ms=res.latency_ms[99],
        cpu_us_per_req=(cpu1 - cpu0) * 1e6 / res.requests if pids else None,
        backend_cpu_us_per_req=(b1 - b0) * 1e6 / res.requests,
        requests=res.requests,
        errors=res.errors,
        note=note,
    )


class DownloadError(RuntimeError):
    pass


def download(
    port: int, path: str = BULK_PATH, timeout: float = 30.0, buf: memoryview | None = None
) -> int:
    """GET ``path`` over a fresh connection (Connection: close), discard the body; bytes of body.
    ``timeout`` bounds the whole download, not only each read."""
    deadline = time.monotonic() + timeout
    if buf is None:
        buf = memoryview(bytearray(4 * 1024 * 1024))
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > 65536:
                raise DownloadError("response head too long")
            n = s.recv_into(buf, 65536)
            if n == 0:
                raise DownloadError("connection closed before the response head")
            head += bytes(buf[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2 or parts[1] != "200":
            raise DownloadError(f"status line {lines[0]!r}")
        length = None
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if length is None:
            raise DownloadError("no Content-Length")
        got = len(rest)
        while got < length:
            if time.monotonic() > deadline:
                raise DownloadError(f"slower than {timeout:g} s: {got} of {length} bytes")
            n = s.recv_into(buf)
            if n == 0:
                raise DownloadError(f"short body: {got} of {length} bytes")
            got += n
        return got


@contextlib.contextmanager
def _affinity(cpu: int | None) -> Iterator[None]:
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def measure_bulk(ctx: Context, name: str, port: int, pids: Sequence[int]) -> L4Row:
    """Download the 64 MiB file over fresh connections for ``bulk_duration`` seconds."""
    buf = memoryview(bytearray(4 * 1024 * 1024))
    try:
        got = download(port, buf=buf)  # also warms the page cache and the path
        if got != BULK_SIZE:
            return L4Row(name, failed=f"got {got} bytes, expected {BULK_SIZE}")
        total = count = 0
        with _affinity(ctx.client_cpu):
            cpu0 = tree_cpu_seconds(pids)
            t0 = time.perf_counter()
            deadline = t0 + ctx.opts.bulk_duration
            while count < ctx.opts.bulk_min_downloads or time.perf_counter() < deadline:
                total += download(port, buf=buf)
                count += 1
                if time.perf_counter() > deadline + 30:  # bound even a very slow path
                    break
            elapsed = time.perf_counter() - t0
            cpu1 = tree_cpu_seconds(pids)
    except (OSError, DownloadError, ValueError) as exc:
        return L4Row(name, failed=f"download: {exc}")
    return L4Row(
        name,
        gbps=total / elapsed / 1e9,
        cpu_ms_per_gb=(cpu1 - cpu0) * 1e3 / (total / 1e9) if pids else None,
        downloads=count,
    )


def progress(row: L7Row | L4Row) -> None:
    if row.failed:
        msg = "failed: " + row.failed
    elif isinstance(row, L7Row):
        msg = f"{row.rps:,.0f} req/s, p99 {row.p99_ms:.2f} ms, CPU {fmt_num(row.cpu_us_per_req)} µs/req"
    else:
        msg = f"{row.gbps:.2f} GB/s over {row.downloads} downloads"
    print(f"  {row.name}: {msg}", file=sys.stderr, flush=True)
