"""Routes through a real node (issue 15): each condition sends the request to the expected
backend (the demo backend answers its name), a 95/5 split holds within 2 points over 10,000 requests, and a
sticky split keeps a client on its side."""

from __future__ import annotations

import http.client
from collections import Counter
from collections.abc import Callable

import httpx
import trio

from tests.conftest import listener_toml, node_toml, pool_toml, start_backends, start_node

ROUTES = """
[[listeners.routes]]
path = "/exact"
pool = "exact"
[[listeners.routes]]
path_regex = "/users/[0-9]+"
pool = "regex"
[[listeners.routes]]
path_prefix = "/m/"
methods = ["POST", "PUT"]
pool = "method"
[[listeners.routes]]
headers = [{name = "X-Env", exact = "canary"}]
pool = "header"
[[listeners.routes]]
cookies = [{name = "beta", exact = "1"}]
pool = "cookie"
[[listeners.routes]]
query = [{name = "v", exact = "2"}]
pool = "query"
[[listeners.routes]]
client_cidrs = ["127.0.0.2/32"]
pool = "cidr"
[[listeners.routes]]
path_prefix = "/"
headers = [{name = "X-Priority", present = true}]
priority = 10
pool = "prio"
"""
NAMES = ("web", "exact", "regex", "method", "header", "cookie", "query", "cidr", "prio")


def _client(source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=source))


async def _in_thread(fn: Callable[[], list[str]]) -> list[str]:
    return await trio.to_thread.run_sync(fn)


async def test_each_condition_routes_to_its_backend(nursery):
    backends = await start_backends(nursery, *NAMES)
    toml = node_toml(
        listener_toml("web", "http", "web", extra=ROUTES),
        *(pool_toml(b.name, [b.address]) for b in backends),
    )
    _, bound = await start_node(nursery, toml)
    base = f"http://127.0.0.1:{bound.listeners['web'][1]}"

    def run() -> list[str]:
        with _client() as c, _client("127.0.0.2") as other:
            def who(path: str, method: str = "GET", client: httpx.Client = c, **kw: object) -> str:
                r = client.request(method, base + path, **kw)  # type: ignore[arg-type]
                assert r.status_code == 200, r.text
                return r.text.strip()

            return [
                who("/exact"), who("/exact/more"),
                who("/users/42"), who("/users/42/x"), who("/users/42?x=1"),
                who("/m/a", "POST", content=b"x"), who("/m/a"),
                who("/h", headers={"x-env": "canary"}), who("/h", headers={"X-Env": "prod"}),
                who("/c", headers={"Cookie": "a=b; beta=1"}), who("/c", headers={"Cookie": "beta=0"}),
                who("/q?v=2"), who("/q?v=3"),
                who("/from", client=other), who("/from"),
                who("/exact", headers={"X-Priority": "1"}),
            ]

    got = await _in_thread(run)
    assert got == [
        "exact", "web",
        "regex", "web", "regex",
        "method", "web",
        "header", "web",
        "cookie", "web",
        "query", "web",
        "cidr", "web",
        "prio",  # priority 10 beats the earlier path = "/exact"
    ]


SPLIT = """
[[listeners.routes]]
path_prefix = "/split/"
split = [{pool = "v1", weight = 95}, {pool = "v2", weight = 5}]
[[listeners.routes]]
path_prefix = "/sticky/"
split = [{pool = "v1", weight = 1}, {pool = "v2", weight = 1}]
sticky = true
"""


async def _split_node(nursery) -> str:
    web, v1, v2 = await start_backends(nursery, "web", "v1", "v2")
    toml = node_toml(
        listener_toml("web", "http", "web", extra=SPLIT),
        pool_toml("web", [web.address]), pool_toml("v1", [v1.address]), pool_toml("v2", [v2.address]),
    )
    _, bound = await start_node(nursery, toml)
    return f"http://127.0.0.1:{bound.listeners['web'][1]}"


async def test_split_95_5_over_10000_requests_within_2_percent(nursery):
    """The issue's canary: 95/5 over 10,000 requests, each share within 2 points. The draw is
    random; the standard deviation of the 5 % side's share is 0.22 points, so 2 points is 9
    of them (a false failure about once in 10^19 runs)."""
    base = await _split_node(nursery)
    total, threads = 10_000, 4

    port = int(base.rsplit(":", 1)[1])

    def run() -> list[str]:  # http.client: a tenth of httpx's cost per request, for 10,000 of them
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            out = []
            for _ in range(total // threads):
                conn.request("GET", "/split/x")
                r = conn.getresponse()
                assert r.status == 200 and r.getheader("set-cookie") is None  # not sticky: nothing to remember
                out.append(r.read().decode().strip())
            return out
        finally:
            conn.close()

    async with trio.open_nursery() as clients:
        results: list[list[str]] = []

        async def one() -> None:
            results.append(await _in_thread(run))

        for _ in range(threads):
            clients.start_soon(one)
    counts = Counter(name for part in results for name in part)
    assert sum(counts.values()) == total and set(counts) == {"v1", "v2"}
    assert abs(counts["v2"] / total - 0.05) <= 0.02, counts
    assert abs(counts["v1"] / total - 0.95) <= 0.02, counts


async def test_sticky_split_keeps_each_client_on_its_side(nursery):
    base = await _split_node(nursery)

    def run() -> list[str]:
        sides = []
        for _ in range(16):  # 16 clients at 50/50: both sides are drawn (all on one: 1 in 32,768)
            with _client() as c:
                first = c.get(base + "/sticky/a")
                cookie = first.headers.get("set-cookie", "")
                side = first.text.strip()
                assert cookie.startswith(f"FULCRUM_SPLIT_1={side};"), cookie
                for i in range(50):
                    r = c.get(base + f"/sticky/{i}")
                    assert r.text.strip() == side
                    assert "set-cookie" not in r.headers  # already kept: not set again
                sides.append(side)
        with _client() as c:  # a cookie naming a pool outside the split is drawn again
            r = c.get(base + "/sticky/a", headers={"Cookie": "FULCRUM_SPLIT_1=web"})
            assert r.text.strip() in ("v1", "v2")
            assert r.headers["set-cookie"].startswith(f"FULCRUM_SPLIT_1={r.text.strip()};")
        return sides

    sides = await _in_thread(run)
    assert len(sides) == 16 and set(sides) == {"v1", "v2"}
