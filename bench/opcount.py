"""``python -m bench.opcount``: Python bytecode instructions per request or per new connection, by function.

CPU time per request (``bench.cpu_ab``) moves by 5-10% from one run to the next on a
shared machine, so a change worth 1-2% of a request cannot be seen in it. The number of
bytecode instructions the interpreter executes for one request does not depend on the
machine's load at all: this tool counts them. Each tree (``--rev`` a git revision,
``--tree`` a directory holding ``lbnode/``; default: this checkout) runs as its own
lbnode beside the bench's nginx backends; one client sends ``--requests`` requests one
after the other on one keep-alive connection (``GET /small``, as wrk does), and a probe
loaded into the node (``sys.settrace`` with opcode events, switched on and off by two
real-time signals) counts the instructions of every function while they are served, and the garbage
collections by generation meanwhile.

``--mode`` picks what one unit of work is (issue 13 measures new connections as well as
requests): ``keepalive`` (the default, above), ``close`` (each request on a new connection
to the http listener with ``Connection: close``, read until the node closes it, so the
accept and the close path are counted) and ``l4`` (the same exchange on a new connection
to the tcp listener in front of the same backend: a new backend connection each time)
and ``tls-new`` (issue 11: each request on a new TLS connection to an https listener
serving the bench's ECDSA P-256 certificate, SNI ``bench.test``, a full TLS 1.3 handshake
with no session resumption, ``Host`` and ``Connection: close``, read until the node
closes it: what ``openssl s_time -new`` in bench/tls.py costs the node, in Python).
Figures are then per connection. ``tls-keepalive``: requests one after the other on one TLS
connection to that listener (figures per request).

``--calls`` counts Python calls by function instead (a coroutine's resumptions included, so
a handler's count is its task's scheduler steps): a function called from C on every step
(a ``__contains__`` Trio asks at each task step, ``lbnode.trioloop``) or a task that steps
more often than the request needs shows there first.

What it does not see: time in C (llhttp, the system calls, ``bytes.join``, dict
lookups), which costs far more per call than an instruction, and the batching of a
loaded node (with one request at a time, every Trio scheduler turn serves one
request; under load one turn serves several, so Trio's share here is its most). So a
lower count is a lower cost of our Python code, not a figure in microseconds; about
10 ns per instruction on the bench machine (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from bench.configs import HOST, SMALL_PATH, Ports, fulcrum_config
from bench.cpu_ab import POLICY_CONFIGS, REPO, _export, algorithm_of
from bench.harness import Context, Options, StartError, pick_port, ports_of
from bench.tls import certificate_in, fulcrum_tls_config

START, STOP, START_GC = signal.SIGRTMIN + 3, signal.SIGRTMIN + 4, signal.SIGRTMIN + 5

# Loaded into the node: counts instructions by function while switched on. Keys name the
# function by its file below site-packages or lbnode/ (so that trees compare) and its name.
PROBE = r"""
import collections, json, signal, sys
from lbnode.cli import main
counts = collections.Counter()
def _key(code):
    f = code.co_filename
    if "site-packages/" in f:
        f = f.split("site-packages/", 1)[1]
    elif "/lib/python3." in f:  # the standard library: collections/__init__.py
        f = f.split("/lib/python3.", 1)[1].split("/", 1)[-1]
    i = f.rfind("lbnode/")
    return (f[i:] if i >= 0 else f) + ":" + code.co_name
def _tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    key = _key(frame.f_code)
    def local(frame, event, arg):
        if event == "opcode":
            counts[key] += 1
        return local
    return local
def _call_tracer(frame, event, arg):  # --calls: each call, and each resumption of a coroutine
    counts[_key(frame.f_code)] += 1
if CALLS:
    _tracer = _call_tracer
import gc
gc_at_start = [0, 0, 0]
def _start(signum, _):
    counts.clear()
    gc_at_start[:] = [s["collections"] for s in gc.get_stats()]
    if signum == START:  # (START_GC: the collections only: tracing allocates frame objects)
        sys.settrace(_tracer)
def _stop(*_):
    sys.settrace(None)
    for gen, s in enumerate(gc.get_stats()):  # collections by generation meanwhile, as pseudo-functions
        counts[f"gc:collections of generation {gen}"] = s["collections"] - gc_at_start[gen]
    with open(OUT, "w") as f:
        json.dump(counts, f)
signal.signal(START, _start)
signal.signal(START_GC, _start)
signal.signal(STOP, _stop)
sys.exit(main())
"""


def area(key: str) -> str:
    """The part of the stack a function belongs to, for the summary."""
    if key.startswith("gc:"):
        return "gc"
    if key.startswith("lbnode/"):
        return "lbnode"
    if key.startswith(("trio/", "outcome/", "<attrs generated methods trio", "<attrs generated methods outcome")):
        return "trio"
    return "other"


def per_request(counts: dict[str, int], requests: int) -> dict[str, float]:
    return {k: v / requests for k, v in counts.items()}


MODES = ("keepalive", "close", "l4", "tls-new", "tls-keepalive")


def _read_response(sock: socket.socket) -> None:
    """Read one whole ``200`` response (framed by Content-Length) from ``sock``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise StartError("the node closed the connection")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise StartError(f"unexpected response {head[:40]!r}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise StartError("the node closed the connection in the middle of a body")
        body += data


class Client:
    """One keep-alive connection sending ``GET /small`` and reading each whole response."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port))
        self.request = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()

    def one(self) -> None:
        self.sock.sendall(self.request)
        _read_response(self.sock)

    def close(self) -> None:
        self.sock.close()


class TlsClient(Client):
    """``Client`` over one TLS connection to the https listener (SNI and Host ``bench.test``):
    issue 11's CPU per keep-alive request over TLS."""

    def __init__(self, port: int) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.sock = context.wrap_socket(socket.create_connection((HOST, port)), server_hostname="bench.test")
        self.request = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: bench.test\r\n\r\n".encode()


class NewConnectionClient:
    """A new connection per ``GET /small`` with ``Connection: close``, read until the node closes it.

    Waiting for the node's FIN (not only the body) keeps the node's close path inside the
    counted window, and the next connection from starting while the last one is torn down.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = (f"GET {SMALL_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                        "Connection: close\r\n\r\n").encode()

    def one(self) -> None:
        with socket.create_connection((HOST, self.port)) as sock:
            sock.sendall(self.request)
            _read_response(sock)
            sock.settimeout(5.0)
            while sock.recv(65536):  # the rest, until the node's FIN
                pass

    def close(self) -> None:
        pass


class NewTlsClient(NewConnectionClient):
    """A new TLS connection per ``GET /small`` (full handshake, SNI ``bench.test``), read
    until the node closes it.

    Each connection gets no session to resume (Python's client resumes only a session it is
    handed), so every one is a full handshake, as with ``openssl s_time -new``. The client's
    Finished and its request leave in one write (OpenSSL over memory buffers): with two writes
    the request is there when the node looks for it after the handshake or not, as the two
    processes race, and the count moved by several percent with the node's own speed.
    """

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.request = (f"GET {SMALL_PATH} HTTP/1.1\r\nHost: bench.test\r\n"
                        "Connection: close\r\n\r\n").encode()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE

    def one(self) -> None:
        with socket.create_connection((HOST, self.port)) as sock:
            sock.settimeout(5.0)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = self.context.wrap_bio(incoming, outgoing, server_hostname="bench.test")
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    _feed(sock, incoming)
            tls.write(self.request)
            sock.sendall(outgoing.read())  # the Finished and the request
            received = b""
            while True:  # the response, until the node closes (close_notify or FIN)
                try:
                    data = tls.read(65536)
                except ssl.SSLWantReadError:
                    if not _feed(sock, incoming):
                        break
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                if not data:
                    break
                received += data
        _check_response(received)


def _feed(sock: socket.socket, incoming: ssl.MemoryBIO) -> bool:
    """One read from ``sock`` into ``incoming``; False at the end of the stream."""
    data = sock.recv(65536)
    if not data:
        incoming.write_eof()
        return False
    incoming.write(data)
    return True


def _check_response(data: bytes) -> None:
    """``data`` is one whole ``200`` response (framed by Content-Length)."""
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise StartError(f"unexpected response {head[:40]!r}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    if len(body) != length:
        raise StartError(f"a body of {len(body)} bytes, {length} announced")


def client_for(mode: str, ports: Ports) -> Client | NewConnectionClient:
    """The client of ``mode``: keep-alive or close on the http listener, l4 on the tcp one,
    tls-new and tls-keepalive on the https one (which the node has on the "web" port in those modes)."""
    if mode == "keepalive":
        return Client(ports.fulcrum_web)
    if mode == "tls-new":
        return NewTlsClient(ports.fulcrum_web)
    if mode == "tls-keepalive":
        return TlsClient(ports.fulcrum_web)
    return NewConnectionClient(ports.fulcrum_bulk if mode == "l4" else ports.fulcrum_web)


def count(ctx: Context, tree: Path, i: int, requests: int, taken: set[int],
          mode: str = "keepalive", variant: str = "", calls: bool = False) -> dict[str, int]:
    """Instructions by function over ``requests`` requests (connections but in the keep-alive
    modes) served by the lbnode of ``tree``; ``calls``: calls (and resumptions) instead.
    ``variant``: "" (the standalone config), "protections" (the protections section's
    settings), "cluster" (a member of the bench's one-member etcd, as the cluster section's)
    or the name of a balancing policy (the standalone config with that policy)."""
    ports = dataclasses.replace(
        ctx.ports,
        fulcrum_web=pick_port(29280 + 10 * i, taken),
        fulcrum_bulk=pick_port(29281 + 10 * i, taken),
        fulcrum_admin=pick_port(29282 + 10 * i, taken),
    )
    taken.update({ports.fulcrum_web, ports.fulcrum_bulk, ports.fulcrum_admin})
    out = ctx.tmp / f"ops{i}.json"
    conf = ctx.tmp / f"ops{i}.toml"
    if mode.startswith("tls-"):  # bench/tls.py's https listener, on the "web" port
        cert, key, _ = certificate_in(ctx.tmp / "tlscert")
        conf.write_text(fulcrum_tls_config(list(ctx.ports.backends), ports.fulcrum_web, ports.fulcrum_admin,
                                           cert, key))
    else:
        member = variant == "cluster"  # a member of the bench's etcd, with its own key prefix
        conf.write_text(fulcrum_config(
            ports, node_id=f"ops{i}", protections=variant == "protections",
            algorithm=algorithm_of(variant),
            etcd=[ctx.etcd()] if member else (), etcd_prefix=f"/fulcrum-opcount-{i}/v1" if member else None,
            state_dir=str(ctx.tmp / f"ops{i}.state") if member else None,
        ))
    probe = (PROBE.replace("START_GC", str(int(START_GC))).replace("START", str(int(START)))
             .replace("STOP", str(int(STOP))).replace("OUT", repr(str(out))).replace("CALLS", str(calls)))
    argv = ["env", f"PYTHONPATH={tree}", sys.executable, "-c", probe, "run", "--config", str(conf)]
    proc = ctx.spawn(f"ops{i}", argv)
    ready = [ports.fulcrum_web] if mode.startswith("tls-") else [ports.fulcrum_web, ports.fulcrum_bulk]
    proc.wait_ready(ready, ctx.opts.start_timeout)
    client = client_for(mode, ports)
    try:
        for _ in range(50):  # warm-up: the backend connection, caches
            client.one()
        # Garbage collections first, untraced (tracing makes frame objects the collector counts).
        collections_only = _phase(proc.pid, START_GC, client, requests, out)
        # The first request after the switch resumes frames that started before it: not counted.
        os.kill(proc.pid, START)
        time.sleep(0.2)
        client.one()
        counts = _phase(proc.pid, START, client, requests, out)  # starts the count again, from zero
        counts.update((k, v) for k, v in collections_only.items() if k.startswith("gc:"))
        return counts
    finally:
        client.close()
        proc.stop()


def _phase(pid: int, start: int, client: Client | NewConnectionClient, requests: int, out: Path) -> dict[str, int]:
    out.unlink(missing_ok=True)
    os.kill(pid, start)
    time.sleep(0.2)
    for _ in range(requests):
        client.one()
    os.kill(pid, STOP)
    for _ in range(100):
        if out.exists() and out.stat().st_size:
            break
        time.sleep(0.05)
    with open(out) as f:
        counts: dict[str, int] = json.load(f)
    return counts


def report(name: str, counts: dict[str, float], top: int, unit: str = "request", what: str = "instructions") -> list[str]:
    by_area: dict[str, float] = collections.defaultdict(float)
    for k, v in counts.items():
        by_area[area(k)] += v
    total = sum(v for k, v in counts.items() if area(k) != "gc")
    lines = [f"{name}: {total:.0f} {what} per {unit} ("
             + ", ".join(f"{a} {by_area[a]:.0f}" for a in ("lbnode", "trio", "other")) + ")"]
    gcs = [f"{1000 * v:.2f}" for k, v in sorted(counts.items()) if area(k) == "gc"]
    if gcs:
        lines.append(f"  garbage collections per 1000 {unit}s, generations 0/1/2: {'/'.join(gcs)}")
    for k, v in sorted(((k, v) for k, v in counts.items() if area(k) != "gc"), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {v:7.1f}  {k}")
    return lines


def compare(a: dict[str, float], b: dict[str, float], top: int) -> list[str]:
    """The functions whose count changed most, second tree minus first."""
    keys = set(a) | set(b)
    diffs = sorted(((b.get(k, 0.0) - a.get(k, 0.0), k) for k in keys), key=lambda d: -abs(d[0]))
    return [f"  {d:+7.1f}  {k}" for d, k in diffs[:top] if abs(d) >= 0.5]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.opcount", description=__doc__.splitlines()[0])
    p.add_argument("--rev", action="append", help="a git revision to count (repeatable)")
    p.add_argument("--tree", action="append", type=Path, help="a directory holding lbnode/ (repeatable)")
    p.add_argument("--mode", choices=MODES, default="keepalive",
                   help="keepalive: requests on one connection; close: a new http connection per "
                        "request; l4: a new tcp-listener connection per exchange; tls-new: a new TLS "
                        "connection (full handshake) per request; tls-keepalive: requests on one TLS connection "
                        "(default keepalive)")
    p.add_argument("--requests", type=int, default=300,
                   help="requests (connections in close, l4 and tls-new modes) counted per tree (default 300)")
    p.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    p.add_argument("--calls", action="store_true",
                   help="count Python calls by function (a coroutine's resumptions included: its task's "
                        "steps) instead of instructions: what a function costs per call, and how many "
                        "scheduler turns a request takes")
    p.add_argument("--protections", action="store_true",
                   help="count each tree without, then with the protections section's settings (health "
                        "checks, outlier detection, limits, a rate limit): the difference is their cost")
    p.add_argument("--cluster", action="store_true",
                   help="count each tree standalone, then as a cluster member (etcd started by the bench, "
                        "pools followed through a watch, a lease kept alive): the difference is what "
                        "membership costs the data path's thread (etcd's own threads are not counted)")
    p.add_argument("--policy", choices=POLICY_CONFIGS,
                   help="count each tree with round robin, then with this balancing policy")
    args = p.parse_args(argv)
    if sum(map(bool, (args.protections, args.cluster, args.policy))) > 1:
        p.error("--protections, --cluster, --policy: one comparison at a time")
    variant = "protections" if args.protections else "cluster" if args.cluster else args.policy or ""
    unit = "request" if args.mode in ("keepalive", "tls-keepalive") else "connection"
    tmp = Path(tempfile.mkdtemp(prefix="opcount-"))
    trees: list[tuple[str, Path]] = []
    for rev in args.rev or []:
        trees.append((rev, _export(rev, tmp / f"rev{len(trees)}")))
    for tree in args.tree or []:
        trees.append((str(tree), tree))
    if not trees:
        trees.append(("worktree", REPO))
    ctx = Context(Options(start_timeout=30.0, pin=False), REPO, tmp)
    try:
        ctx.backends()
        taken = set(ports_of(ctx.ports))
        results = []
        variants = [(f"{name}{' +' + v if v else ''}", tree, v) for name, tree in trees
                    for v in (("", variant) if variant else ("",))]
        for i, (name, tree, v) in enumerate(variants):
            counts = per_request(count(ctx, tree, i, args.requests, taken, args.mode, v, args.calls), args.requests)
            results.append(counts)
            print("\n".join(report(name, counts, args.top, unit, "calls" if args.calls else "instructions")),
                  flush=True)
        if len(results) >= 2:
            print(f"{variants[1][0]} - {variants[0][0]}, per {unit}:")
            print("\n".join(compare(results[0], results[1], args.top)))
    except StartError as exc:
        print(f"opcount: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
