"""[listeners.access_log] and request_id on real nodes, real backends and real clients (raw sockets,
Python ssl): the JSON fields of each kind of entry, the combined format, logrotate with SIGUSR1,
a stdout nobody reads, and X-Request-Id kept, made and replaced."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

from lbnode.proxyproto import encode_v1, encode_v2
from tests.conftest import (
    free_port,
    http_get,
    listener_toml,
    node_toml,
    pool_toml,
    start_backends,
    start_node,
    wait_port,
)
from tests.integration.test_metrics import promtool_check, scrape
from tests.promtext import value
from tests.tlsgen import make_ca, make_leaf

# Entries reach the file within the writer's interval (0.1 s); 10 s leaves room for 2 busy cores.
LOG_WAIT = 10.0
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# Fields whose values depend on timing: checked apart, by range.
TIMED = ("time", "duration_ms", "backend_ms")
FIELDS = ["time", "listener", "protocol", "client_ip", "client_port", "method", "host", "path", "version",
          "status", "bytes_in", "bytes_out", "duration_ms", "backend_ms", "pool", "backend", "retries",
          "reason", "request_id", "user_agent", "referer", "tls_version", "sni"]


def access_log_toml(path: Path | str, **settings: object) -> str:
    lines = ["  [listeners.access_log]", f'  path = "{path}"']
    lines += [f"  {k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def exchange(port: int, request: bytes, wrap: ssl.SSLContext | None = None, sni: str | None = None,
             ) -> tuple[bytes, int]:
    """Send ``request`` on a new connection, read until the server closes: (response, client port)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        client_port = raw.getsockname()[1]
        sock = wrap.wrap_socket(raw, server_hostname=sni) if wrap is not None else raw
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # closed with our bytes unread (an L4 client the node refused)
        return b"".join(chunks), client_port


async def aexchange(port: int, request: bytes, **kwargs: object) -> tuple[bytes, int]:
    return await trio.to_thread.run_sync(lambda: exchange(port, request, **kwargs))  # type: ignore[arg-type]


def read_entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a line was written in pieces"
    return [json.loads(line) for line in text.splitlines()]


async def wait_entries(path: Path, n: int) -> list[dict]:
    with trio.move_on_after(LOG_WAIT):
        while len(entries := read_entries(path)) < n:
            await trio.sleep(0.05)
        return entries
    raise AssertionError(f"{path}: {len(read_entries(path))} entries after {LOG_WAIT}s, expected {n}")


def check_timed(entry: dict, before: float, after: float) -> dict:
    """The timing fields are plausible; returns the entry without them."""
    assert list(entry) == FIELDS
    t = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert before - 0.002 <= t <= after + 0.002, (before, entry["time"], after)
    assert 0 <= entry["duration_ms"] <= (after - before) * 1000 + 1
    if entry["backend_ms"] is not None:
        assert 0 <= entry["backend_ms"] <= entry["duration_ms"]
    return {k: v for k, v in entry.items() if k not in TIMED}


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def response_headers(response: bytes) -> list[tuple[str, str]]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [(k.lower(), v) for k, _, v in (line.partition(": ") for line in head)]


def echoed(response: bytes, name: str) -> list[str]:
    """Values of a header the demo backend's /echo says it received."""
    lines = body_of(response).decode("latin-1").split("\n\n", 1)[0].splitlines()[1:]
    return [v for k, _, v in (line.partition(": ") for line in lines) if k.lower() == name]


async def test_proxied_and_local_answers_have_every_field(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        pool_toml("empty", []),
        listener_toml("front", "http", "web", extra=access_log_toml(path)
                      + '  [[listeners.routes]]\n  path_prefix = "/none/"\n  pool = "empty"\n'),
        listener_toml("limited", "http", "web", extra=access_log_toml(path)
                      + "  [listeners.rate_limit]\n  rate = 0.001\n  burst = 1\n"),
    ))
    front, limited = bound.listeners["front"][1], bound.listeners["limited"][1]
    before = time.time()
    proxied = (b"GET /echo?x=1 HTTP/1.1\r\nHost: WWW.Example.test:8080\r\nUser-Agent: t/1\r\n"
               b"Referer: http://r.example/\r\nConnection: close\r\n\r\n")
    ok, p_ok = await aexchange(front, proxied)
    err_request = b"GET /status/503 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    err, p_err = await aexchange(front, err_request)
    none_request = b"GET /none/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    none, p_none = await aexchange(front, none_request)
    bad, p_bad = await aexchange(front, b"NONSENSE\r\n\r\n")
    first, p_first = await aexchange(limited, b"GET / HTTP/1.0\r\n\r\n")
    limit, p_limit = await aexchange(limited, b"GET / HTTP/1.0\r\n\r\n")
    after = time.time()
    assert [r.split(b" ", 2)[1] for r in (ok, err, none, bad, first, limit)] == [
        b"200", b"503", b"503", b"400", b"200", b"429"]

    entries = {e["client_port"]: e for e in await wait_entries(path, 6)}
    assert len(entries) == 6
    common = {"client_ip": "127.0.0.1", "version": "1.1", "retries": 0, "request_id": None, "user_agent": None,
              "referer": None, "tls_version": None, "sni": None, "protocol": "http", "listener": "front"}
    assert check_timed(entries[p_ok], before, after) == {
        **common, "client_port": p_ok, "method": "GET", "host": "www.example.test", "path": "/echo?x=1",
        "status": 200, "bytes_in": len(proxied), "bytes_out": len(ok), "pool": "web", "backend": a.address,
        "reason": None, "user_agent": "t/1", "referer": "http://r.example/",
    }
    assert entries[p_ok]["backend_ms"] is not None
    # the backend's own 503 passes through: no reason of the node's
    assert check_timed(entries[p_err], before, after) == {
        **common, "client_port": p_err, "method": "GET", "host": "h", "path": "/status/503", "status": 503,
        "bytes_in": len(err_request), "bytes_out": len(err), "pool": "web", "backend": a.address, "reason": None,
    }
    # the node's answers: their reason, and no backend time
    assert check_timed(entries[p_none], before, after) == {
        **common, "client_port": p_none, "method": "GET", "host": "h", "path": "/none/x", "status": 503,
        "bytes_in": len(none_request), "bytes_out": len(none), "pool": "empty", "backend": None,
        "reason": "no backend available in pool empty",
    }
    assert entries[p_none]["backend_ms"] is None
    reason = body_of(bad).decode().removeprefix("400 Bad Request: ").strip()
    assert check_timed(entries[p_bad], before, after) == {
        **common, "client_port": p_bad, "method": None, "host": None, "path": None, "version": None, "status": 400,
        "bytes_in": len(b"NONSENSE\r\n\r\n"), "bytes_out": len(bad), "pool": None, "backend": None, "reason": reason,
    }
    assert reason.startswith("malformed")
    lim = {**common, "listener": "limited", "version": "1.0", "host": None, "method": "GET", "path": "/",
           "bytes_in": len(b"GET / HTTP/1.0\r\n\r\n")}
    assert check_timed(entries[p_first], before, after) == {
        **lim, "client_port": p_first, "status": 200, "bytes_out": len(first), "pool": "web", "backend": a.address,
        "reason": None,
    }
    assert check_timed(entries[p_limit], before, after) == {
        **lim, "client_port": p_limit, "status": 429, "bytes_out": len(limit), "pool": None, "backend": None,
        "reason": "rate limit of 0.001/s exceeded",
    }

    r, metrics = await scrape(bound.admin[1])
    await promtool_check(r.text)
    status = (await http_get(f"http://127.0.0.1:{bound.admin[1]}/status")).json()
    assert status["listeners"]["front"]["access_log"] == {
        "path": str(path), "format": "json", "written": 4, "dropped": 0, "buffered": 0}
    assert value(metrics, "fulcrum_access_log_written_total", listener="front") == 4
    assert value(metrics, "fulcrum_access_log_written_total", listener="limited") == 2
    assert value(metrics, "fulcrum_access_log_dropped_total", listener="front") == 0


async def test_retries_are_counted_and_the_last_backend_named(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused, then the request moves on
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [dead, a.address], algorithm="round_robin", retries=1),
        listener_toml("front", "http", "web", extra=access_log_toml(path)),
    ))
    port = bound.listeners["front"][1]
    ports = []
    for _ in range(2):  # round robin: one of the two starts with the dead backend
        response, p = await aexchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200")
        ports.append(p)
    entries = {e["client_port"]: e for e in await wait_entries(path, 2)}
    assert sorted(entries[p]["retries"] for p in ports) == [0, 1]
    assert {entries[p]["backend"] for p in ports} == {a.address}
    assert {entries[p]["reason"] for p in ports} == {None}


async def test_l4_connection_logs_bytes_both_ways(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        pool_toml("empty", []),
        listener_toml("l4", "tcp", "web", extra=access_log_toml(path)),
        listener_toml("nowhere", "tcp", "empty", extra=access_log_toml(path)),
    ))
    before = time.time()
    request = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n" + b"x" * 5000
    response, p = await aexchange(bound.listeners["l4"][1], request)
    refused, p_refused = await aexchange(bound.listeners["nowhere"][1], b"hello")
    after = time.time()
    assert response.startswith(b"HTTP/1.1 200") and len(response) > 5000 and refused == b""
    entries = {e["client_port"]: e for e in await wait_entries(path, 2)}
    nulls = dict.fromkeys(["method", "host", "path", "version", "status", "request_id", "user_agent", "referer",
                           "tls_version", "sni"])
    assert check_timed(entries[p], before, after) == {
        **nulls, "listener": "l4", "protocol": "tcp", "client_ip": "127.0.0.1", "client_port": p,
        "bytes_in": len(request), "bytes_out": len(response), "pool": "web", "backend": a.address,
        "retries": 0, "reason": None,
    }
    assert entries[p]["backend_ms"] is not None  # the connect time
    assert check_timed(entries[p_refused], before, after) == {
        **nulls, "listener": "nowhere", "protocol": "tcp", "client_ip": "127.0.0.1", "client_port": p_refused,
        "bytes_in": 0, "bytes_out": 0, "pool": "empty", "backend": None, "retries": 0,
        "reason": "no backend available in pool empty",
    }


async def test_tls_listeners_log_version_and_sni(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    crt, key = make_leaf(ca, ["www.example.com"]).write(tmp_path, "www")
    path = tmp_path / "access.log"
    tls = '  [listeners.tls]\n  certificates = ["www"]\n'
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        f'[[certificates]]\nname = "www"\ncert = "{crt}"\nkey = "{key}"\n',
        listener_toml("secure", "https", "web", extra=tls + access_log_toml(path)),
        listener_toml("tunnel", "tls", "web", extra=tls + access_log_toml(path)),
        listener_toml("passthrough", "tcp", "web", extra=access_log_toml(path)
                      + '  [[listeners.sni_routes]]\n  server_name = "www.example.com"\n  pool = "web"\n'),
    ))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
    https, p_https = await aexchange(bound.listeners["secure"][1], request, wrap=ctx, sni="www.example.com")
    tunnel, p_tunnel = await aexchange(bound.listeners["tunnel"][1], request, wrap=ctx, sni="www.example.com")
    # passthrough: the backend speaks plain HTTP, so the handshake fails; the ClientHello's name is logged
    plain = ssl.create_default_context()
    with pytest.raises(ssl.SSLError):
        await aexchange(bound.listeners["passthrough"][1], request, wrap=plain, sni="www.example.com")
    assert https.startswith(b"HTTP/1.1 200") and tunnel.startswith(b"HTTP/1.1 200")
    entries = await wait_entries(path, 3)
    by_listener = {e["listener"]: e for e in entries}
    assert {k: by_listener["secure"][k] for k in ("protocol", "client_port", "status", "tls_version", "sni")} == {
        "protocol": "https", "client_port": p_https, "status": 200, "tls_version": "TLSv1.3", "sni": "www.example.com"}
    assert by_listener["secure"]["bytes_out"] == len(https)  # inside TLS
    assert {k: by_listener["tunnel"][k] for k in ("protocol", "client_port", "status", "tls_version", "sni")} == {
        "protocol": "tls", "client_port": p_tunnel, "status": None, "tls_version": "TLSv1.3", "sni": "www.example.com"}
    assert by_listener["tunnel"]["bytes_out"] == len(tunnel)
    assert {k: by_listener["passthrough"][k] for k in ("protocol", "tls_version", "sni", "pool")} == {
        "protocol": "tcp", "tls_version": None, "sni": "www.example.com", "pool": "web"}
    assert by_listener["passthrough"]["bytes_in"] > 100  # the ClientHello, at least


# Apache's combined format, as log analysers parse it.
COMBINED = re.compile(
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"$'
)


async def test_combined_format_parses_as_apache_combined(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        listener_toml("front", "http", "web", extra=access_log_toml(path, format="combined")),
    ))
    port = bound.listeners["front"][1]
    before = time.time()
    ok, _ = await aexchange(port, b'GET /x?a=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: my "agent" \\ 1\r\n'
                                  b"Referer: http://r.example/\r\nConnection: close\r\n\r\n")
    bad, _ = await aexchange(port, b"NONSENSE\r\n\r\n")
    with trio.move_on_after(LOG_WAIT):
        while not path.exists() or path.read_text().count("\n") < 2:
            await trio.sleep(0.05)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    parsed = [COMBINED.match(line) for line in lines]
    assert all(parsed), lines
    one, two = (m.groupdict() for m in parsed)  # type: ignore[union-attr]
    t = datetime.strptime(one["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert t.tzinfo is not None and before - 1 <= t.timestamp() <= time.time()
    assert t.utcoffset() == datetime.now(UTC).utcoffset()
    assert one == {"host": "127.0.0.1", "ident": "-", "user": "-", "time": one["time"],
                   "request": "GET /x?a=1 HTTP/1.1", "status": "200", "size": str(len(ok)),
                   "referer": "http://r.example/", "agent": 'my \\"agent\\" \\\\ 1'}
    assert two == {"host": "127.0.0.1", "ident": "-", "user": "-", "time": two["time"], "request": "-",
                   "status": "400", "size": str(len(bad)), "referer": "-", "agent": "-"}


async def test_request_id_kept_made_and_replaced(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        pool_toml("empty", []),
        listener_toml("front", "http", "web", request_id=True, extra=access_log_toml(path)
                      + '  [[listeners.routes]]\n  path_prefix = "/none/"\n  pool = "empty"\n'),
        listener_toml("plain", "http", "web"),
    ))
    port = bound.listeners["front"][1]

    async def send(*ids: bytes, target: bytes = b"/echo", listener_port: int = port) -> tuple[bytes, int]:
        fields = b"".join(b"X-Request-Id: " + i + b"\r\n" for i in ids)
        return await aexchange(listener_port, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n" + fields
                               + b"Connection: close\r\n\r\n")

    def sent_back(response: bytes) -> list[str]:
        return [v for k, v in response_headers(response) if k == "x-request-id"]

    longest = b"A" * 200
    cases = {
        "kept": (b"abc-123;Parent=7",),
        "kept_longest": (longest,),
        "none": (),
        "space": (b"has space",),
        "quote": (b'a"b',),
        "too_long": (longest + b"A",),
        "twice": (b"one", b"two"),
    }
    results = {name: await send(*ids) for name, ids in cases.items()}
    local, p_local = await send(b"local-1", target=b"/none/x")
    made_local, p_made_local = await send(target=b"/none/x")
    entries = {e["client_port"]: e for e in await wait_entries(path, len(cases) + 2)}

    for name, (response, p) in results.items():
        assert response.startswith(b"HTTP/1.1 200"), name
        at_backend, to_client, logged = echoed(response, "x-request-id"), sent_back(response), entries[p]["request_id"]
        if name.startswith("kept"):
            expected = cases[name][0].decode()
            assert (at_backend, to_client, logged) == ([expected], [expected], expected), name
        else:  # made by the node: one UUID, the same at the backend, at the client and in the log
            assert len(at_backend) == 1 and UUID4.fullmatch(at_backend[0]), (name, at_backend)
            assert (to_client, logged) == (at_backend, at_backend[0]), name
    made = [echoed(r, "x-request-id")[0] for n, (r, _) in results.items() if not n.startswith("kept")]
    assert len(set(made)) == len(made)  # a new one each time
    # the node's own answers carry it too
    assert local.startswith(b"HTTP/1.1 503") and sent_back(local) == ["local-1"]
    assert entries[p_local]["request_id"] == "local-1"
    assert len(sent_back(made_local)) == 1 and UUID4.fullmatch(sent_back(made_local)[0])
    assert entries[p_made_local]["request_id"] == sent_back(made_local)[0]

    # request_id off: whatever the client sent goes through untouched, nothing is added
    plain_port = bound.listeners["plain"][1]
    response, _ = await send(b"has space", b"two", listener_port=plain_port)
    assert echoed(response, "x-request-id") == ["has space", "two"]
    assert sent_back(response) == []
    response, _ = await send(listener_port=plain_port)
    assert echoed(response, "x-request-id") == [] and sent_back(response) == []


# ----------------------------------------------------------------------------- real processes


def node_file(tmp_path: Path, backend: str, access: str, port: int, admin: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(node_toml(
        pool_toml("web", [backend]),
        listener_toml("front", "http", "web", bind=f"127.0.0.1:{port}", extra=access),
        admin=f"127.0.0.1:{admin}", node_extra='drain_timeout = "5s"\n',
    ))
    return path


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


async def test_sigusr1_reopens_the_file_and_loses_nothing(nursery, tmp_path: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    port, admin = free_port(), free_port()
    node = spawn("-m", "lbnode.cli", "run", "--config", str(node_file(tmp_path, a.address, access_log_toml(path),
                                                                        port, admin)), name="node")
    await trio.to_thread.run_sync(wait_port, port)
    stop = threading.Event()
    answered = [0]

    def load() -> None:
        # one keep-alive client sending requests all through the rotation
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                assert client.get(f"http://127.0.0.1:{port}/").status_code == 200
                answered[0] += 1

    def rotate() -> None:
        wait_for(lambda: path.exists() and path.read_bytes().count(b"\n") >= 50, "50 entries before the rotation")
        path.rename(rotated)
        node.popen.send_signal(signal.SIGUSR1)
        wait_for(lambda: "access log " + str(path) + " reopened" in node.log(), "the node to say it reopened")
        mark = answered[0]
        wait_for(lambda: answered[0] >= mark + 50, "50 requests after the rotation")
        stop.set()

    async with trio.open_nursery() as clients:
        clients.start_soon(trio.to_thread.run_sync, load)
        await trio.to_thread.run_sync(rotate)
    # a request made once the reopen was reported goes to the new file; the node is stopped at
    # once after it: what it still buffered is written before it exits
    marker = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{port}/marker", timeout=30))
    assert marker.status_code == 200
    total = answered[0] + 1
    assert await trio.to_thread.run_sync(node.terminate) == 0

    old, new = read_entries(rotated), read_entries(path)
    assert len(old) + len(new) == total  # none lost, none twice
    assert len(old) >= 50 and len(new) >= 50
    assert [e["path"] for e in new][-1] == "/marker" and all(e["path"] == "/" for e in old)


async def test_a_stdout_nobody_reads_never_stalls_serving(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    port, admin = free_port(), free_port()
    buffer = 100
    config = node_file(tmp_path, a.address, access_log_toml("-", buffer=buffer), port, admin)
    with open(tmp_path / "stderr.log", "wb") as stderr:
        # stdout is a pipe this test never reads: once its 64 KiB are full, every write blocks
        proc = subprocess.Popen([sys.executable, "-m", "lbnode.cli", "run", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=stderr, cwd=tmp_path)
    try:
        await trio.to_thread.run_sync(wait_port, port)
        requests = 3000  # ~1 MB of log lines: 16 times what the pipe holds

        def load() -> list[float]:
            slowest = []
            with httpx.Client(timeout=30) as client:
                for _ in range(requests):
                    started = time.monotonic()
                    assert client.get(f"http://127.0.0.1:{port}/").status_code == 200
                    slowest.append(time.monotonic() - started)
            return sorted(slowest)[-5:]

        slowest = await trio.to_thread.run_sync(load)
        # A blocked write in the loop would hold every request from the first full pipe on, for
        # good (httpx gives up after 30 s); none waits 5 s (an answer takes about a millisecond;
        # 2 busy cores have shown stalls of a few hundred ms: the margin is for them).
        assert slowest[-1] < 5.0, slowest
        r, metrics = await scrape(admin)
        await promtool_check(r.text)
        written = value(metrics, "fulcrum_access_log_written_total", listener="front")
        dropped = value(metrics, "fulcrum_access_log_dropped_total", listener="front")
        # what is neither: at most one batch stuck in the blocked write, and the buffer
        assert dropped >= requests - written - 2 * buffer, (written, dropped)
        assert written * 300 < 200_000, written  # lines of ~400 bytes: the pipe took a few hundred at most
        # the stop does not wait on the pipe either: the last entries are given up after 2 s
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(15)) == 0
        assert "the last entries were not written" in (tmp_path / "stderr.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_keep_alive_requests_get_their_own_bytes_and_a_slow_head_its_408(nursery, tmp_path: Path) -> None:
    (a,) = await start_backends(nursery, "a")
    path = tmp_path / "access.log"
    node, bound = await start_node(nursery, node_toml(
        pool_toml("web", [a.address]),
        listener_toml("front", "http", "web", extra=access_log_toml(path) + '  [listeners.timeouts]\n  header = "0.5s"\n'),
    ))
    port = bound.listeners["front"][1]
    first = b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n"
    second = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n" + b"y" * 3000

    def keep_alive() -> tuple[list[bytes], int]:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            responses = []
            for request in (first, second):
                sock.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                length = int(re.search(rb"Content-Length: (\d+)", data).group(1))  # type: ignore[union-attr]
                while len(data) < data.index(b"\r\n\r\n") + 4 + length:
                    data += sock.recv(65536)
                responses.append(data)
            # a third head that never ends: 408 once [listeners.timeouts] header has passed
            sock.sendall(b"GET /never HTTP/1.1\r\nHost: h\r\n")
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            return [*responses, rest], sock.getsockname()[1]

    (one, two, timed_out), client_port = await trio.to_thread.run_sync(keep_alive)
    assert timed_out.startswith(b"HTTP/1.1 408")
    entries = await wait_entries(path, 3)
    assert [e["client_port"] for e in entries] == [client_port] * 3
    assert [(e["method"], e["status"], e["bytes_in"], e["bytes_out"]) for e in entries] == [
        ("GET", 200, len(first), len(one)),
        ("POST", 200, len(second), len(two)),
        # the partial head it did send, and the 408
        (None, 408, len(b"GET /never HTTP/1.1\r\nHost: h\r\n"), len(timed_out)),
    ]
    assert entries[2]["reason"] == "request head not received within 0.5s"


async def test_behind_a_proxy_header_the_log_names_the_client_it_carried(nursery, tmp_path: Path):
    """With [listeners.proxy_protocol], the client is the one the header names, in the log too:
    its address and its port (not the balancer's in front), on L7 and L4 listeners."""
    (a,) = await start_backends(nursery, "a")
    accept = '[listeners.proxy_protocol]\naccept = true\ntrusted = ["127.0.0.1/32"]\n'
    web_log, tcp_log = tmp_path / "web.log", tmp_path / "tcp.log"
    _, bound = await start_node(nursery, node_toml(
        listener_toml("web", "http", "web", extra=access_log_toml(web_log) + accept),
        listener_toml("l4", "tcp", "web", extra=access_log_toml(tcp_log) + accept),
        pool_toml("web", [a.address])))
    request = b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    response, _ = await aexchange(bound.listeners["web"][1],
                                  encode_v1(("192.0.2.7", 40007), ("198.51.100.1", 80)) + request)
    assert response.startswith(b"HTTP/1.1 200")
    response, _ = await aexchange(bound.listeners["l4"][1],
                                  encode_v2(("2001:db8::9", 40009), ("2001:db8::1", 443)) + request)
    assert response.startswith(b"HTTP/1.1 200")
    (web,) = await wait_entries(web_log, 1)
    (l4,) = await wait_entries(tcp_log, 1)
    assert (web["client_ip"], web["client_port"], web["status"]) == ("192.0.2.7", 40007, 200)
    assert (l4["client_ip"], l4["client_port"]) == ("2001:db8::9", 40009)
