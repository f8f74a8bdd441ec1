"""Slow clients against a real ``lbnode run`` process: slowloris, clients that never read,
backends that trickle. What is checked is what an ordinary client and the operator see.

``FLOOD_SLOWLORIS`` sets the number of slowloris connections (default 2000, what CI
time allows on 2 cores); ``make flood`` runs this file with 10,000.
"""

from __future__ import annotations

import os
import resource
import select
import selectors
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import (
    REPO,
    free_port,
    listener_toml,
    node_toml,
    pool_toml,
    spawn_backend,
    wait_port,
)

HOST = "127.0.0.1"
SLOWLORIS = int(os.environ.get("FLOOD_SLOWLORIS", "2000"))
INTERVAL = 2.0  # one byte per attacker this often ("every few seconds")
# A measuring phase: two intervals, so every attacker sends during it.
PHASE = 2 * INTERVAL
ROUNDS = 3  # unloaded, loaded, interleaved: the host's other load falls on both alike
# Per-connection memory of an open client connection whose head is still coming: the
# connection's task, socket, parser and a few small buffers, about 10 KiB measured
# (docs/configuration.md, "Memory per connection"); 32 KiB leaves 3x for allocator slack.
RSS_PER_SLOW_CONNECTION = 32 * 1024
# The bound is p99 under 2x the unloaded one, and `make flood` (FLOOD_SLOWLORIS set)
# holds the node to exactly that. In `make test` other suites share the 2 cores: an unloaded p99
# of 0.6 ms then moves by a few scheduler slices of the processes beside the node (2.3 and 4.4 ms
# were seen at load 15 in one CI run, neither the node's doing), so the suite allows 5 ms on top.
# A node that really let slow clients hold up others (tens of ms, as before the fixes) still fails.
P99_SLACK = 0.0 if "FLOOD_SLOWLORIS" in os.environ else 0.005


def node_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def raise_fd_limit(need: int) -> None:
    """This test process and the node it starts need a descriptor per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard >= need, f"ulimit -n hard limit {hard} < {need} needed for {SLOWLORIS} connections"
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_node(spawn, tmp_path: Path, backend: int, listener_extra: str = "", node_extra: str = "") -> tuple[object, int, int]:  # type: ignore[no-untyped-def]
    port, admin = free_port(), free_port()
    text = node_toml(
        pool_toml("p", [f"{HOST}:{backend}"]),
        listener_toml("web", "http", "p", bind=f"{HOST}:{port}", extra=listener_extra, backlog=4096),
        admin=f"{HOST}:{admin}",
        node_extra='drain_timeout = "1s"\n' + node_extra,
    )
    config = tmp_path / "node.toml"
    config.write_text(text)
    proc = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_port(port)
    wait_port(admin)
    return proc, port, admin


def open_connections(admin: int) -> int:
    return int(httpx.get(f"http://{HOST}:{admin}/status", timeout=10).json()["connections"]["open"])


def wait_open_at_most(admin: int, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (got := open_connections(admin)) > n:
        assert time.monotonic() < deadline, f"{got} client connections still open after {timeout}s, expected <= {n}"
        time.sleep(0.1)


def wait_open_at_least(admin: int, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (got := open_connections(admin)) < n:
        assert time.monotonic() < deadline, f"only {got} client connections open after {timeout}s, expected {n}"
        time.sleep(0.1)


def timed_requests(port: int, seconds: float) -> list[float]:
    """Closed loop on one keep-alive connection for ``seconds``: each request's latency."""
    out = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            s.sendall(b"GET / HTTP/1.1\r\nHost: ordinary\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                assert chunk, "the node closed an ordinary client's connection"
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                              if k.strip().lower() == b"content-length"))
            while len(body) < length:
                body += s.recv(65536)
            out.append(time.perf_counter() - t0)
            assert body == b"b1\n"
    return out


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_slowloris_leaves_an_ordinary_client_served_with_its_p99_under_2x(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raise_fd_limit(SLOWLORIS + 1024)  # the attackers' process and the node inherit it (one each per connection)
    backend = spawn_backend(spawn, "b1")
    proc, port, admin = start_node(spawn, tmp_path, backend)
    timed_requests(port, 1.0)  # warm-up: backend connection, code paths, allocator
    rss_before = node_rss(proc.pid)  # type: ignore[attr-defined]
    unloaded: list[float] = []
    loaded: list[float] = []
    rss_loaded = 0
    for _ in range(ROUNDS):
        unloaded += timed_requests(port, PHASE)
        attackers = subprocess.Popen(
            [sys.executable, "-m", "tests.slowclients", "--port", str(port), "--count", str(SLOWLORIS),
             "--interval", str(INTERVAL)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            assert attackers.stdout is not None
            # Each attacker connected once (never hang here: the node may refuse in a bad case).
            ready = select.select([attackers.stdout], [], [], max(30.0, SLOWLORIS / 200))[0]
            assert ready, "the slowloris attackers did not all connect"
            line = attackers.stdout.readline()
            assert line == f"ready {SLOWLORIS}\n".encode(), line
            # Connected means in the backlog; the node accepts ~1,000 a second on a loaded host.
            # At 10,000 the first attackers may reach the header timeout (10 s, then 408 and a
            # reconnect) before the last is accepted: 90% of them open at once is the flood.
            wait_open_at_least(admin, int(SLOWLORIS * 0.9), timeout=max(10.0, SLOWLORIS / 500))
            loaded += timed_requests(port, PHASE)
            rss_loaded = max(rss_loaded, node_rss(proc.pid))  # type: ignore[attr-defined]
        finally:
            attackers.kill()
            attackers.wait(10)
            attackers.stdout.close()  # type: ignore[union-attr]
        wait_open_at_most(admin, 0, timeout=10)  # the node lets go of every attacker
    base, under_attack = p99(unloaded), p99(loaded)
    growth = rss_loaded - rss_before
    print(f"slowloris x{SLOWLORIS}: p99 unloaded {base * 1000:.2f} ms ({len(unloaded)} requests), "
          f"loaded {under_attack * 1000:.2f} ms ({len(loaded)}); node RSS +{growth / 2**20:.1f} MiB "
          f"({growth / SLOWLORIS / 1024:.1f} KiB per connection)")
    assert under_attack < 2 * base + P99_SLACK, (
        f"p99 {under_attack * 1000:.2f} ms under slowloris, unloaded {base * 1000:.2f} ms")
    assert growth < SLOWLORIS * RSS_PER_SLOW_CONNECTION, f"node RSS grew {growth / 2**20:.1f} MiB"


# Clients that never read: each asks for far more than the kernel buffers hold. Before one
# stalls the node pushes ~4 MiB into its socket (Linux autotunes the send buffer up to
# net.ipv4.tcp_wmem's maximum) and ~1.5 MiB wait in the backend socket: on a loaded 2-core
# host that takes ~25 ms of the node's loop per client, so 50 of them stall within ~1.5 s.
NEVER_READ = 50
SEND_TIMEOUT = 5.0  # [listeners.timeouts] idle: also how long a send to a client may stall
# What the node may hold for a client that stopped reading: the piece of the response in
# transit (proxy.RECV_SIZE, 64 KiB) and the connection's fixed part (~10 KiB), 3x for
# allocator slack; the rest of the response stays in the backend (back-pressure).
RSS_PER_STALLED_CONNECTION = 3 * (64 + 10) * 1024


def test_clients_that_never_read_are_closed_by_the_send_timeout_in_bounded_memory(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raise_fd_limit(4 * NEVER_READ + 1024)
    backend = spawn_backend(spawn, "b1")
    timeouts = f'  [listeners.timeouts]\n  idle = "{SEND_TIMEOUT}s"\n'
    proc, port, admin = start_node(spawn, tmp_path, backend, listener_extra=timeouts)
    timed_requests(port, 0.5)
    rss_before = node_rss(proc.pid)  # type: ignore[attr-defined]
    socks = []
    try:
        for _ in range(NEVER_READ):
            s = socket.create_connection((HOST, port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stall early, as a phone would
            s.sendall(b"GET /bytes?n=1000000000 HTTP/1.1\r\nHost: reader\r\n\r\n")
            socks.append(s)
        wait_open_at_least(admin, NEVER_READ, timeout=10)
        time.sleep(1.0)  # every response is stalled now; none has timed out yet (5 s)
        rss_stalled = node_rss(proc.pid)  # type: ignore[attr-defined]
        assert open_connections(admin) == NEVER_READ
        # An ordinary client is still served meanwhile.
        assert timed_requests(port, 0.5)
        # Closed within the send timeout (+2 s: the stall starts once the kernel buffers fill,
        # and a loaded host is slow to get there), and with them their backend connections.
        t0 = time.monotonic()
        wait_open_at_most(admin, 0, timeout=SEND_TIMEOUT + 2.0)
        closed_after = time.monotonic() - t0
        inflight = httpx.get(f"http://{HOST}:{admin}/status", timeout=10).json()["pools"][0]["backends"][0]["inflight"]
        assert inflight == 0
    finally:
        for s in socks:
            s.close()
    growth = rss_stalled - rss_before
    print(f"never-read x{NEVER_READ}: closed {closed_after:.2f}s after the check began; node RSS "
          f"+{growth / 2**20:.1f} MiB ({growth / NEVER_READ / 1024:.1f} KiB per connection)")
    assert growth < NEVER_READ * RSS_PER_STALLED_CONNECTION, f"node RSS grew {growth / 2**20:.1f} MiB"


# A backend that trickles: its response body comes one byte per TRICKLE_GAP.
TRICKLE_BYTES = 10
TRICKLE_GAP = 0.3  # well inside the pool's response timeout (30 s): never a 504
TRICKLERS = 100
# A trickled response ties up a client connection and a backend connection: 2 x ~10 KiB,
# 3x for allocator slack.
RSS_PER_TRICKLE = 3 * 2 * 10 * 1024


class _Trickle(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        data = b""
        while True:  # one keep-alive connection from the node may carry several requests
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            data = data.split(b"\r\n\r\n", 1)[1]
            try:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TRICKLE_BYTES)
                for _ in range(TRICKLE_BYTES):
                    time.sleep(TRICKLE_GAP)
                    sock.sendall(b"t")
            except OSError:
                return


class _TrickleServer(socketserver.ThreadingTCPServer):
    request_queue_size = 1024  # socketserver's 5 would overflow with the node's 100 connections at once
    daemon_threads = True


@contextmanager
def trickling_backend() -> Iterator[int]:
    server = _TrickleServer((HOST, 0), _Trickle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def trickled_fetches(port: int, n: int, out: dict[str, list[float]]) -> None:
    """``n`` clients at once get /trickle; for each, when its first and its last body byte came."""
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    state = {}
    for _ in range(n):
        s = socket.create_connection((HOST, port), timeout=10)
        s.sendall(b"GET /trickle HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        state[s] = [b"", None]
    try:
        deadline = t0 + TRICKLE_BYTES * TRICKLE_GAP + 10
        while state and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                chunk = s.recv(65536)  # type: ignore[union-attr]
                entry = state[s]  # type: ignore[index]
                if chunk:
                    entry[0] += chunk
                    if entry[1] is None and len(entry[0].split(b"\r\n\r\n", 1)[-1]) > 0 and b"\r\n\r\n" in entry[0]:
                        entry[1] = time.monotonic() - t0
                    continue
                head, _, body = entry[0].partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert body == b"t" * TRICKLE_BYTES, body
                out["first"].append(entry[1])
                out["last"].append(time.monotonic() - t0)
                sel.unregister(s)
                s.close()  # type: ignore[union-attr]
                del state[s]  # type: ignore[arg-type]
        assert not state, f"{len(state)} trickled responses not complete"
    finally:
        for s in state:
            s.close()
        sel.close()


def test_a_trickling_backend_is_streamed_and_does_not_slow_other_clients(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raise_fd_limit(4 * TRICKLERS + 1024)
    backend = spawn_backend(spawn, "b1")
    with trickling_backend() as slow:
        route = '  [[listeners.routes]]\n  path_prefix = "/trickle"\n  pool = "slow"\n'
        port, admin = free_port(), free_port()
        config = tmp_path / "node.toml"
        config.write_text(node_toml(
            pool_toml("p", [f"{HOST}:{backend}"]), pool_toml("slow", [f"{HOST}:{slow}"]),
            listener_toml("web", "http", "p", bind=f"{HOST}:{port}", extra=route),
            admin=f"{HOST}:{admin}", node_extra='drain_timeout = "1s"\n',
        ))
        proc = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
        wait_port(port)
        wait_port(admin)
        timed_requests(port, 0.5)
        rss_before = node_rss(proc.pid)
        unloaded = timed_requests(port, 2.0)
        got: dict[str, list[float]] = {"first": [], "last": []}
        errors: list[BaseException] = []

        def fetch() -> None:
            try:
                trickled_fetches(port, TRICKLERS, got)
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        fetcher = threading.Thread(target=fetch)
        fetcher.start()
        time.sleep(0.5)  # every trickler connected and waiting on its bytes
        loaded = timed_requests(port, 2.0)
        rss_during = node_rss(proc.pid)
        fetcher.join(TRICKLE_BYTES * TRICKLE_GAP + 15)
        assert not errors, errors[0]
    assert len(got["last"]) == TRICKLERS
    # Streamed, not buffered to the end: the first byte reaches the client long before the last
    # is sent (which takes TRICKLE_BYTES * TRICKLE_GAP = 3 s); 1.5 s of margin for a loaded host.
    assert max(got["first"]) < TRICKLE_GAP + 1.5, f"first body byte after {max(got['first']):.2f}s"
    assert min(got["last"]) >= (TRICKLE_BYTES - 1) * TRICKLE_GAP
    base, during = p99(unloaded), p99(loaded)
    growth = rss_during - rss_before
    print(f"trickle x{TRICKLERS}: first byte by {max(got['first']):.2f}s, last {min(got['last']):.2f}-"
          f"{max(got['last']):.2f}s; ordinary p99 {base * 1000:.2f} -> {during * 1000:.2f} ms; "
          f"RSS +{growth / 2**20:.1f} MiB")
    assert during < 2 * base + P99_SLACK, (
        f"p99 {during * 1000:.2f} ms beside trickling responses, {base * 1000:.2f} ms before")
    assert growth < TRICKLERS * RSS_PER_TRICKLE, f"node RSS grew {growth / 2**20:.1f} MiB"


# A head trickled a byte at a time wakes the node's connection task only at line ends
# (lbnode.sockio.TrickleWaits): what the client sees must be what it saw before.
TRICKLE_HEAD_GAP = 0.05  # between the bytes of a trickled header value
# A client that leaves mid-head is let go at once (EPOLLRDHUP), not at the header timeout
# (10 s): 2 s of margin for a busy host.
LEFT_WITHIN = 2.0


def test_a_head_trickled_a_byte_at_a_time_is_served_and_one_left_mid_line_is_let_go_at_once(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    backend = spawn_backend(spawn, "b1")
    _proc, port, admin = start_node(spawn, tmp_path, backend)
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: trickle\r\nX-Slow: ")
        for _ in range(10):
            time.sleep(TRICKLE_HEAD_GAP)
            s.sendall(b"a")
        time.sleep(TRICKLE_HEAD_GAP)
        s.sendall(b"\r")
        time.sleep(TRICKLE_HEAD_GAP)
        s.sendall(b"\n\r")  # the end of the header line, then the head's last line in two pieces
        time.sleep(TRICKLE_HEAD_GAP)
        s.sendall(b"\n")
        data = b""
        while not data.endswith(b"b1\n"):
            chunk = s.recv(65536)
            assert chunk, f"closed before the response: {data!r}"
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data
    leavers = []
    for _ in range(20):
        c = socket.create_connection((HOST, port), timeout=10)
        c.sendall(b"GET / HTTP/1.1\r\nHost: leaver\r\nX-Slow: a")
        leavers.append(c)
    wait_open_at_least(admin, 20, timeout=10)
    time.sleep(0.2)  # the node has read what they sent and waits for the rest of the line
    for c in leavers:
        c.sendall(b"a")  # one more byte, no line end: nothing for the task yet
        c.shutdown(socket.SHUT_WR)  # and the client is gone (its FIN behind the unread byte)
    t0 = time.monotonic()
    wait_open_at_most(admin, 0, timeout=LEFT_WITHIN)
    print(f"20 clients that left mid-head let go after {time.monotonic() - t0:.2f}s")
    for c in leavers:
        c.close()


def test_the_node_holds_every_slowloris_connection_up_to_max_connections_and_serves_ordinary_clients(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Not timed: all SLOWLORIS attackers accepted and held at once under a max_connections sized
    for them, ordinary requests answered in full meanwhile, memory within its bound."""
    raise_fd_limit(SLOWLORIS + 1024)
    backend = spawn_backend(spawn, "b1")
    # A head timeout longer than the test, so that no attacker is cut and reconnects: all are held.
    timeouts = '  [listeners.timeouts]\n  header = "120s"\n'
    proc, port, admin = start_node(spawn, tmp_path, backend, listener_extra=timeouts,
                                   node_extra=f"max_connections = {SLOWLORIS + 100}\n")
    timed_requests(port, 0.5)  # warm-up
    rss_before = node_rss(proc.pid)  # type: ignore[attr-defined]
    attackers = subprocess.Popen(
        [sys.executable, "-m", "tests.slowclients", "--port", str(port), "--count", str(SLOWLORIS),
         "--interval", "2", "--max-interval", "5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert attackers.stdout is not None
        assert select.select([attackers.stdout], [], [], max(30.0, SLOWLORIS / 200))[0], "attackers did not connect"
        assert attackers.stdout.readline() == f"ready {SLOWLORIS}\n".encode()
        wait_open_at_least(admin, SLOWLORIS, timeout=max(20.0, SLOWLORIS / 200))
        status = httpx.get(f"http://{HOST}:{admin}/status", timeout=10).json()["connections"]
        assert status["max"] == SLOWLORIS + 100
        for _ in range(3):  # every attacker sends bytes meanwhile (one each 2-5 s)
            assert len(timed_requests(port, 1.0)) > 0  # each one a 200 with its whole body
        assert open_connections(admin) >= SLOWLORIS  # none of them cut
        growth = node_rss(proc.pid) - rss_before  # type: ignore[attr-defined]
    finally:
        attackers.kill()
        attackers.wait(10)
        attackers.stdout.close()  # type: ignore[union-attr]
    wait_open_at_most(admin, 0, timeout=10)  # the node lets go of every one
    print(f"held {SLOWLORIS} slowloris; RSS +{growth / 2**20:.1f} MiB ({growth / SLOWLORIS / 1024:.1f} KiB each)")
    assert growth < SLOWLORIS * RSS_PER_SLOW_CONNECTION, f"node RSS grew {growth / 2**20:.1f} MiB"
