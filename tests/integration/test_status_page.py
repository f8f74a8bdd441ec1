"""The status page in a real headless Chromium: what it shows, how fast it follows, how it escapes.

A real node with real demo backends; Chromium loads ``GET /`` from the admin endpoint and the
test reads the page's DOM over the DevTools protocol (tests/chromium.py). Screenshots go to
tests/artifacts/ (git-ignored); docs/img/status-page.png is one of them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import trio

from lbnode.cluster.etcd import EtcdStore
from lbnode.demo_backend import BackendStats, serve_demo_backend
from lbnode.model import Address, Backend, HealthCheck, Pool
from tests.chromium import Chromium
from tests.conftest import (
    REPO,
    free_port,
    http_get,
    listener_toml,
    node_toml,
    pool_toml,
    spawn_backend,
    start_backends,
    start_node,
    wait_port,
)
from tests.integration.test_vip_api import RUN_RECORDED

ARTIFACTS = REPO / "tests" / "artifacts"

# Health checks of the test pool: a refused connect fails at once, so a stopped backend is
# down after `fall` checks, each at most interval * (1 + jitter) + timeout apart.
INTERVAL, TIMEOUT, FALL, JITTER = 0.2, 0.2, 2, 0.1
DETECT = FALL * (INTERVAL * (1 + JITTER) + TIMEOUT)  # 0.84 s
REFRESH = 1.0  # the page's ?refresh=
# 2 busy cores: a Trio turn, a health check task or a Chromium frame can each be hundreds of
# ms late (other suites run beside this one); what the design bounds is DETECT + REFRESH.
MARGIN = 2.0
# Chromium's first load: process start is outside this (tests/chromium.py), page + first fetch ~0.2 s.
FIRST_RENDER = 15.0

HEALTH = (f'[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "{int(INTERVAL * 1000)}ms"\n'
          f'timeout = "{int(TIMEOUT * 1000)}ms"\nfall = {FALL}\nrise = 1\njitter = {JITTER}\n')
# Names are restricted to [A-Za-z0-9_.-] (lbnode.model.NAME_RE), so the most hostile text the
# page shows is a health check's reason, which quotes the configured expect_body.
HOSTILE = """<script>document.title="pwned"</script><img src=x onerror="document.title='pwned'">"""

BACKEND_ROWS = """JSON.stringify(Array.from(document.querySelectorAll('table.backends tr[data-backend]')).map(r => ({
  pool: r.closest('table').getAttribute('data-pool'), id: r.getAttribute('data-backend'),
  health: r.getAttribute('data-health'), p50: r.querySelector('.p50').textContent,
  rate: r.querySelector('.rate').textContent, errors: r.querySelector('.errors').textContent, reason: r.querySelector('.reason').textContent})))"""


def rows(page: Chromium) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["pool"], r["id"]): r for r in json.loads(page.evaluate(BACKEND_ROWS))}


def wait_for(page: Chromium, predicate, what: str, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Polls the DOM every 20 ms; the monotonic time the predicate first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(rows(page)):
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"page did not show {what} within {timeout:g}s: {rows(page)}")


async def off(fn, *args):  # type: ignore[no-untyped-def]
    """``fn(*args)`` in a worker thread: a blocking DevTools call must not stop the node's loop."""
    return await trio.to_thread.run_sync(fn, *args)


def milliseconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+) (ms|s)", text)
    assert m, text
    return float(m[1]) * (1000 if m[2] == "s" else 1)


async def test_page_shows_a_backend_down_within_one_refresh_and_escapes_names(nursery, tmp_path: Path):
    (a,) = await start_backends(nursery, "a")
    b_scope = trio.CancelScope()

    async def serve_b(task_status: trio.TaskStatus[int]) -> None:
        with b_scope:
            await serve_demo_backend("b", "127.0.0.1", 0, stats=BackendStats(), task_status=task_status)

    b = f"127.0.0.1:{await nursery.start(serve_b)}"
    hostile = (f'[[pools]]\nname = "hostile"\n[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "200ms"\n'
               f'fall = 1\nexpect_body = {json.dumps(HOSTILE)}\n  [[pools.backends]]\n  address = "{a.address}"\n')
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [a.address, b], _extra=HEALTH), hostile,
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    ARTIFACTS.mkdir(exist_ok=True)

    # Chromium is driven from worker threads: its calls block, and the node runs on this thread.
    page = await trio.to_thread.run_sync(Chromium, tmp_path / "chromium")
    try:
        await off(page.navigate, f"http://127.0.0.1:{admin}/?refresh={REFRESH:g}")
        await trio.to_thread.run_sync(lambda: wait_for(
            page, lambda r: r.get(("web", a.address), {}).get("health") == "up" and r.get(("web", b), {}).get("health") == "up",
            "both web backends up", FIRST_RENDER))

        # Latency over one refresh window, computed by the page from two samples: only 300 ms
        # requests ran, so p50 is in the 250-500 ms bucket (up to 1 s if the cores are that busy).
        # A request counts when it is sent and its time when it ends, so the window that shows
        # the rate may come before the one that shows the latency: both are watched for.
        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(http_get, f"http://127.0.0.1:{port}/slow?ms=300")

        def rate_and_p50() -> tuple[float, str]:
            deadline = time.monotonic() + 3 * REFRESH + MARGIN
            rate, p50 = 0.0, "–"
            while time.monotonic() < deadline and (rate == 0 or p50 == "–"):
                row = rows(page)[("web", a.address)]
                rate = max(rate, float(row["rate"]) if row["rate"] != "–" else 0.0)
                p50 = row["p50"] if p50 == "–" else p50
                time.sleep(0.02)
            return rate, p50

        rate, p50 = await off(rate_and_p50)
        assert rate > 0 and 250 <= milliseconds(p50) <= 1000, (rate, p50)

        # Error ratio: the backend's 503s are failures. Two bursts 0.5 s apart, so that one of
        # them falls inside a 1 s window whole (a request that straddles two samples is counted
        # in one window and its failure in the next).
        def highest_error_ratio() -> float:
            deadline = time.monotonic() + 3 * REFRESH + MARGIN
            highest = 0.0
            while time.monotonic() < deadline and highest == 0:
                shown = rows(page)[("web", a.address)]["errors"]
                highest = max(highest, float(shown.removesuffix(" %")) if shown != "–" else 0.0)
                time.sleep(0.02)
            return highest

        async with trio.open_nursery() as watch:
            errors: list[float] = []

            async def watch_errors() -> None:
                errors.append(await off(highest_error_ratio))

            watch.start_soon(watch_errors)
            for _ in range(2):
                async with trio.open_nursery() as clients:
                    for _ in range(4):
                        clients.start_soon(http_get, f"http://127.0.0.1:{port}/status/503")
                await trio.sleep(0.5)
        assert 0 < errors[0] <= 100, errors

        # The hostile reason is text: no element was made from it, and nothing ran.
        await trio.to_thread.run_sync(lambda: wait_for(
            page, lambda r: r.get(("hostile", a.address), {}).get("health") == "down", "the hostile pool down", 10.0))
        # the checker's reason quotes it with repr(): the page shows that string, character for character
        assert (await off(rows, page))[("hostile", a.address)]["reason"] == f"body does not contain {HOSTILE!r}"
        assert await off(page.evaluate, "document.querySelectorAll('img').length") == 0
        assert await off(page.evaluate, "document.querySelectorAll('script').length") == 1  # status.js alone
        assert await off(page.evaluate, "document.title") == "Fulcrum t1"
        events = await off(page.evaluate, "Array.from(document.querySelectorAll('#events li')).map(li => li.textContent)")
        assert any(repr(HOSTILE) in e and "hostile/" in e for e in events), events

        # Stop b: the node marks it down within DETECT, the page shows it within one refresh.
        node_down: list[float] = []

        async def watch_node() -> None:
            web = node.snapshot.pools["web"]
            while next(x for x in web.backends if x.id == b).health != "down":
                await trio.sleep(0.01)
            node_down.append(time.monotonic())

        stopped = time.monotonic()
        b_scope.cancel()
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch_node)
            page_down = await trio.to_thread.run_sync(lambda: wait_for(
                page, lambda r: r[("web", b)]["health"] == "down", "b down", DETECT + REFRESH + MARGIN))
        assert (await off(rows, page))[("web", a.address)]["health"] == "up"
        print(f"\nnode saw b down {node_down[0] - stopped:.2f}s after the stop, the page "
              f"{page_down - stopped:.2f}s (bound {DETECT + REFRESH:.2f}s + {MARGIN:g}s margin)")
        assert page_down - node_down[0] <= REFRESH + MARGIN

        # A trickle of requests for the screenshots, so rates and latencies show figures.
        async with trio.open_nursery() as trickle:
            async def requests() -> None:
                while True:
                    await http_get(f"http://127.0.0.1:{port}/slow?ms=20")

            trickle.start_soon(requests)
            await trio.sleep(2 * REFRESH)  # two samples with requests in between
            await off(page.screenshot, ARTIFACTS / "status-page.png")
            await off(lambda: page.screenshot(ARTIFACTS / "status-page-phone.png", width=390, height=844, mobile=True))
            trickle.cancel_scope.cancel()
        print(f"screenshots: {ARTIFACTS}/status-page.png, status-page-phone.png")

        # ?refresh= within [0.2, 60]; anything else is the default, 1 s
        for asked, used in (("0.01", "0.2"), ("5", "5"), ("3600", "60"), ("abc", "1"), ("-2", "1")):
            await off(page.navigate, f"http://127.0.0.1:{admin}/?refresh={asked}")
            deadline = time.monotonic() + FIRST_RENDER
            while await off(page.evaluate, "document.getElementById('interval')?.textContent + ' ' + "
                                           "document.readyState") != f"{used} complete":
                assert time.monotonic() < deadline, asked
                await trio.sleep(0.05)
    finally:
        await trio.to_thread.run_sync(page.close)
    assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000


async def test_page_json_answers_while_draining(nursery):
    (a,) = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [a.address]), node_extra="drain_timeout = 10\n"))
    admin = bound.admin[1]
    async with trio.open_nursery() as inner:
        inner.start_soon(http_get, f"http://127.0.0.1:{bound.listeners['front'][1]}/slow?ms=3000")
        while node.snapshot.pools["web"].backends[0].inflight == 0:
            await trio.sleep(0.01)
        node.stop()
        r = await http_get(f"http://127.0.0.1:{admin}/status/page.json")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        doc = r.json()
        assert doc["draining"] is True and doc["node"] == "t1"
        (backend,) = doc["pools"][0]["backends"]
        assert backend["inflight"] == 1 and backend["requests"] == 1 and backend["health"] == "up"
        assert len(backend["latency_counts"]) == len(doc["latency_bounds"]) + 1
        assert doc["cluster"] is None and doc["vips"] == [] and doc["listeners"][0]["name"] == "front"
        html = await http_get(f"http://127.0.0.1:{admin}/?refresh=5")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in html.headers["content-security-policy"]
        js = await http_get(f"http://127.0.0.1:{admin}/static/status.js")
        assert js.headers["content-type"].startswith("text/javascript") and "textContent" in js.text


async def test_status_and_the_page_count_each_listeners_connections(nursery):
    """Open and accepted client connections per listener, in /status and on the page; the node's
    total in /status is their sum."""
    (a,) = await start_backends(nursery, "a")
    _, bound = await start_node(nursery, node_toml(listener_toml("front", "http", "web"), pool_toml("web", [a.address])))
    admin, port = bound.admin[1], bound.listeners["front"][1]
    streams = []
    for _ in range(3):  # each answered once, then kept open
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"a\n"):
            data += await stream.receive_some(65536)
        streams.append(stream)
    status = (await http_get(f"http://127.0.0.1:{admin}/status")).json()
    assert status["listeners"]["front"]["connections"] == {"open": 3, "accepted": 3}
    assert status["connections"]["open"] == 3
    page = (await http_get(f"http://127.0.0.1:{admin}/status/page.json")).json()
    assert (page["listeners"][0]["open"], page["listeners"][0]["accepted"]) == (3, 3)
    await streams[0].aclose()
    with trio.fail_after(5):  # the node sees the close at its next read: milliseconds
        while (await http_get(f"http://127.0.0.1:{admin}/status")).json()["connections"]["open"] != 2:
            await trio.sleep(0.01)
    for stream in streams[1:]:
        await stream.aclose()


# A cluster node sees another join or die (lease_ttl = 2 s, then the VIP is placed again) and
# etcd go away (its keepalive, a third of the TTL, and its store follower): seconds on an idle
# machine, 15 s for 2 busy cores.
FOLLOW = 15.0


# Documentation addresses: the nodes record them (RUN_RECORDED), nothing is added to an interface.
VIPS = ("192.0.2.100", "192.0.2.101")


def cluster_toml(node_id: str, admin: int, http: int, endpoints: str, state: Path) -> str:
    vips = "".join(f'[[cluster.vips]]\naddress = "{v}/24"\n' for v in VIPS)
    return (f'[node]\nid = "{node_id}"\nadmin = "127.0.0.1:{admin}"\nstate_dir = "{state}"\ndrain_timeout = "1s"\nworkers = 1\n'
            f'[cluster]\netcd = [{endpoints}]\nlease_ttl = "2s"\nvip_interface = "eth0"\n{vips}'
            f'[[listeners]]\nname = "web"\nprotocol = "http"\nbind = "127.0.0.1:{http}"\npool = "p0"\n')


def page_json(admin: int) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"http://127.0.0.1:{admin}/status/page.json", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def eventually(admin: int, check, what: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + FOLLOW
    while True:
        doc = page_json(admin)
        if check(doc):
            return doc
        assert time.monotonic() < deadline, f"{what} within {FOLLOW:g}s: {doc}"
        time.sleep(0.1)


def test_cluster_nodes_vips_events_and_etcd_down_on_the_page(spawn, tmp_path: Path, etcd, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the nodes import RecordedAddresses from tests/
    a = spawn_backend(spawn, "a")
    store = EtcdStore(etcd.settings())
    store.create_pool(Pool(name="p0", backends=(Backend(Address("127.0.0.1", a)),)))
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    admins, procs = {}, {}
    for node_id in ("n1", "n2"):
        admins[node_id] = free_port()
        config = tmp_path / f"{node_id}.toml"
        config.write_text(cluster_toml(node_id, admins[node_id], free_port(), endpoints, tmp_path / f"state-{node_id}"))
        procs[node_id] = spawn("-c", RUN_RECORDED, "run", "--config", str(config), name=node_id)
    admin = admins["n1"]
    wait_port(admin)
    wait_port(admins["n2"])
    # n1 sees its own claim in etcd a moment before it has added the address (held_here): both awaited
    doc = eventually(admin, lambda d: [n["id"] for n in d["cluster"]["nodes"] if n["live"]] == ["n1", "n2"]
                     and sorted(v["holder"] or "" for v in d["vips"]) == ["n1", "n2"]
                     and all(v["held_here"] == (v["holder"] == "n1") for v in d["vips"]), "both nodes live, one VIP each")
    assert [n["self"] for n in doc["cluster"]["nodes"]] == [True, False]
    assert [v["address"] for v in doc["vips"]] == list(VIPS)
    assert all(v["since"] > 0 for v in doc["vips"]), doc["vips"]
    n2_vip = next(v["address"] for v in doc["vips"] if v["holder"] == "n2")
    assert doc["cluster"]["etcd_reachable"] is True and doc["config"]["source"] == "store"
    store.create_pool(Pool(name="p1", backends=(Backend(Address("127.0.0.1", a)),)))
    doc = eventually(admin, lambda d: any(e["kind"] == "pool" and e["subject"] == "p1" for e in d["events"]),
                     "the new pool among the recent events")
    assert [e["detail"] for e in doc["events"] if e["subject"] == "p1"][0].startswith("created (revision ")

    with Chromium(tmp_path / "chromium") as page:
        page.navigate(f"http://127.0.0.1:{admin}/")
        nodes = "Array.from(document.querySelectorAll('#nodes tr[data-node]')).map(r => r.textContent)"
        summary = "document.getElementById('cluster-summary').textContent"
        deadline = time.monotonic() + FIRST_RENDER
        while not (page.evaluate(nodes) or [""])[0].startswith("n1 (this node)live"):
            assert time.monotonic() < deadline, page.evaluate(nodes)
            time.sleep(0.05)
        assert [t[:2] for t in page.evaluate(nodes)] == ["n1", "n2"]
        assert "etcd reachable" in page.evaluate(summary)
        holders = "Object.fromEntries(Array.from(document.querySelectorAll('#vips tr[data-vip]'))" \
                  ".map(r => [r.getAttribute('data-vip'), r.children[1].textContent]))"
        assert page.evaluate(holders)[n2_vip] == "n2"

        # n2 dies: its lease expires (2 s) and n1 takes its VIP; the page shows the move
        procs["n2"].popen.kill()
        doc = eventually(admin, lambda d: all(v["holder"] == "n1" for v in d["vips"]), "n1 holding both VIPs")
        moves = [e["detail"] for e in doc["events"] if e["kind"] == "vip" and e["subject"] == n2_vip]
        assert moves and moves[0].endswith("-> n1"), doc["events"]  # newest first
        deadline = time.monotonic() + 2 * REFRESH + MARGIN  # the page's next refresh shows it
        while page.evaluate(holders)[n2_vip] != "n1 (this node)":
            assert time.monotonic() < deadline, page.evaluate(holders)
            time.sleep(0.05)
        vip_events = "Array.from(document.querySelectorAll('#events li[data-kind=vip]')).map(li => li.textContent)"
        assert any(n2_vip in e and e.endswith("-> n1") for e in page.evaluate(vip_events)), page.evaluate(vip_events)

        etcd.members[0].kill()
        doc = eventually(admin, lambda d: d["cluster"]["etcd_reachable"] is False, "etcd seen down")
        assert doc["config"]["stale"] is True and doc["pools"][0]["name"] == "p0"  # still answering, from memory
        deadline = time.monotonic() + 2 * REFRESH + MARGIN  # the page's next refresh shows it
        while "etcd NOT reachable" not in page.evaluate(summary):
            assert time.monotonic() < deadline, page.evaluate(summary)
            time.sleep(0.05)
        page.screenshot(ARTIFACTS / "status-page-cluster.png")


def test_a_node_that_does_not_check_a_backend_lists_the_clusters_verdict_among_its_events(
    spawn, tmp_path: Path, etcd
) -> None:
    """With health_checkers = 1 one of two nodes checks the backend; the other follows its
    verdict, and lists that health change among its recent events too (marked as the cluster's)."""
    port = free_port()
    backend = spawn("-m", "lbnode.demo_backend", "--name", "a", "--port", str(port), name="backend-a")
    wait_port(port)
    store = EtcdStore(etcd.settings())
    store.create_pool(Pool(name="p0", backends=(Backend(Address("127.0.0.1", port)),),
                           health=HealthCheck(type="tcp", interval=0.1, timeout=0.5, rise=1, fall=1)))
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    admins = {}
    for node_id in ("n1", "n2"):
        admins[node_id] = free_port()
        config = tmp_path / f"{node_id}.toml"
        config.write_text(  # no VIPs: this test must not touch an interface
            f'[node]\nid = "{node_id}"\nadmin = "127.0.0.1:{admins[node_id]}"\n'
            f'state_dir = "{tmp_path / f"state-{node_id}"}"\ndrain_timeout = "1s"\nworkers = 1\n'
            f'[cluster]\netcd = [{endpoints}]\nlease_ttl = "2s"\nhealth_checkers = 1\n'
            f'[[listeners]]\nname = "web"\nprotocol = "http"\nbind = "127.0.0.1:{free_port()}"\npool = "p0"\n')
        spawn("-m", "lbnode.cli", "run", "--config", str(config), name=node_id)
    subject = f"p0/127.0.0.1:{port}"

    def health_events(doc: dict) -> list[str]:  # type: ignore[type-arg]
        return [e["detail"] for e in doc["events"] if e["kind"] == "health" and e["subject"] == subject]

    for admin in admins.values():
        wait_port(admin)
        eventually(admin, lambda d: bool(d["cluster"]["nodes"]) and len(d["cluster"]["nodes"]) == 2
                   and d["pools"][0]["backends"][0]["health"] == "up", "both nodes live, the backend up")
    backend.popen.kill()  # one checker (rendezvous) sees it down; the other node follows its verdict
    docs = {node_id: eventually(admin, lambda d: any("-> down" in e for e in health_events(d)), "the backend down")
            for node_id, admin in admins.items()}
    checked = {n: [e for e in health_events(d) if "-> down" in e] for n, d in docs.items()}
    verdicts = [n for n, events in checked.items() if all(e.startswith("up -> down: cluster verdict: ") for e in events)]
    own = [n for n, events in checked.items() if not any("cluster verdict" in e for e in events)]
    assert len(verdicts) == 1 and len(own) == 1, checked  # one node checks it, the other lists the verdict
