"""IPv6 end to end on the loopback ([::1]): L7 and L4 listeners, backends, health checks,
source-address affinity and X-Forwarded-For, with real sockets, clients and demo backends."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter

import httpx
import pytest
import trio

from lbnode.demo_backend import BackendStats, serve_demo_backend
from tests.conftest import free_port, listener_toml, node_toml, pool_toml, start_node


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# A machine whose kernel has IPv6 switched off cannot run these; make test cannot change that.
pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 on the loopback (::1)")


async def _v6_backends(nursery: trio.Nursery, *names: str) -> dict[str, tuple[int, BackendStats, trio.CancelScope]]:
    """Demo backends on [::1], each in a cancel scope a test can cancel to stop it alone."""
    out = {}
    for name in names:
        stats = BackendStats()
        scope = trio.CancelScope()

        async def serve(task_status, name=name, stats=stats, scope=scope):  # type: ignore[no-untyped-def]
            with scope:
                await serve_demo_backend(name, "::1", 0, stats=stats, task_status=task_status)

        port = await nursery.start(serve)
        out[name] = (port, stats, scope)
    return out


def _get(url: str, **kwargs: object) -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        return client.get(url, **kwargs)  # type: ignore[arg-type]


async def test_an_l7_listener_on_ipv6_forwards_to_ipv6_backends_with_the_client_address(nursery):
    backends = await _v6_backends(nursery, "a", "b")
    toml = node_toml(
        listener_toml("web", "http", "web", bind="[::1]:0"),
        pool_toml("web", [f"[::1]:{port}" for port, _, _ in backends.values()]),
        admin=None,
    )
    _, bound = await start_node(nursery, toml)
    host, port = bound.listeners["web"]
    assert host == "::1"
    names = [(await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/")).text.strip() for _ in range(4)]
    assert sorted(names) == ["a", "a", "b", "b"]
    r = await trio.to_thread.run_sync(
        lambda: _get(f"http://[::1]:{port}/echo", headers={"X-Forwarded-For": "2001:db8::7"})
    )
    assert r.status_code == 200
    assert "X-Forwarded-For: 2001:db8::7, ::1\n" in r.text
    assert f"X-Forwarded-Host: [::1]:{port}\n" in r.text
    assert r.headers["via"] == "1.1 fulcrum"


async def test_health_checks_reach_ipv6_backends_and_take_a_stopped_one_out(nursery):
    backends = await _v6_backends(nursery, "a", "b")
    health = ('[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "200ms"\n'
              'rise = 1\nfall = 1\ninitial_state = "down"\n')
    toml = node_toml(
        listener_toml("web", "http", "web", bind="[::1]:0"),
        pool_toml("web", [f"[::1]:{port}" for port, _, _ in backends.values()], _extra=health),
        admin=None,
    )
    node, bound = await start_node(nursery, toml)
    port = bound.listeners["web"][1]
    checker = node.health_checkers["web"]

    async def states() -> dict[str, str]:
        return {key: st.state for key, st in checker.states.items()}

    # Initial state down: only a passing check over IPv6 lets traffic through. One check
    # interval (0.2 s) plus its timeout (0.2 s) is the design; 5 s is for a loaded machine.
    with trio.fail_after(5):
        while set((await states()).values()) != {"up"}:
            await trio.sleep(0.05)
    assert set(await states()) == {f"[::1]:{port}" for port, _, _ in backends.values()}
    _, stats_b, scope_b = backends["b"]
    scope_b.cancel()
    with trio.fail_after(5):
        while (await states())[f"[::1]:{backends['b'][0]}"] != "down":
            await trio.sleep(0.05)
    served_by_b = stats_b.requests
    names = [(await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/")).text.strip() for _ in range(4)]
    assert names == ["a"] * 4
    assert stats_b.requests == served_by_b


async def test_an_http_health_check_names_an_ipv6_backend_in_brackets(nursery):
    heads: list[bytes] = []
    listeners = await trio.open_tcp_listeners(0, host="::1")
    port = listeners[0].socket.getsockname()[1]

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = await stream.receive_some(65536)
                if not piece:
                    return
                data += piece
            heads.append(data)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    nursery.start_soon(trio.serve_listeners, answer, listeners)
    health = '[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "200ms"\n'
    toml = node_toml(listener_toml("web", "http", "web", bind="[::1]:0"),
                     pool_toml("web", [f"[::1]:{port}"], _extra=health), admin=None)
    await start_node(nursery, toml)
    with trio.fail_after(5):  # the first check runs within one interval (0.2 s)
        while not heads:
            await trio.sleep(0.05)
    assert heads[0].startswith(b"GET /healthz HTTP/1.1\r\n")
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in heads[0], heads[0]


async def _l4_name(port: int) -> str:
    """Through an L4 listener on [::1]: the name of the backend that answered."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("::1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return data.partition(b"\r\n\r\n")[2].decode().strip()


async def test_an_l4_listener_on_ipv6_relays_bytes_to_ipv6_backends(nursery):
    backends = await _v6_backends(nursery, "a", "b")
    toml = node_toml(
        listener_toml("l4", "tcp", "p", bind="[::1]:0"),
        pool_toml("p", [f"[::1]:{port}" for port, _, _ in backends.values()]),
        admin=None,
    )
    _, bound = await start_node(nursery, toml)
    port = bound.listeners["l4"][1]
    names = [await _l4_name(port) for _ in range(4)]
    assert sorted(names) == ["a", "a", "b", "b"]
    # Bytes intact both ways through the L4 path: a 1 MiB download checked byte for byte.
    r = await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/bytes?n=1048576")
    assert len(r.content) == 1048576 and r.content[:32] == b"0123456789abcdef" * 2


@pytest.mark.parametrize("protocol", ["http", "tcp"])
@pytest.mark.parametrize("kind", ["source_ip", "source_hash"])
async def test_source_address_affinity_keeps_an_ipv6_client_on_one_backend(nursery, protocol, kind):
    backends = await _v6_backends(nursery, "a", "b", "c")
    settings: dict[str, object] = {}
    if kind == "source_ip":
        settings["_extra"] = '[pools.affinity]\nmode = "source_ip"\n'
    else:
        settings["algorithm"] = "source_hash"
    toml = node_toml(
        listener_toml("main", protocol, "p", bind="[::1]:0"),
        pool_toml("p", [f"[::1]:{port}" for port, _, _ in backends.values()], **settings),
        admin=None,
    )
    _, bound = await start_node(nursery, toml)
    port = bound.listeners["main"][1]
    if protocol == "http":
        # A new connection per request: affinity must not come from keep-alive.
        names = [(await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/")).text.strip() for _ in range(6)]
    else:
        names = [await _l4_name(port) for _ in range(6)]
    assert len(set(names)) == 1, names
    home = names[0]
    # Its backend stopped: the client moves once, to one other backend, and stays there.
    backends[home][2].cancel()
    await trio.sleep(0.1)
    if protocol == "http":
        after = [(await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/")).text.strip() for _ in range(6)]
    else:
        after = [await _l4_name(port) for _ in range(6)]
    assert len(set(after)) == 1 and after[0] != home, (home, after)


def test_lbnode_check_accepts_ipv6_listeners_and_backends(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(node_toml(
        listener_toml("web", "http", "web", bind="[::1]:8080"),
        listener_toml("l4", "tcp", "web", bind="[::]:9000"),
        pool_toml("web", ["[::1]:9001", "[2001:db8::10]:80"],
                  _extra='[pools.health]\ntype = "http"\n[pools.affinity]\nmode = "source_ip"\n'),
        admin="[::1]:9900",
    ))
    done = subprocess.run([sys.executable, "-m", "lbnode.cli", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(re.sub(r"\[::1\]:9001", "::1:9001", config.read_text()))
    done = subprocess.run([sys.executable, "-m", "lbnode.cli", "check", "-c", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pools[0].backends[0]" in done.stdout + done.stderr, done.stdout + done.stderr




# --------------------------------------------------------------------------- more than ::1
# Only ::1 is on the loopback, so more IPv6 client addresses need a namespace of our own:
# its lo gets ::1 and fd00::2-9 (a ULA range nothing routes outside it). Fixed ports are
# free there. Everything runs inside it; the namespace is always deleted.
NS_SOURCES = ["::1"] + [f"fd00::{i}" for i in range(2, 10)]
NS_BACKENDS = {"a": 8081, "b": 8082, "c": 8083}
NS_L7, NS_L4 = 8080, 8090


@pytest.fixture
def v6_namespace(tmp_path):  # type: ignore[no-untyped-def]
    from tests.cluster.topology import netns_unavailable

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    name = f"f6-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for src in NS_SOURCES[1:]:
            subprocess.run(["ip", "-n", name, "-6", "addr", "add", f"{src}/128", "dev", "lo", "nodad"], check=True)

        def spawn(*args: str, log: str) -> None:
            with open(tmp_path / log, "wb") as out:
                procs.append(subprocess.Popen(["ip", "netns", "exec", name, *args], stdout=out, stderr=subprocess.STDOUT))

        yield name, spawn
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _curl_in(ns: str, source: str, port: int, path: str = "/", times: int = 3) -> list[str]:
    """``times`` requests from ``source``, each on a new connection; the bodies' first lines."""
    url = f"http://[::1]:{port}{path}"
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10", "--interface", source,
                           "-H", "Connection: close", *[url] * times], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines() if path == "/" else [done.stdout]


def test_source_affinity_tells_ipv6_client_addresses_apart(v6_namespace, tmp_path):
    ns, spawn = v6_namespace
    for name, port in NS_BACKENDS.items():
        spawn(sys.executable, "-m", "lbnode.demo_backend", "--name", name, "--host", "::1", "--port", str(port),
              log=f"backend-{name}.log")
    addresses = [f"[::1]:{port}" for port in NS_BACKENDS.values()]
    config = tmp_path / "node.toml"
    config.write_text(node_toml(
        listener_toml("web", "http", "sticky", bind=f"[::1]:{NS_L7}"),
        listener_toml("l4", "tcp", "hashed", bind=f"[::1]:{NS_L4}"),
        pool_toml("sticky", addresses, _extra='[pools.affinity]\nmode = "source_ip"\n'),
        pool_toml("hashed", addresses, algorithm="source_hash"),
        admin=None,
    ))
    spawn(sys.executable, "-m", "lbnode.cli", "run", "-c", str(config), log="node.log")
    deadline = time.monotonic() + 20  # a Python start on a loaded machine, with margin
    while True:
        probe = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "1",
                                f"http://[::1]:{NS_L7}/", f"http://[::1]:{NS_L4}/"], capture_output=True)
        if probe.returncode == 0:
            break
        assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
        time.sleep(0.2)

    for port, mode in [(NS_L7, "source_ip"), (NS_L4, "source_hash")]:
        home = {}
        for src in NS_SOURCES:
            names = _curl_in(ns, src, port)
            assert len(set(names)) == 1 and names[0] in NS_BACKENDS, (mode, src, names)
            home[src] = names[0]
        spread = Counter(home.values())
        if mode == "source_ip":
            # New sessions go round robin (the probe above took one): 9 sources, 3 each.
            assert sorted(spread.values()) == [3, 3, 3], home
        else:
            assert len(spread) >= 2, home  # the hash of 9 addresses lands on more than one
        print(f"\n[{mode} over IPv6] {home}")
    echoed = _curl_in(ns, "fd00::7", NS_L7, "/echo", times=1)[0]
    assert "X-Forwarded-For: fd00::7\n" in echoed, echoed


async def test_an_ipv6_wildcard_listener_serves_ipv6_only_beside_an_ipv4_one_on_its_port(nursery):
    # A [::] socket is dual-stack by default on Linux (net.ipv6.bindv6only=0): it would
    # take IPv4 clients too, as ::ffff:127.0.0.1 in X-Forwarded-For and affinity keys, and
    # the 0.0.0.0 listener on the same port could not bind. Fulcrum sets IPV6_V6ONLY.
    backends = await _v6_backends(nursery, "six")
    v4_backend = BackendStats()
    v4_port = await nursery.start(lambda task_status: serve_demo_backend("four", "127.0.0.1", 0, stats=v4_backend,
                                                                         task_status=task_status))
    port = free_port()
    toml = node_toml(
        listener_toml("v6", "http", "six", bind=f"[::]:{port}"),
        listener_toml("v4", "http", "four", bind=f"127.0.0.1:{port}"),
        pool_toml("six", [f"[::1]:{backends['six'][0]}"]),
        pool_toml("four", [f"127.0.0.1:{v4_port}"]),
        admin=None,
    )
    await start_node(nursery, toml)
    r4 = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}/echo")
    r6 = await trio.to_thread.run_sync(_get, f"http://[::1]:{port}/echo")
    assert "X-Forwarded-For: 127.0.0.1\n" in r4.text and v4_backend.requests == 1
    assert "X-Forwarded-For: ::1\n" in r6.text and backends["six"][1].requests == 1
