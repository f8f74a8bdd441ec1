"""grpc health checks (``type = "grpc"``) against real grpcio servers running grpc_health.v1.

One probe at a time (``check_backend``), the checker's kept channels, and a running
``lbnode`` process whose L4 listener stops sending connections to a backend that says
NOT_SERVING. The backends are grpcio servers in this process's threads (tests/grpcbackend.py);
the node is its own process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lbnode.health.checker import HealthChecker, check_backend
from lbnode.health.grpccheck import GrpcChannels
from lbnode.model import Address, Backend, HealthCheck, PoolTls
from tests.conftest import free_port, listener_toml, node_toml, pool_toml, wait_port
from tests.grpcbackend import NOT_SERVING, SERVING, UNKNOWN, GrpcBackend, who
from tests.integration.test_health_checker import closed_port, silent_server
from tests.integration.test_ipv6 import _ipv6_loopback
from tests.tlsutil import make_ca

GRPC = HealthCheck(type="grpc", timeout=2.0)


@pytest.fixture
def backends() -> Iterator[list[GrpcBackend]]:
    """Every GrpcBackend a test starts, stopped afterwards."""
    started: list[GrpcBackend] = []
    yield started
    for backend in started:
        backend.stop()


def start(backends: list[GrpcBackend], name: str, **kwargs: Any) -> GrpcBackend:
    backend = GrpcBackend(name, **kwargs)
    backends.append(backend)
    return backend


ESTABLISHED, CLOSE_WAIT = "01", "08"  # /proc/net/tcp's states


def established_to(port: int, states: tuple[str, ...] = (ESTABLISHED,)) -> int:
    """TCP connections of this host in ``states`` towards 127.0.0.1:``port`` (client ends;
    grpcio's are IPv6 sockets with the v4-mapped address, so in /proc/net/tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if remote.endswith(f"0100007F:{port:04X}") and state in states:
                count += 1
    return count


# --------------------------------------------------------------------------- one probe


async def test_serving_passes_and_not_serving_fails(backends: list[GrpcBackend]) -> None:
    b = start(backends, "a")
    b.set("", SERVING)
    assert await check_backend(b.address, GRPC) == (True, "grpc status SERVING")
    b.set("", NOT_SERVING)
    assert await check_backend(b.address, GRPC) == (False, "grpc status NOT_SERVING")
    b.set("", UNKNOWN)
    assert await check_backend(b.address, GRPC) == (False, "grpc status UNKNOWN")


async def test_the_service_name_is_asked_about(backends: list[GrpcBackend]) -> None:
    b = start(backends, "a")
    b.set("", NOT_SERVING)
    b.set("shop.Cart", SERVING)
    b.set("shop.Search", NOT_SERVING)
    assert await check_backend(b.address, HealthCheck(type="grpc", service="shop.Cart")) == (True, "grpc status SERVING")
    assert await check_backend(b.address, HealthCheck(type="grpc", service="shop.Search")) == (
        False, "grpc status NOT_SERVING")
    assert await check_backend(b.address, HealthCheck(type="grpc", service="shop.Nope")) == (
        False, 'grpc error NOT_FOUND: service "shop.Nope" is unknown to the server (SERVICE_UNKNOWN)')


async def test_a_server_without_the_health_service_is_unimplemented(backends: list[GrpcBackend]) -> None:
    b = start(backends, "a", health=False)
    assert await check_backend(b.address, GRPC) == (
        False, "grpc error UNIMPLEMENTED: the server has no grpc.health.v1.Health service")
    assert who(b.port) == "a"  # the server itself works


async def test_ipv6_and_dns_name_backends(backends: list[GrpcBackend]) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 on the loopback (::1)")
    v6 = start(backends, "v6", host="::1")
    v6.set("", SERVING)
    assert str(v6.address) == f"[::1]:{v6.port}"
    assert await check_backend(v6.address, GRPC) == (True, "grpc status SERVING")
    v4 = start(backends, "v4")
    v4.set("", SERVING)
    # A host name is resolved by grpcio's resolver, not by the node's.
    assert await check_backend(Address("localhost", v4.port), GRPC) == (True, "grpc status SERVING")


async def test_a_closed_port_is_connection_refused() -> None:
    assert await check_backend(closed_port(), GRPC) == (False, "grpc error UNAVAILABLE: connection refused")


async def test_an_http1_server_is_named_as_not_speaking_http2(nursery: trio.Nursery) -> None:
    async def respond(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    from tests.integration.test_health_checker import TinyServer

    server = TinyServer(respond)
    await server.start(nursery)
    ok, reason = await check_backend(server.address, GRPC)
    assert not ok and reason.startswith("grpc error UNAVAILABLE: failed parsing HTTP/2"), reason


@pytest.mark.parametrize("kind", ["tcp-only", "check-never-answers"])
async def test_a_server_that_never_answers_times_out_within_the_timeout(
    nursery: trio.Nursery, backends: list[GrpcBackend], kind: str
) -> None:
    """Either the TCP connection opens and no HTTP/2 comes, or Check is received and never answered."""
    if kind == "tcp-only":
        server = silent_server()
        await server.start(nursery)
        address = server.address
    else:
        b = start(backends, "slow", stall=True)
        address = b.address
    check = HealthCheck(type="grpc", timeout=0.3)
    began = time.monotonic()
    ok, reason = await check_backend(address, check)
    elapsed = time.monotonic() - began
    assert (ok, reason) == (False, "timeout after 300ms waiting for the grpc answer (DEADLINE_EXCEEDED)")
    # Bounded by the timeout on both sides (Trio's scope, grpc's deadline); 1 s of margin for 2 busy cores.
    assert 0.29 <= elapsed < 0.3 + 1.0
    if kind == "check-never-answers":
        assert len(b.peers) == 1  # the request reached the handler, which never answered


# --------------------------------------------------------------------------- TLS


async def test_tls_with_the_pool_ca_and_server_name(backends: list[GrpcBackend], tmp_path: Path) -> None:
    ca, rogue = make_ca(tmp_path, "backends"), make_ca(tmp_path, "rogue")
    named = start(backends, "named", tls=ca.issue(tmp_path, "named", ["api.internal"]))
    by_ip = start(backends, "ip", tls=ca.issue(tmp_path, "ip", ["127.0.0.1"]))
    forged = start(backends, "forged", tls=rogue.issue(tmp_path, "forged", ["127.0.0.1"]))
    plain = start(backends, "plain")
    for b in (named, by_ip, forged, plain):
        b.set("", SERVING)
    pool_ca = PoolTls(ca=str(ca.path))
    assert await check_backend(named.address, GRPC, PoolTls(ca=str(ca.path), server_name="api.internal")) == (
        True, "grpc status SERVING")
    assert await check_backend(by_ip.address, GRPC, pool_ca) == (True, "grpc status SERVING")
    assert await check_backend(named.address, GRPC, pool_ca) == (
        False, "grpc error UNAVAILABLE: TLS: certificate verify failed: the certificate does not name 127.0.0.1")
    assert await check_backend(forged.address, GRPC, pool_ca) == (
        False, "grpc error UNAVAILABLE: TLS: certificate verify failed: unable to get local issuer certificate")
    assert await check_backend(plain.address, GRPC, pool_ca) == (
        False, "grpc error UNAVAILABLE: TLS handshake failed: wrong version number")
    assert not named.peers[1:] and not forged.peers and not plain.peers  # refused before any request


async def test_tls_client_certificate_for_a_backend_that_requires_one(
    backends: list[GrpcBackend], tmp_path: Path
) -> None:
    ca, clients = make_ca(tmp_path, "backends"), make_ca(tmp_path, "clients")
    b = start(backends, "mtls", tls=ca.issue(tmp_path, "mtls", ["127.0.0.1"]), client_ca=clients.path.read_bytes())
    b.set("", SERVING)
    ok, reason = await check_backend(b.address, GRPC, PoolTls(ca=str(ca.path)))
    assert not ok and reason.startswith("grpc error UNAVAILABLE: "), reason
    client = clients.issue(tmp_path, "node", ["fulcrum-node"], client=True)
    with_cert = PoolTls(ca=str(ca.path), cert=str(client.cert), key=str(client.key))
    assert await check_backend(b.address, GRPC, with_cert) == (True, "grpc status SERVING")


async def test_an_unreadable_ca_is_named_like_the_pools_traffic_names_it(tmp_path: Path) -> None:
    ok, reason = await check_backend(closed_port(), GRPC, PoolTls(ca=str(tmp_path / "missing.pem")))
    assert not ok and reason.startswith(f"pools.tls.ca: cannot load {tmp_path / 'missing.pem'}: "), reason


# --------------------------------------------------------------------------- kept channels


async def test_one_connection_serves_every_check_and_goes_with_the_backend(backends: list[GrpcBackend]) -> None:
    b = start(backends, "a")
    b.set("", SERVING)
    check = HealthCheck(type="grpc", interval=0.05, timeout=1.0, rise=1, fall=1)
    checker = HealthChecker("p", check, [Backend(b.address)])
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        # 20 checks at 50 ms (+10% jitter) take ~1.1 s; 10 s for 2 busy cores.
        with trio.fail_after(10):
            while len(b.peers) < 20:
                await trio.sleep(0.05)
        assert len(set(b.peers)) == 1, set(b.peers)  # one client port: one HTTP/2 connection
        assert established_to(b.port) == 1
        assert checker.grpc_channels.addresses == [b.address]
        checker.update([])  # the backend leaves the pool: its channel is closed
        assert checker.grpc_channels.addresses == []
        with trio.fail_after(5):
            while established_to(b.port):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_backend_back_on_its_port_passes_the_next_probe(backends: list[GrpcBackend]) -> None:
    """No inherited reconnect backoff, even with another pool's channel to the same backend open:
    refused, then listening again, then checked at once."""
    mine, other_pool = GrpcChannels(), GrpcChannels()
    try:
        b = start(backends, "a")
        b.set("", SERVING)
        address = b.address
        for channels in (mine, other_pool):
            assert await check_backend(address, GRPC, channels=channels) == (True, "grpc status SERVING")
        b.stop()
        # Until grpcio has read the stopped server's GOAWAY and closed its end, a probe can still
        # start on the old connection and fail as "stream removed (GOAWAY received...)" (CI saw
        # it once): wait for both channels to close theirs, then the probe must connect anew.
        with trio.fail_after(5):  # one read of a closed socket; 5 s for 2 busy cores
            while established_to(address.port, (ESTABLISHED, CLOSE_WAIT)):
                await trio.sleep(0.02)
        assert await check_backend(address, GRPC, channels=mine) == (False, "grpc error UNAVAILABLE: connection refused")
        b2 = start(backends, "a-again", port=address.port)
        b2.set("", SERVING)
        assert await check_backend(address, GRPC, channels=mine) == (True, "grpc status SERVING")
        # Restarted between two of its probes: the other pool's kept channel passes too.
        assert await check_backend(address, GRPC, channels=other_pool) == (True, "grpc status SERVING")
        assert len(b2.peers) == 2
    finally:
        mine.close_all()
        other_pool.close_all()


async def test_a_change_of_the_pools_tls_opens_a_new_channel(backends: list[GrpcBackend], tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    b = start(backends, "a", tls=ca.issue(tmp_path, "a", ["127.0.0.1", "api.internal"]))
    b.set("", SERVING)
    channels = GrpcChannels()
    try:
        assert await check_backend(b.address, GRPC, PoolTls(ca=str(ca.path)), channels=channels) == (
            True, "grpc status SERVING")
        ok, reason = await check_backend(b.address, GRPC, PoolTls(ca=str(ca.path), server_name="other.internal"),
                                         channels=channels)
        assert (ok, reason) == (
            False, "grpc error UNAVAILABLE: TLS: certificate verify failed: the certificate does not name other.internal")
    finally:
        channels.close_all()


# --------------------------------------------------------------------------- a running node


def _status(admin_port: int) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{admin_port}/status", timeout=5)
    r.raise_for_status()
    pool = next(p for p in r.json()["pools"] if p["name"] == "p")
    return {b["address"]: b for b in pool["backends"]}


def _wait_state(admin_port: int, address: Address, state: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entry = _status(admin_port)[str(address)]
        if entry["state"] == state:
            return entry
        assert time.monotonic() < deadline, f"{address} still {entry['state']} ({entry['reason']}) after {timeout}s"
        time.sleep(0.05)


def test_a_not_serving_backend_leaves_a_running_nodes_l4_pool(
    spawn: Any, tmp_path: Path, backends: list[GrpcBackend]
) -> None:
    a, b = start(backends, "a"), start(backends, "b")
    for backend in (a, b):
        backend.set("shop.Cart", SERVING)
    port, admin_port = free_port(), free_port()
    health = ('  [pools.health]\n  type = "grpc"\n  service = "shop.Cart"\n  interval = "100ms"\n'
              '  timeout = "1s"\n  rise = 1\n  fall = 2\n  initial_state = "down"\n')
    config = tmp_path / "node.toml"
    config.write_text(node_toml(
        pool_toml("p", [str(a.address), str(b.address)], _extra=health),
        listener_toml("grpc", "tcp", "p", bind=f"127.0.0.1:{port}"),
        admin=f"127.0.0.1:{admin_port}",
    ))
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_port(admin_port)
    # rise = 1 at 100 ms: both up after their first probe (~0.1 s); 10 s for a node starting on 2 busy cores.
    for backend in (a, b):
        _wait_state(admin_port, backend.address, "up", 10)
    assert {who(port) for _ in range(20)} == {"a", "b"}  # round robin over new connections

    a.set("shop.Cart", NOT_SERVING)
    # fall = 2 at 100 ms (+10%): down ~0.2 s later; 10 s for 2 busy cores.
    entry = _wait_state(admin_port, a.address, "down", 10)
    assert entry["reason"] == "grpc status NOT_SERVING"
    assert _status(admin_port)[str(b.address)]["state"] == "up"
    assert {who(port) for _ in range(10)} == {"b"}  # the L4 pool sends new connections to b only

    a.set("shop.Cart", SERVING)
    _wait_state(admin_port, a.address, "up", 10)
    assert "a" in {who(port) for _ in range(10)}
    assert node.popen.poll() is None, node.log()


def test_closed_ports_stay_down_with_the_reason_in_status(spawn: Any, tmp_path: Path) -> None:
    dead = closed_port()
    admin_port = free_port()
    health = '  [pools.health]\n  type = "grpc"\n  interval = "100ms"\n  timeout = "1s"\n  fall = 1\n'
    config = tmp_path / "node.toml"
    config.write_text(node_toml(pool_toml("p", [str(dead)], _extra=health),
                                listener_toml("grpc", "tcp", "p", bind=f"127.0.0.1:{free_port()}"),
                                admin=f"127.0.0.1:{admin_port}"))
    spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_port(admin_port)
    entry = _wait_state(admin_port, dead, "down", 10)  # fall = 1 at 100 ms; 10 s for 2 busy cores
    assert entry["reason"] == "grpc error UNAVAILABLE: connection refused"



def test_tls_checks_in_a_running_node_verify_with_the_pool_ca(
    spawn: Any, tmp_path: Path, backends: list[GrpcBackend]
) -> None:
    ca, rogue = make_ca(tmp_path, "backends"), make_ca(tmp_path, "rogue")
    good = start(backends, "good", tls=ca.issue(tmp_path, "good", ["api.internal"]))
    forged = start(backends, "forged", tls=rogue.issue(tmp_path, "forged", ["api.internal"]))
    for backend in (good, forged):
        backend.set("", SERVING)
    admin_port = free_port()
    extra = (f'  [pools.tls]\n  ca = "{ca.path}"\n  server_name = "api.internal"\n'
             '  [pools.health]\n  type = "grpc"\n  interval = "100ms"\n  timeout = "1s"\n  rise = 1\n  fall = 1\n'
             '  initial_state = "down"\n')
    config = tmp_path / "node.toml"
    config.write_text(node_toml(pool_toml("p", [str(good.address), str(forged.address)], _extra=extra),
                                listener_toml("grpc", "tcp", "p", bind=f"127.0.0.1:{free_port()}"),
                                admin=f"127.0.0.1:{admin_port}"))
    node = spawn("-m", "lbnode.cli", "run", "--config", str(config), name="node")
    wait_port(admin_port)
    _wait_state(admin_port, good.address, "up", 10)  # rise = 1 at 100 ms; 10 s for 2 busy cores
    refused = "grpc error UNAVAILABLE: TLS: certificate verify failed: unable to get local issuer certificate"
    deadline = time.monotonic() + 10  # its first probe within 100 ms of the good one's; 10 s for 2 busy cores
    while (entry := _status(admin_port)[str(forged.address)])["reason"] != refused:
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)
    assert entry["state"] == "down"
    time.sleep(0.5)  # ~5 more failed handshakes with the forged backend
    assert "Handshake failed" not in node.log()  # grpc's C core keeps its INFO lines to itself
    assert not forged.peers and good.peers
