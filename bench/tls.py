"""TLS termination beside HAProxy: CPU per full handshake and per keep-alive request.

Both balancers get the same ECDSA P-256 certificate (made here with ``cryptography``), one
thread (lbnode is one; HAProxy ``nbthread 1``), the same nginx backends and the same wrk
client (``-t1 -c50``, TLS 1.3 as wrk negotiates it). A section of ``python -m bench`` (see
``harness.OPTIONAL_MODULES``); everything on 127.0.0.1.

- full handshake: ``openssl s_time -new``: one connection after another, each a new TCP
  connection, a full TLS 1.3 handshake (no resumption: lbnode's /status counts them) and one
  HTTP/1.0 request; CPU of the balancer's process tree per connection. (wrk with
  ``Connection: close`` resumes most sessions, so it cannot measure full handshakes.)
- keep-alive: wrk, the same request on 50 persistent TLS connections.
- bulk: ``protocol = "tls"`` (L4, TLS terminated, plain TCP to nginx) beside HAProxy's
  ``mode tcp`` + ``ssl crt``: curl downloads of the 64 MiB file, one after another, GB/s.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.configs import BULK_PATH, BULK_SIZE, HOST, SMALL_PATH
from bench.harness import Context, StartError, pick_port, ports_of
from bench.measure import L7Row, cpu_ratios, interleaved, median_run
from bench.procstat import tree_cpu_seconds
from bench.tables import fmt_num, fmt_ratio, render_table
from bench.wrk import WrkResult, parse_wrk

# Targets of issue 11: Fulcrum / HAProxy CPU ratios.
HANDSHAKE_TARGET = 1.5
KEEPALIVE_TARGET = 4.0
BULK_TARGET = 0.8  # tls listener bulk GB/s >= 0.8x HAProxy's


def _certificate(directory: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 self-signed certificate for "bench.test": (cert, key, cert+key for HAProxy)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = directory / "bench.crt", directory / "bench.key", directory / "bench.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    for p in paths:
        p.chmod(0o600)
    return paths


def certificate_in(directory: Path) -> tuple[Path, Path, Path]:
    """``_certificate`` in ``directory``, made by the first call of a run; later calls (one per
    tree or balancer measured) take the same files."""
    if not directory.exists():
        directory.mkdir()
        return _certificate(directory)
    return directory / "bench.crt", directory / "bench.key", directory / "bench.pem"


def fulcrum_tls_config(backends: list[int], port: int, admin: int, cert: Path, key: Path,
                       bulk_port: int | None = None) -> str:
    servers = "".join(f'  [[pools.backends]]\n  address = "{HOST}:{p}"\n' for p in backends)
    return f"""[node]
id = "bench-tls"
admin = "{HOST}:{admin}"
workers = 1

[[certificates]]
name = "bench"
cert = "{cert}"
key = "{key}"

[[pools]]
name = "web"
{servers}
[[listeners]]
name = "tls"
protocol = "https"
bind = "{HOST}:{port}"
pool = "web"
max_connections = 10000
  [listeners.tls]
  certificates = ["bench"]
""" + (f"""
[[pools]]
name = "bulk"
  [[pools.backends]]
  address = "{HOST}:{backends[0]}"

[[listeners]]
name = "bulk"
protocol = "tls"
bind = "{HOST}:{bulk_port}"
pool = "bulk"
  [listeners.tls]
  certificates = ["bench"]
""" if bulk_port is not None else "")


def haproxy_tls_config(backends: list[int], port: int, pem: Path, bulk_port: int | None = None) -> str:
    servers = "".join(f"    server b{i} {HOST}:{p}\n" for i, p in enumerate(backends, 1))
    return f"""global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend tls
    mode http
    option http-keep-alive
    bind {HOST}:{port} ssl crt {pem} alpn http/1.1
    default_backend web

backend web
    mode http
    option http-keep-alive
    http-reuse always
    balance roundrobin
{servers}""" + (f"""
frontend bulk
    mode tcp
    bind {HOST}:{bulk_port} ssl crt {pem}
    default_backend bulk

backend bulk
    mode tcp
    server b1 {HOST}:{backends[0]}
""" if bulk_port is not None else "")


def _bulk(ctx: Context, port: int, seconds: float) -> tuple[float, int]:
    """curl downloads of the 64 MiB file over TLS for ``seconds`` (at least 3): (GB/s, downloads)."""
    total, n, busy = 0, 0, 0.0
    deadline = time.monotonic() + seconds
    while n < 3 or time.monotonic() < deadline:
        cp = subprocess.run(
            ctx._pinned(["curl", "-sk", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                         f"https://{HOST}:{port}{BULK_PATH}"], ctx.client_cpu),
            capture_output=True, text=True, timeout=120)
        size, took = cp.stdout.split()
        if int(size) != BULK_SIZE:
            raise StartError(f"curl got {size} bytes of {BULK_SIZE}")
        total, n, busy = total + int(size), n + 1, busy + float(took)
    return total / busy / 1e9, n


def _wrk(ctx: Context, port: int, seconds: float, close: bool) -> WrkResult:
    argv = ["wrk", f"-t{ctx.opts.threads}", f"-c{ctx.opts.connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "5s", "--latency", "-H", "Host: bench.test"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"https://{HOST}:{port}{SMALL_PATH}")
    cp = subprocess.run(ctx._pinned(argv, ctx.client_cpu), capture_output=True, text=True, timeout=seconds + 30)
    return parse_wrk(cp.stdout)


# s_time sends "GET <www> HTTP/1.0\r\n\r\n", with no Host header. Forwarded as HTTP/1.1
# without one, nginx answers 400 and closes the backend connection, so each handshake also
# paid a new backend connection (HAProxy forwards HTTP/1.0 as it is and reuses its own): the
# path carries a Host line, and a header name for the " HTTP/1.0" s_time appends.
S_TIME_REQUEST = SMALL_PATH + " HTTP/1.0\r\nHost: bench.test\r\nX-Bench:"


def s_time_status(port: int) -> bytes:
    """The status line a balancer answers S_TIME_REQUEST with (one TLS connection from here):
    the handshake figure compares like with like only if both answer 200 from a backend."""
    import socket
    import ssl

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with client.wrap_socket(socket.create_connection((HOST, port), timeout=5)) as sock:
        sock.sendall(f"GET {S_TIME_REQUEST} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def _s_time(ctx: Context, port: int, seconds: float) -> tuple[int, float]:
    """(connections, wall seconds): full handshakes one after another, each with one request."""
    argv = ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-new", "-www", S_TIME_REQUEST,
            "-time", str(max(1, round(seconds)))]
    start = time.monotonic()
    cp = subprocess.run(ctx._pinned(argv, ctx.client_cpu), capture_output=True, text=True, timeout=seconds + 30)
    wall = time.monotonic() - start
    # "N connections in Ts" counts s_time's own user CPU seconds, not wall time: take N only.
    m = re.search(r"(\d+) connections in ([0-9.]+)s", cp.stdout)
    if m is None:
        raise StartError(f"openssl s_time: {(cp.stdout + cp.stderr).strip().splitlines()[-1:]}")
    return int(m.group(1)), wall


def _measure(ctx: Context, port: int, pids: list[int], close: bool) -> tuple[float, float, int, int]:
    """(req/s, balancer CPU us per request, requests, errors)."""
    if close:
        _s_time(ctx, port, ctx.opts.warmup)
        cpu0 = tree_cpu_seconds(pids)
        n, secs = _s_time(ctx, port, ctx.opts.duration)
        cpu1 = tree_cpu_seconds(pids)
        if not n:
            raise StartError("openssl s_time made no connection")
        return n / secs, (cpu1 - cpu0) * 1e6 / n, n, 0
    _wrk(ctx, port, ctx.opts.warmup, close)
    cpu0 = tree_cpu_seconds(pids)
    res = _wrk(ctx, port, ctx.opts.duration, close)
    cpu1 = tree_cpu_seconds(pids)
    if not res.requests:
        raise StartError("wrk completed no request")
    return res.rps, (cpu1 - cpu0) * 1e6 / res.requests, res.requests, res.errors


def _run(ctx: Context, balancers: dict[str, tuple[int, int]], close: bool, name: str) -> L7Row:
    """One measured run through balancer ``name`` (``_measure``'s figures), or why it failed."""
    port, pid = balancers[name]
    try:
        if close and not (status := s_time_status(port)).startswith(b"HTTP/1.1 200"):
            raise StartError(f"answered s_time's request with {status!r}, not a 200")
        rps, cpu, requests, errors = _measure(ctx, port, [pid], close)
    except (StartError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        return L7Row(name, failed=str(exc))
    return L7Row(name, rps=rps, cpu_us_per_req=cpu, requests=requests, errors=errors)


def run(ctx: Context) -> str:
    directory = ctx.tmp / "tls"
    directory.mkdir(exist_ok=True)
    cert, key, pem = _certificate(directory)
    taken = set(ports_of(ctx.ports))
    f_port, f_admin, h_port = pick_port(27443, taken), pick_port(27444, taken), pick_port(27543, taken)
    f_bulk, h_bulk = pick_port(27445, taken), pick_port(27545, taken)
    try:
        ctx.backends()
        backends = list(ctx.ports.backends)
        fulcrum = ctx.fulcrum(fulcrum_tls_config(backends, f_port, f_admin, cert, key, f_bulk),
                              key="fulcrum-tls", ready_ports=[f_port, f_bulk], admin_port=f_admin)
        conf = directory / "haproxy-tls.cfg"
        conf.write_text(haproxy_tls_config(backends, h_port, pem, h_bulk))
        haproxy = ctx.spawn("haproxy-tls", ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
        haproxy.wait_ready([h_port, h_bulk], ctx.opts.start_timeout)
    except StartError as exc:
        return f"not run: {exc}\n"
    balancers = {"Fulcrum": (f_port, fulcrum.pid), "HAProxy": (h_port, haproxy.pid)}
    rows: list[list[object]] = []
    figures: dict[tuple[str, bool], float] = {}
    spreads: dict[bool, str] = {}
    for kind, close in (("full handshake + 1 request", True), ("keep-alive request", False)):
        runs = interleaved(list(balancers), ctx.opts.rounds,
                           functools.partial(_run, ctx, balancers, close))
        for name, results in runs.items():
            row = median_run(results)
            if row.failed or row.cpu_us_per_req is None:
                rows.append([name, kind, "-", "-", "-", f"failed: {row.failed}"])
                continue
            figures[(name, close)] = row.cpu_us_per_req
            note = [row.note] if row.note else []
            rows.append([name, kind, fmt_num(row.rps, 0, thousands=True), fmt_num(row.cpu_us_per_req, 1),
                         row.requests, "; ".join(note + ([f"{row.errors} errors"] if row.errors else []))])
        if ratios := cpu_ratios(runs["HAProxy"], runs["Fulcrum"]):
            spreads[close] = f"{min(ratios):.2f}-{max(ratios):.2f}"
    bulk_rows, gbps = [], {}
    for name, port in (("Fulcrum", f_bulk), ("HAProxy", h_bulk)):
        try:
            gbps[name], n = _bulk(ctx, port, ctx.opts.bulk_duration)
            bulk_rows.append([name, f"{gbps[name]:.2f}", n])
        except (StartError, subprocess.TimeoutExpired, ValueError) as exc:
            bulk_rows.append([name, "-", f"failed: {exc}"])
    status = json.loads(urllib.request.urlopen(f"http://{HOST}:{f_admin}/status", timeout=5).read())
    tls = status["listeners"]["tls"]["tls"]
    ctx.stop("fulcrum-tls")  # frees its ports for the next run
    ctx.stop("haproxy-tls")
    table = render_table(["balancer", "what", "req/s", "CPU us/req", "requests", "note"], rows, "llrrrl")
    targets = []
    for label, close, limit in (("CPU per full handshake", True, HANDSHAKE_TARGET),
                                ("CPU per keep-alive request", False, KEEPALIVE_TARGET)):
        f, h = figures.get(("Fulcrum", close)), figures.get(("HAProxy", close))
        ratio = f / h if f and h else None
        verdict = "-" if ratio is None else ("met" if ratio <= limit else "not met")
        by_round = f" (by round {spreads[close]})" if close in spreads else ""
        targets.append([label, fmt_num(f, 1), fmt_num(h, 1), fmt_ratio(f, h) + by_round, f"<= {limit}x", verdict])
    f, h = gbps.get("Fulcrum"), gbps.get("HAProxy")
    ratio = f / h if f and h else None
    targets.append(["tls listener bulk GB/s", f"{f:.2f}" if f else "-", f"{h:.2f}" if h else "-",
                    fmt_ratio(f, h), f">= {BULK_TARGET}x",
                    "-" if ratio is None else ("met" if ratio >= BULK_TARGET else "not met")])
    return (
        table + "\n\n"
        + render_table(["balancer", "tls bulk GB/s (curl, 64 MiB)", "downloads"], bulk_rows, "lrr") + "\n\n"
        + render_table(["target", "Fulcrum us", "HAProxy us", "ratio", "goal", "status"], targets, "lrrrll")
        + f"\n\n{ctx.opts.rounds} rounds of each measure, the two balancers in turn (forward, then "
        "backward: ABBA); each row is its median run by CPU per request, the ratio that of the "
        "medians, with the range of the round-by-round ratios."
        + f"\n\nFulcrum's listener counted {tls['handshakes']} handshakes, {tls['resumed']} resumed, "
        f"failures {tls['failures'] or 'none'}.\n"
    )


if __name__ == "__main__":
    import tempfile

    from bench.harness import Options

    with tempfile.TemporaryDirectory() as tmp:
        context = Context(Options(duration=5.0, warmup=1.0), Path(__file__).resolve().parent.parent, Path(tmp))
        try:
            print(run(context))
        finally:
            context.close()
