"""``http`` health checks of ``protocol = "h2"`` pools speak HTTP/2 (issue 14).

Real backends that speak HTTP/2 only (tests/h2tlsbackend.py: the ``h2`` package over Trio,
prior knowledge on cleartext, ALPN ``h2`` over TLS) and a real HTTP/1.1 server (the demo
backend) that does not; one probe at a time (``check_backend``) and a node's checker, seen by
a real client (httpx) through the node.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from lbnode.config import load_config_text
from lbnode.health.checker import check_backend
from lbnode.model import Address, HealthCheck, PoolTls
from lbnode.node import LbNode
from tests.conftest import http_get, listener_toml, node_toml, pool_toml, start_backends, start_node
from tests.grpcbackend import GrpcBackend
from tests.h2tlsbackend import H2TlsBackend, start_h2_tls_backend, start_h2c_backend
from tests.tlsutil import make_ca

HTTP = HealthCheck(type="http", path="/healthz", timeout=2.0)


def address(backend: H2TlsBackend) -> Address:
    return Address("127.0.0.1", backend.port)


# --------------------------------------------------------------------------- one probe


async def test_an_h2c_backend_gets_the_checks_request_as_http2_with_prior_knowledge(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "a")
    assert await check_backend(address(backend), HTTP, protocol="h2") == (True, "status 200")
    check = HealthCheck(type="http", path="/ready?deep=1", method="HEAD", host="api.internal", timeout=2.0)
    assert await check_backend(address(backend), check, protocol="h2") == (True, "status 200")
    first, second = backend.stats.requests
    assert (first[b":method"], first[b":scheme"], first[b":path"], first[b":authority"]) == (
        b"GET", b"http", b"/healthz", f"127.0.0.1:{backend.port}".encode())
    assert first[b"user-agent"] == b"fulcrum-health"
    assert (second[b":method"], second[b":path"], second[b":authority"]) == (b"HEAD", b"/ready?deep=1", b"api.internal")
    # Without protocol = "h2" the same check is HTTP/1.1, which this backend cannot read: it
    # answers with a GOAWAY frame (issue 14: such a backend was marked down).
    ok, reason = await check_backend(address(backend), HTTP)
    assert not ok and reason.startswith("invalid HTTP response: "), reason
    assert len(backend.stats.requests) == 2


async def test_the_status_is_judged_against_expect_status_and_named(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "a")
    backend.status = 503
    assert await check_backend(address(backend), HTTP, protocol="h2") == (False, "status 503")
    backend.status = 302  # inside the default 200-399, outside 200-299
    assert await check_backend(address(backend), HTTP, protocol="h2") == (True, "status 302")
    strict = HealthCheck(type="http", path="/", timeout=2.0, expect_status=((200, 299),))
    assert await check_backend(address(backend), strict, protocol="h2") == (False, "status 302")
    sorry = HealthCheck(type="http", path="/", timeout=2.0, expect_status=((503, 503),))
    backend.status = 503
    assert await check_backend(address(backend), sorry, protocol="h2") == (True, "status 503")


async def test_expect_body_is_searched_in_the_http2_body(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "a")
    found = HealthCheck(type="http", path="/live", timeout=2.0, expect_body="GET /live http")
    assert await check_backend(address(backend), found, protocol="h2") == (True, "status 200")
    missing = HealthCheck(type="http", path="/live", timeout=2.0, expect_body="ready")
    assert await check_backend(address(backend), missing, protocol="h2") == (False, "body does not contain 'ready'")


async def test_an_answer_later_than_the_timeout_fails_the_check(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "slow", delay=2.0)
    check = HealthCheck(type="http", path="/", timeout=0.3)
    started = trio.current_time()
    assert await check_backend(address(backend), check, protocol="h2") == (
        False, "timeout after 300ms waiting for the response")
    # The timeout bounds the whole probe; 1 s of margin for a loaded machine, still below the delay.
    assert trio.current_time() - started < 0.3 + 1.0
    assert backend.stats.requests[0][b":path"] == b"/"  # the request was there: the answer was late


async def test_a_cleartext_backend_that_answers_http11_is_named(nursery: trio.Nursery) -> None:
    (demo,) = await start_backends(nursery, "old")
    ok, reason = await check_backend(Address("127.0.0.1", demo.port), HTTP, protocol="h2")
    assert not ok
    # The demo backend reads the preface as a request it cannot parse and says so in HTTP/1.1.
    assert reason.startswith('the backend does not speak h2 (prior knowledge: it answered "HTTP/1.1 '), reason
    assert reason.endswith("\"); the pool's protocol needs it"), reason


async def test_a_stopped_h2_backend_fails_the_check(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "a")
    assert await check_backend(address(backend), HTTP, protocol="h2") == (True, "status 200")
    backend.stop()
    await trio.sleep(0.1)  # the cancelled serve task closes its listener at its next checkpoint
    assert await check_backend(address(backend), HTTP, protocol="h2") == (False, "connection refused")


async def test_a_grpcio_server_is_reached_over_http2_and_names_its_refusal() -> None:
    # grpcio speaks HTTP/2 only. It now gets the request, as HTTP/2, and resets the stream of
    # anything that is not a gRPC call: a gRPC backend wants type = "grpc" (docs/http2.md).
    backend = GrpcBackend("g")
    try:
        check = HealthCheck(type="http", path="/", timeout=2.0)
        assert await check_backend(backend.address, check, protocol="h2") == (
            False, "the backend reset the stream (INTERNAL_ERROR)")
    finally:
        await trio.to_thread.run_sync(backend.stop)


async def test_over_tls_the_check_offers_alpn_h2_and_verifies_the_pools_ca(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["api.internal"]))
    tls = PoolTls(ca=str(ca.path), server_name="api.internal")
    assert await check_backend(address(backend), HTTP, tls, protocol="h2") == (True, "status 200")
    assert backend.stats.alpn == ["h2"] and backend.stats.server_names == ["api.internal"]
    assert backend.stats.requests[0][b":scheme"] == b"https"
    ok, reason = await check_backend(address(backend), HTTP, PoolTls(ca=str(other.path), server_name="api.internal"),
                                     protocol="h2")
    assert (ok, reason) == (False, "TLS: certificate verify failed: unable to get local issuer certificate")
    assert len(backend.stats.requests) == 1  # nothing sent over a connection the CA refused


async def test_over_tls_a_backend_without_h2_gets_the_pools_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "backends")
    plain = await start_h2_tls_backend(nursery, "plain", ca.issue(tmp_path, "plain", ["127.0.0.1"]), alpn=("http/1.1",))
    assert await check_backend(address(plain), HTTP, PoolTls(ca=str(ca.path)), protocol="h2") == (
        False, "TLS: the backend does not speak h2 (ALPN: it selected no protocol); the pool's protocol needs it")


async def test_over_tls_the_check_sends_the_pools_client_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, clients = make_ca(tmp_path, "backends"), make_ca(tmp_path, "clients")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["127.0.0.1"]), client_ca=clients.path)
    client = clients.issue(tmp_path, "fulcrum-node", ["fulcrum-node"], client=True)
    tls = PoolTls(ca=str(ca.path), cert=str(client.cert), key=str(client.key))
    assert await check_backend(address(backend), HTTP, tls, protocol="h2") == (True, "status 200")
    assert backend.stats.client_subjects == ["fulcrum-node"]


# --------------------------------------------------------------------------- a node's checker

H2C = "  [listeners.http2]\n  enabled = true\n"
# rise = fall = 1 every 100 ms (+10% jitter): a change is seen within ~0.2 s; 10 s is for a loaded machine.
HEALTH = '  [pools.health]\n  type = "http"\n  path = "/healthz"\n  interval = "100ms"\n  timeout = "2s"\n  rise = 1\n  fall = 1\n'
SEEN_WITHIN = 10.0


async def h2_node(nursery: trio.Nursery, addresses: list[str], extra: str = "") -> tuple[LbNode, int]:
    toml = node_toml(listener_toml("web", "http", "p", extra=H2C),
                     pool_toml("p", addresses, protocol="h2", retries=0, _extra=HEALTH + extra))
    node, bound = await start_node(nursery, toml)
    return node, bound.listeners["web"][1]


async def wait_health(node: LbNode, index: int, health: str) -> str:
    state = node.snapshot.pools["p"].backends[index]
    with trio.fail_after(SEEN_WITHIN):
        while state.health != health:
            await trio.sleep(0.02)
    return str(state.health_reason)


async def test_an_h2c_backend_is_up_then_down_on_503_and_when_it_stops(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.health")
    backend = await start_h2c_backend(nursery, "a")
    node, port = await h2_node(nursery, [backend.address])
    url = f"http://127.0.0.1:{port}/x"
    assert await wait_health(node, 0, "up") == "status 200"
    assert (await http_get(url)).text == "a GET /x http 0\n"
    assert all(r[b":path"] == b"/healthz" for r in backend.stats.requests if r[b":path"] != b"/x")

    backend.status = 503
    assert await wait_health(node, 0, "down") == "status 503"
    refused = await http_get(url)
    # The node answers for itself: no backend to send to (the backend's own 503 would carry its body).
    assert refused.status_code == 503 and not refused.text.startswith("a ")

    backend.status = 200
    assert await wait_health(node, 0, "up") == "status 200"
    backend.stop()
    assert await wait_health(node, 0, "down") == "connection refused"
    lines = [r.getMessage() for r in caplog.records if r.name == "lbnode.health"]
    assert f"pool p backend {backend.address} up -> down: status 503" in lines
    assert f"pool p backend {backend.address} up -> down: connection refused" in lines


async def test_a_status_outside_expect_status_marks_an_h2c_backend_down(nursery: trio.Nursery) -> None:
    picky, relaxed = await start_h2c_backend(nursery, "picky"), await start_h2c_backend(nursery, "relaxed")
    picky.status = relaxed.status = 302
    toml = node_toml(listener_toml("web", "http", "p", extra=H2C),
                     pool_toml("p", [picky.address], protocol="h2", _extra=HEALTH + '  expect_status = "200-299"\n'),
                     pool_toml("q", [relaxed.address], protocol="h2", _extra=HEALTH))
    node, _ = await start_node(nursery, toml)
    (picky_state,), (relaxed_state,) = node.snapshot.pools["p"].backends, node.snapshot.pools["q"].backends
    with trio.fail_after(SEEN_WITHIN):
        while picky_state.health != "down" or relaxed_state.health != "up":
            await trio.sleep(0.02)
    assert (picky_state.health_reason, relaxed_state.health_reason) == ("status 302", "status 302")


async def test_a_cleartext_http11_backend_in_an_h2_pool_is_down_with_a_clear_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.health")
    good = await start_h2c_backend(nursery, "good")
    (old,) = await start_backends(nursery, "old")
    node, port = await h2_node(nursery, [good.address, old.address])
    assert await wait_health(node, 0, "up") == "status 200"
    reason = await wait_health(node, 1, "down")
    assert reason.startswith('the backend does not speak h2 (prior knowledge: it answered "HTTP/1.1 '), reason
    assert any(line.startswith(f"pool p backend {old.address} ") and line.endswith(reason)
               for line in (r.getMessage() for r in caplog.records if r.name == "lbnode.health"))
    answers = [(await http_get(f"http://127.0.0.1:{port}/{i}")).text for i in range(4)]
    assert answers == [f"good GET /{i} http 0\n" for i in range(4)]


def tls_table(**settings: object) -> str:
    lines = ["  [pools.tls]", "  enabled = true"]
    lines += [f'  {key} = "{value}"' for key, value in settings.items()]
    return "\n".join(lines) + "\n"


async def test_an_h2_tls_backend_is_checked_over_tls_with_the_pools_ca_and_sni(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca, other = make_ca(tmp_path, "backends"), make_ca(tmp_path, "other")
    backend = await start_h2_tls_backend(nursery, "a", ca.issue(tmp_path, "a", ["api.internal"]))
    node, port = await h2_node(nursery, [backend.address], tls_table(ca=ca.path, server_name="api.internal"))
    assert await wait_health(node, 0, "up") == "status 200"
    health_checks = [r for r in backend.stats.requests if r[b":path"] == b"/healthz"]
    assert health_checks and all(r[b":scheme"] == b"https" for r in health_checks)
    assert set(backend.stats.alpn) == {"h2"} and set(backend.stats.server_names) == {"api.internal"}
    assert (await http_get(f"http://127.0.0.1:{port}/x")).text == "a GET /x https 0\n"
    backend.status = 503
    assert await wait_health(node, 0, "down") == "status 503"
    backend.status = 200
    assert await wait_health(node, 0, "up") == "status 200"

    # The same backend checked against another CA: never up, the verification named.
    wrong, _ = await h2_node(nursery, [backend.address], tls_table(ca=other.path, server_name="api.internal"))
    assert await wait_health(wrong, 0, "down") == "TLS: certificate verify failed: unable to get local issuer certificate"
    response = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{port}/y", timeout=30))
    assert response.text == "a GET /y https 0\n"  # the first node still uses it


async def test_a_reload_to_protocol_h2_switches_the_running_check_to_http2(nursery: trio.Nursery) -> None:
    backend = await start_h2c_backend(nursery, "a")
    listener = listener_toml("web", "http", "p", extra=H2C)
    node, _ = await start_node(nursery, node_toml(listener, pool_toml("p", [backend.address], _extra=HEALTH)))
    # An HTTP/1.1 pool checks in HTTP/1.1, which this h2-only backend cannot answer.
    assert (await wait_health(node, 0, "down")).startswith("invalid HTTP response: ")
    node.reload(load_config_text(node_toml(listener, pool_toml("p", [backend.address], protocol="h2", _extra=HEALTH)),
                                 "test.toml"))
    assert await wait_health(node, 0, "up") == "status 200"
