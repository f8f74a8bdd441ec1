"""Route actions through a real node (issue 15): redirects, fixed responses, header edits and
rewrites, allow/deny by client address (with the PROXY protocol deciding who the client is),
and mirroring, with real clients (httpx, raw sockets) and real backends. A mirror pool that
is down or never answers costs the real requests nothing."""

from __future__ import annotations

import json
import socket
import time
from functools import partial
from pathlib import Path

import httpx
import trio

from tests.conftest import (
    free_port,
    listener_toml,
    node_toml,
    pool_toml,
    start_backends,
    start_node,
)
from tests.integration.test_metrics import scrape
from tests.promtext import value


def echoed(body: str) -> tuple[str, dict[str, list[str]]]:
    """The request line and headers (lower-case names, every value) the demo backend's /echo saw."""
    lines = body.split("\n\n")[0].splitlines()
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(": ")
        out.setdefault(k.lower(), []).append(v)
    return lines[0], out


async def in_thread(fn):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(fn)


ANSWERS = """
[[listeners.routes]]
path_prefix = "/old/"
redirect = {status = 301, scheme = "https", host = "new.example", path = "/new"}
[[listeners.routes]]
path = "/same-host"
redirect = {path = "/elsewhere", keep_query = false}
[[listeners.routes]]
path = "/port"
redirect = {port = 8443, status = 308}
[[listeners.routes]]
path = "/teapot"
fixed_response = {status = 418, body = "short and stout\\n", content_type = "text/x-teapot"}
[[listeners.routes]]
path = "/empty"
fixed_response = {status = 204}
"""


async def test_redirect_and_fixed_response_are_the_nodes_own_answers(nursery, tmp_path: Path):
    (web,) = await start_backends(nursery, "web")
    log_path = tmp_path / "access.log"
    extra = ANSWERS + f'[listeners.access_log]\npath = "{log_path}"\n'
    _, bound = await start_node(nursery, node_toml(listener_toml("web", "http", "web", extra=extra),
                                                      pool_toml("web", [web.address])))
    port = bound.listeners["web"][1]
    base = f"http://127.0.0.1:{port}"

    def run() -> list[httpx.Response]:
        with httpx.Client(timeout=30, follow_redirects=False) as c:  # one connection: keep-alive after each
            return [
                c.get(base + "/old/page?a=1&b=2"),
                c.get(base + "/same-host?x=1", headers={"Host": "shop.example:8080"}),
                c.get(base + "/port?q", headers={"Host": "shop.example:8080"}),
                c.get(base + "/teapot"),
                c.head(base + "/teapot"),
                c.get(base + "/empty"),
                c.post(base + "/teapot", content=b"x" * 10),
                c.get(base + "/other"),
            ]

    r = await in_thread(run)
    assert (r[0].status_code, r[0].headers["location"]) == (301, "https://new.example/new?a=1&b=2")
    assert (r[1].status_code, r[1].headers["location"]) == (302, "http://shop.example:8080/elsewhere")
    assert (r[2].status_code, r[2].headers["location"]) == (308, "http://shop.example:8443/port?q")
    assert r[0].content == b"" and "via" not in r[0].headers  # not relayed from a backend
    assert (r[3].status_code, r[3].text, r[3].headers["content-type"]) == (418, "short and stout\n", "text/x-teapot")
    assert (r[4].status_code, r[4].content, r[4].headers["content-length"]) == (418, b"", "16")
    assert (r[5].status_code, r[5].content) == (204, b"")
    assert r[6].status_code == 418 and r[6].headers.get("connection") == "close"  # a body: not read, so closed
    assert r[7].status_code == 200 and r[7].text == "web\n"
    assert web.stats.requests == 1  # only /other reached the backend

    _, s = await scrape(bound.admin[1])
    assert value(s, "fulcrum_http_responses_total", listener="web", source="local", code="3xx") == 3
    assert value(s, "fulcrum_http_responses_total", listener="web", source="local", code="4xx") == 3
    await _wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") == 8)
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert (entries[0]["status"], entries[0]["reason"], entries[0]["backend"]) == (301, "redirect by routes[0]", None)
    assert (entries[3]["status"], entries[3]["reason"]) == (418, "fixed_response of routes[3]")
    assert entries[7]["reason"] is None and entries[7]["backend"] is not None


EDITS = """
[[listeners.routes]]
path_prefix = "/api/"
pool = "web"
rewrite = {path_prefix = "/", host = "internal.example:8080"}
request_headers = {set = {X-Env = "canary"}, add = {X-Tag = "route"}, remove = ["X-Secret"]}
response_headers = {set = {Cache-Control = "no-cache"}, remove = ["X-Backend"]}
"""


async def test_header_edits_and_rewrites_reach_the_backend_and_the_client(nursery):
    (web,) = await start_backends(nursery, "web")
    _, bound = await start_node(nursery, node_toml(listener_toml("web", "http", "web", extra=EDITS),
                                                   pool_toml("web", [web.address])))
    base = f"http://127.0.0.1:{bound.listeners['web'][1]}"

    def run() -> list[httpx.Response]:
        with httpx.Client(timeout=30) as c:
            headers = [("Host", "shop.example"), ("X-Env", "prod"), ("X-Env", "dev"), ("X-Tag", "client"),
                       ("X-Secret", "s3cret"), ("X-Kept", "1")]
            return [c.get(base + "/api/echo?x=1", headers=headers), c.get(base + "/echo")]

    routed, plain = await in_thread(run)
    assert routed.status_code == 200, routed.text
    line, seen = echoed(routed.text)
    assert line == "GET /echo?x=1 HTTP/1.1"  # /api/ replaced by /, the query kept
    assert seen["host"] == ["internal.example:8080"]
    assert seen["x-forwarded-host"] == ["shop.example"]  # the client's
    assert seen["x-env"] == ["canary"]  # every client value replaced by one
    assert seen["x-tag"] == ["client", "route"]  # added beside the client's
    assert "x-secret" not in seen and seen["x-kept"] == ["1"]
    assert routed.headers["cache-control"] == "no-cache" and "x-backend" not in routed.headers
    assert "via" in routed.headers  # still the backend's response, relayed
    assert plain.headers["x-backend"] == "web"  # another route (the listener's pool): untouched


def _raw_get(port: int, source: str, preamble: bytes = b"", headers: bytes = b"") -> bytes:
    """One request from ``source`` on a plain socket (after ``preamble``); the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(preamble + b"GET /admin HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + headers + b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


ACCESS = """
[[listeners.routes]]
path_prefix = "/admin"
pool = "web"
allow_cidrs = ["127.0.0.0/8", "198.51.100.0/24"]
deny_cidrs = ["127.0.0.3/32", "198.51.100.66/32"]
"""


async def test_allow_and_deny_by_client_address_with_the_proxy_protocol_deciding_the_client(nursery):
    (web,) = await start_backends(nursery, "web")
    trusted = '[listeners.proxy_protocol]\naccept = true\ntrusted = ["127.0.0.9/32"]\n'
    _, bound = await start_node(nursery, node_toml(
        listener_toml("direct", "http", "web", extra=ACCESS),
        listener_toml("behind", "http", "web", extra=ACCESS + trusted),
        pool_toml("web", [web.address])))
    direct, behind = bound.listeners["direct"][1], bound.listeners["behind"][1]

    def run() -> list[bytes]:
        def proxied(client: str) -> bytes:
            return b"PROXY TCP4 %s 127.0.0.1 40000 80\r\n" % client.encode()

        return [
            _raw_get(direct, "127.0.0.1"),
            _raw_get(direct, "127.0.0.3"),  # in deny_cidrs (and in allow_cidrs: deny wins)
            # X-Forwarded-For is whatever a client writes: never the client address.
            _raw_get(direct, "127.0.0.3", headers=b"X-Forwarded-For: 127.0.0.1\r\n"),
            _raw_get(behind, "127.0.0.9", proxied("198.51.100.7")),  # the header's client is allowed
            _raw_get(behind, "127.0.0.9", proxied("198.51.100.66")),  # ... denied
            _raw_get(behind, "127.0.0.9", proxied("203.0.113.5")),  # ... outside allow_cidrs
        ]

    got = await in_thread(run)
    assert got == [b"HTTP/1.1 200 OK", b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 403 Forbidden",
                   b"HTTP/1.1 200 OK", b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 403 Forbidden"]
    assert web.stats.requests == 2


def _mirror_routes(pool: str, percent: float = 100, max_inflight: int = 16, max_body: int = 65536) -> str:
    return f"""
[[listeners.routes]]
path_prefix = "/m/"
pool = "web"
mirror = {{pool = "{pool}", percent = {percent}, max_inflight = {max_inflight}, max_body_bytes = {max_body}}}
"""


async def _wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = trio.current_time() + timeout
    while not check():
        assert trio.current_time() < deadline, "not reached in time"
        await trio.sleep(0.02)


async def test_mirror_copies_requests_with_their_bodies_and_drops_the_answers(nursery):
    web, shadow = await start_backends(nursery, "web", "shadow")
    _, bound = await start_node(nursery, node_toml(
        listener_toml("web", "http", "web", extra=_mirror_routes("shadow", max_body=1000)),
        pool_toml("web", [web.address]), pool_toml("shadow", [shadow.address])))
    base = f"http://127.0.0.1:{bound.listeners['web'][1]}"
    _, s = await scrape(bound.admin[1])
    labels = {"listener": "web", "route": "0", "pool": "shadow"}
    series = {(n, tuple(sorted(ls))) for (n, ls) in s if n.startswith("fulcrum_mirror_")}
    assert len(series) == 2 + 4 + 1  # every result and reason shown from the start, at 0
    assert value(s, "fulcrum_mirror_inflight", **labels) == 0

    def run() -> list[httpx.Response]:
        with httpx.Client(timeout=30) as c:
            out = [c.get(base + f"/m/{i}") for i in range(20)]
            out.append(c.post(base + "/m/small", content=b"x" * 1000))
            out.append(c.post(base + "/m/large", content=b"x" * 1001))  # over max_body_bytes: not copied
            out.append(c.get(base + "/other"))  # another route: not copied
            return out

    responses = await in_thread(run)
    assert all(r.status_code == 200 and r.text == "web\n" for r in responses)  # the real backend's answers
    await _wait_for(lambda: shadow.stats.requests >= 21)
    await trio.sleep(0.2)  # a copy that should not be sent has had time to arrive
    assert shadow.stats.requests == 21
    assert shadow.stats.paths.get("/m/small") == 1 and "/m/large" not in shadow.stats.paths
    _, s = await scrape(bound.admin[1])
    assert value(s, "fulcrum_mirror_requests_total", result="answered", **labels) == 21
    assert value(s, "fulcrum_mirror_dropped_total", reason="body", **labels) == 1


async def test_mirror_samples_its_percent(nursery):
    web, shadow = await start_backends(nursery, "web", "shadow")
    _, bound = await start_node(nursery, node_toml(
        listener_toml("web", "http", "web", extra=_mirror_routes("shadow", percent=20)),
        pool_toml("web", [web.address]), pool_toml("shadow", [shadow.address])))
    base = f"http://127.0.0.1:{bound.listeners['web'][1]}"

    def run() -> None:
        with httpx.Client(timeout=30) as c:
            for i in range(1000):
                assert c.get(base + f"/m/{i}").status_code == 200

    await in_thread(run)
    await trio.sleep(0.3)
    # 20 % of 1,000: 200, standard deviation 12.6; 60 either way is more than 4.5 of them.
    assert 140 <= shadow.stats.requests <= 260, shadow.stats.requests


async def _silent_backend(nursery: trio.Nursery, held: list[int]) -> int:
    """Accepts, reads, never answers: ``held[0]`` connections open now, ``held[1]`` the most at once."""

    async def handler(stream: trio.SocketStream) -> None:
        held[0] += 1
        held[1] = max(held[1], held[0])
        try:
            while await stream.receive_some(65536):
                pass
        finally:
            held[0] -= 1

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_a_mirror_pool_down_or_silent_costs_the_real_requests_nothing(nursery):
    (web,) = await start_backends(nursery, "web")
    held = [0, 0]
    silent = await _silent_backend(nursery, held)
    down = free_port()  # nothing listens there: every copy's connect is refused
    routes = _mirror_routes("silent", max_inflight=4).replace("/m/", "/s/") + _mirror_routes("down")
    _, bound = await start_node(nursery, node_toml(
        listener_toml("web", "http", "web", extra=routes),
        pool_toml("web", [web.address]),
        # The silent mirror holds each copy for its whole response timeout, 3 s.
        pool_toml("silent", [f"127.0.0.1:{silent}"], _extra='[pools.timeouts]\nresponse = "3s"\n'),
        pool_toml("down", [f"127.0.0.1:{down}"])))
    base = f"http://127.0.0.1:{bound.listeners['web'][1]}"

    def run(prefix: str) -> list[float]:
        times = []
        with httpx.Client(timeout=30) as c:
            for i in range(100):
                started = time.perf_counter()
                r = c.get(base + f"{prefix}{i}")
                times.append(time.perf_counter() - started)
                assert (r.status_code, r.text) == (200, "web\n")
        return times

    baseline = sorted(await in_thread(lambda: run("/plain/")))
    silent_times = sorted(await in_thread(lambda: run("/s/")))
    down_times = sorted(await in_thread(lambda: run("/m/")))
    # Each copy to the silent pool is held 3 s: a request that waited for its copy would take
    # that long. Bound: 1 s for the slowest of 100 (loopback requests take ms; 2 busy cores).
    assert silent_times[-1] < 1.0 and down_times[-1] < 1.0, (silent_times[-5:], down_times[-5:])
    # The median next to the no-mirror baseline (a copy adds its task's CPU, not a wait): 10 ms margin.
    assert silent_times[50] < baseline[50] + 0.010 and down_times[50] < baseline[50] + 0.010
    assert held[1] == 4  # copies reached the silent pool, at most max_inflight of its route at once
    _, s = await scrape(bound.admin[1])
    silent_labels = {"listener": "web", "route": "0", "pool": "silent"}
    down_labels = {"listener": "web", "route": "1", "pool": "down"}
    assert value(s, "fulcrum_mirror_dropped_total", reason="full", **silent_labels) >= 90
    assert value(s, "fulcrum_mirror_inflight", **silent_labels) <= 4
    assert value(s, "fulcrum_mirror_requests_total", result="failed", **down_labels) + value(
        s, "fulcrum_mirror_inflight", **down_labels) == 100
