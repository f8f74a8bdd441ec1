"""Connection floods against a real ``lbnode run`` process: ``[node] max_connections``.

Raw sockets fill the node's connection budget; what a user sees is checked: a client
beyond the cap waits in the kernel backlog and is then served properly, on every
listener, while the admin endpoint and the control API answer at once.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import httpx

from lbnode.api.fulcrum.v1 import control_pb2 as pb
from lbnode.api.fulcrum.v1 import control_pb2_grpc as rpc
from tests.conftest import free_port, listener_toml, node_toml, pool_toml, spawn_backend, wait_port

HOST = "127.0.0.1"
NODE_MAX = 50
FLOOD = NODE_MAX + 150  # past the cap: the rest wait in listener a's backlog (1024)
# An admin or control call on a node whose event loop is idle (flood connections only
# wait for bytes) takes a few ms; 2 s leaves 100x for 2 cores busy with other tests.
REACHABLE_WITHIN = 2.0
# Long enough to tell "waiting in the backlog" from "being served" (a request to the demo
# backend through the node takes ~5 ms; a loaded host may stretch it, not to this).
HELD_FOR = 1.0


def start_node(spawn, tmp_path: Path, backend: int) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    a, b, admin, control = free_port(), free_port(), free_port(), free_port()
    timeouts = '  [listeners.timeouts]\n  header = "60s"\n'  # the flood's partial heads stay open
    text = node_toml(
        pool_toml("p", [f"{HOST}:{backend}"]),
        listener_toml("a", "http", "p", bind=f"{HOST}:{a}", extra=timeouts),
        listener_toml("b", "http", "p", bind=f"{HOST}:{b}", extra=timeouts),
        f'[control]\nbind = "{HOST}:{control}"\ninsecure = true\n',
        admin=f"{HOST}:{admin}",
        node_extra=f'max_connections = {NODE_MAX}\nstate_dir = "{tmp_path / "state"}"\ndrain_timeout = "1s"\n',
    )
    config = tmp_path / "node.toml"
    config.write_text(text)
    spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    for port in (a, b, admin, control):
        wait_port(port)
    return a, b, admin, control


@contextmanager
def flood(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections each holding an unfinished request head (a slowloris that stopped)."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(socket.create_connection((HOST, port), timeout=5))
            s.sendall(b"GET / HTTP/1.1\r\nHost: flood\r\n")
            socks.append(s)
        yield socks


def status(admin: int) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"http://{HOST}:{admin}/status", timeout=REACHABLE_WITHIN)
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


def wait_open(admin: int, expected: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := status(admin)["connections"]["open"]) != expected:
        assert time.monotonic() < deadline, f"node has {got} client connections open, expected {expected}"
        time.sleep(0.05)


def test_a_flood_past_node_max_connections_waits_and_admin_and_control_stay_reachable(
    spawn, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    backend = spawn_backend(spawn, "b1")
    a, b, admin, control = start_node(spawn, tmp_path, backend)
    wait_open(admin, 0)  # wait_port's probes have gone
    assert status(admin)["connections"] == {"open": 0, "max": NODE_MAX}
    with flood(a, FLOOD) as socks:
        wait_open(admin, NODE_MAX)  # the node holds exactly its cap, all on listener a

        # Listener b has no cap of its own: the node's cap, shared, holds its client back.
        waiting = socket.create_connection((HOST, b), timeout=5)  # completes in b's backlog
        waiting.sendall(b"GET /waiting HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.settimeout(HELD_FOR)
        try:
            got = waiting.recv(1)
        except TimeoutError:
            got = None
        assert got is None, f"listener b served a client past [node] max_connections: {got!r}"

        # The operator's ways in are not counted, and answer at once.
        for path, expected in (("/healthz", b"ok\n"), ("/status", None)):
            t0 = time.monotonic()
            r = httpx.get(f"http://{HOST}:{admin}{path}", timeout=REACHABLE_WITHIN)
            took = time.monotonic() - t0
            assert r.status_code == 200 and (expected is None or r.content == expected)
            print(f"flood: GET {path} {took * 1000:.1f} ms")
            assert took < REACHABLE_WITHIN, f"GET {path} took {took:.2f}s during the flood"
        assert json.loads(r.content)["connections"] == {"open": NODE_MAX, "max": NODE_MAX}
        t0 = time.monotonic()
        with grpc.insecure_channel(f"{HOST}:{control}") as channel:
            reply = rpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=REACHABLE_WITHIN)
        took = time.monotonic() - t0
        print(f"flood: control Status {took * 1000:.1f} ms")
        assert reply.node_id == "t1"
        assert took < REACHABLE_WITHIN, f"control API Status took {took:.2f}s during the flood"

        for s in socks:
            s.close()
        # The flood gone, the held client is served in full, not cut or answered badly.
        waiting.settimeout(10)
        with waiting:
            data = b""
            while chunk := waiting.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]
        assert data.endswith(b"\r\n\r\nb1\n"), data[-200:]  # the backend's answer, whole
    wait_open(admin, 0)
