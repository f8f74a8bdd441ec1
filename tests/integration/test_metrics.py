"""GET /metrics on a real node: real requests move the counters; the output passes promtool."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import trio

from lbnode.config import load_config_text
from tests.conftest import (
    free_port,
    http_get,
    listener_toml,
    node_toml,
    pool_toml,
    raw_exchange,
    start_backends,
    start_node,
)
from tests.promtext import parse, total, value

PROMTOOL = shutil.which("promtool")  # Debian's prometheus package: `make sysdeps-test` installs it


async def scrape(admin_port: int) -> tuple[httpx.Response, dict]:
    r = await http_get(f"http://127.0.0.1:{admin_port}/metrics")
    assert r.status_code == 200, r.text
    return r, parse(r.text)


async def promtool_check(text: str) -> None:
    assert PROMTOOL is not None, "promtool missing: run `make sysdeps-test` (Debian package prometheus)"
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    )
    assert done.returncode == 0 and not done.stdout.strip(), (done.stdout + done.stderr).decode()


async def wait_until(predicate, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    # 5 s: a connection's close is seen within a loop turn; the margin is for 2 busy cores.
    with trio.move_on_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout}s: {what}")


async def test_requests_move_the_counters_and_promtool_passes(nursery):
    a, b = await start_backends(nursery, "a", "b")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [a.address, b.address])
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    r0, before = await scrape(admin)
    assert r0.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(before, "fulcrum_http_requests_total", listener="front") == 0

    def client() -> list[int]:
        with httpx.Client(timeout=30) as c:  # one keep-alive connection for all of them
            codes = [c.get(f"http://127.0.0.1:{port}/").status_code for _ in range(4)]
            codes += [c.get(f"http://127.0.0.1:{port}/status/503").status_code for _ in range(2)]
            codes.append(c.get(f"http://127.0.0.1:{port}/slow?ms=300").status_code)
            codes.append(c.get(f"http://127.0.0.1:{port}/bytes?n=100000").status_code)
            return codes

    assert await trio.to_thread.run_sync(client) == [200] * 4 + [503] * 2 + [200, 200]
    assert (await raw_exchange(port, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400")

    async def closed() -> bool:
        return value((await scrape(admin))[1], "fulcrum_listener_connections_open", listener="front") == 0

    await wait_until(closed, "both client connections counted closed")
    r, after = await scrape(admin)
    await promtool_check(r.text)

    assert value(after, "fulcrum_listener_connections_accepted_total", listener="front") == 2
    # the malformed one never became a request head: it is counted among the local answers only
    assert value(after, "fulcrum_http_requests_total", listener="front") == 8
    front = {"listener": "front"}
    assert value(after, "fulcrum_http_responses_total", **front, source="backend", code="2xx") == 6
    assert value(after, "fulcrum_http_responses_total", **front, source="backend", code="5xx") == 2
    assert value(after, "fulcrum_http_responses_total", **front, source="local", code="4xx") == 1
    assert value(after, "fulcrum_http_responses_total", **front, source="local", code="5xx") == 0
    # per backend: round robin over two, and the two agree with the listener's count
    assert total(after, "fulcrum_backend_responses_total", pool="web", code="2xx") == 6
    assert total(after, "fulcrum_backend_requests_total", pool="web") == 8
    for be in (a, b):
        assert value(after, "fulcrum_backend_requests_total", pool="web", backend=be.address) == 4
        assert value(after, "fulcrum_backend_health", pool="web", backend=be.address, state="up") == 1
        assert value(after, "fulcrum_backend_inflight_requests", pool="web", backend=be.address) == 0
        assert value(after, "fulcrum_backend_admin_state", pool="web", backend=be.address, state="enabled") == 1
        assert value(after, "fulcrum_backend_admin_state", pool="web", backend=be.address, state="draining") == 0
        assert value(after, "fulcrum_backend_weight", pool="web", backend=be.address) == 1
    assert total(after, "fulcrum_backend_failures_total", pool="web") == 2  # the two 503s, passively seen
    # the 100 kB body went out; the 8 request heads came in
    assert value(after, "fulcrum_http_sent_bytes_total", **front) > 100_000
    assert value(after, "fulcrum_http_received_bytes_total", **front) > 8 * len("GET / HTTP/1.1\r\n\r\n")
    # durations: 8 observed; the 300 ms request is above 250 ms and (even on 2 busy cores) within 10 s
    hist = "fulcrum_http_request_duration_seconds"
    assert value(after, hist + "_count", **front) == 8
    assert value(after, hist + "_bucket", **front, le="0.25") <= 7
    assert value(after, hist + "_bucket", **front, le="10.0") == 8
    assert value(after, hist + "_sum", **front) >= 0.3
    be_hist = "fulcrum_backend_response_seconds"
    assert total(after, be_hist + "_count", pool="web") == 8
    assert total(after, be_hist + "_sum", pool="web") >= 0.3
    # the process
    assert value(after, "process_resident_memory_bytes") > 10_000_000
    assert value(after, "process_open_fds") >= 3
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "fulcrum_node_draining") == 0


async def test_retries_and_an_unreachable_backend_are_counted(nursery):
    (a,) = await start_backends(nursery, "a")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"),
        pool_toml("web", [dead, a.address], algorithm="round_robin", retries=1, connect_ejection=0),
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    for _ in range(4):
        assert (await http_get(f"http://127.0.0.1:{port}/")).status_code == 200
    _, after = await scrape(admin)
    # round robin sends every other request to the dead backend first, which is then retried
    assert value(after, "fulcrum_pool_retries_total", pool="web") == 2
    assert value(after, "fulcrum_backend_failures_total", pool="web", backend=dead) == 2
    assert value(after, "fulcrum_backend_requests_total", pool="web", backend=a.address) == 4
    assert value(after, "fulcrum_http_responses_total", listener="front", source="backend", code="2xx") == 4


async def test_scrape_answers_while_draining_and_unknown_paths_404(nursery):
    (a,) = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"), pool_toml("web", [a.address]), node_extra="drain_timeout = 10\n"
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    missing = await http_get(f"http://127.0.0.1:{admin}/metrics/extra")
    assert missing.status_code == 404 and "/metrics" in missing.text
    assert (await http_get(f"http://127.0.0.1:{admin}/metrics", method="POST")).status_code == 405

    async with trio.open_nursery() as inner:
        slow_done = trio.Event()

        async def slow() -> None:
            assert (await http_get(f"http://127.0.0.1:{port}/slow?ms=4000")).status_code == 200
            slow_done.set()

        inner.start_soon(slow)

        async def in_flight() -> bool:
            return value((await scrape(admin))[1], "fulcrum_backend_inflight_requests", pool="web",
                         backend=a.address) == 1

        await wait_until(in_flight, "the slow request in flight")
        node.stop()

        async def draining() -> bool:
            return value((await scrape(admin))[1], "fulcrum_node_draining") == 1

        await wait_until(draining, "a scrape during the drain shows it")
        # it was scraped while the 4 s request was still in flight (drain seen within ms; 4 s of margin)
        assert not slow_done.is_set()


async def test_affinity_hits_misses_and_table_size(nursery, tmp_path):
    a, b = await start_backends(nursery, "a", "b")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"),
        pool_toml("web", [a.address, b.address], _extra='[pools.affinity]\nmode = "source_ip"\n'),
        node_extra=f'state_dir = "{tmp_path / "state"}"\n',
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    served = {(await http_get(f"http://127.0.0.1:{port}/")).text for _ in range(3)}
    assert len(served) == 1  # one client address: one session, one backend
    _, s = await scrape(admin)
    # the first request starts the session (a miss), the next two follow it
    assert value(s, "fulcrum_affinity_misses_total", pool="web") == 1
    assert value(s, "fulcrum_affinity_hits_total", pool="web") == 2
    assert value(s, "fulcrum_affinity_table_entries", pool="web") == 1


async def test_health_checks_are_counted_by_result_with_their_durations(nursery):
    (a,) = await start_backends(nursery, "a")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: every check fails
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web"),
        pool_toml("web", [a.address, dead],
                  _extra='[pools.health]\ntype = "http"\npath = "/healthz"\ninterval = "100ms"\nfall = 1\n'),
    ))
    admin = bound.admin[1]

    async def checked() -> bool:
        s = (await scrape(admin))[1]
        return (value(s, "fulcrum_health_checks_total", pool="web", backend=a.address, result="passed") >= 3
                and value(s, "fulcrum_health_checks_total", pool="web", backend=dead, result="failed") >= 3)

    await wait_until(checked, "three checks of each backend (100 ms apart)")
    r, s = await scrape(admin)
    await promtool_check(r.text)
    # (the live backend is not asserted never to fail: on busy cores a check may hit its 1 s timeout)
    assert value(s, "fulcrum_health_checks_total", pool="web", backend=dead, result="passed") == 0
    assert value(s, "fulcrum_backend_health", pool="web", backend=dead, state="down") == 1
    assert value(s, "fulcrum_backend_health", pool="web", backend=a.address, state="up") == 1
    for be in (a.address, dead):
        checks = total(s, "fulcrum_health_checks_total", pool="web", backend=be)
        assert value(s, "fulcrum_health_check_duration_seconds_count", pool="web", backend=be) == checks
        # every check ends by its 1 s timeout (plus scheduling): all within the 10 s bucket
        assert value(s, "fulcrum_health_check_duration_seconds_bucket", pool="web", backend=be, le="10.0") == checks
    # a refused connection is answered at once, not at the 1 s timeout: some checks within 250 ms
    assert value(s, "fulcrum_health_check_duration_seconds_bucket", pool="web", backend=dead, le="0.25") >= 1


async def test_counters_survive_a_config_change_that_drains_and_reweights_a_backend(nursery):
    a, b = await start_backends(nursery, "a", "b")
    listener = listener_toml("front", "http", "web")
    node, bound = await start_node(nursery, node_toml(listener, pool_toml("web", [a.address, b.address])))
    port, admin = bound.listeners["front"][1], bound.admin[1]
    for _ in range(4):
        assert (await http_get(f"http://127.0.0.1:{port}/")).status_code == 200
    changed = node_toml(listener, pool_toml("web", [a.address]) + f'  admin = "draining"\n  weight = 3\n'
                        f'  [[pools.backends]]\n  address = "{b.address}"\n')
    node.apply(load_config_text(changed, "changed.toml"))
    _, s = await scrape(admin)
    assert value(s, "fulcrum_config_version") == 2
    assert value(s, "fulcrum_backend_admin_state", pool="web", backend=a.address, state="draining") == 1
    assert value(s, "fulcrum_backend_admin_state", pool="web", backend=a.address, state="enabled") == 0
    assert value(s, "fulcrum_backend_weight", pool="web", backend=a.address) == 3
    # the backends' and the listener's counters carried over the new snapshot
    assert value(s, "fulcrum_backend_requests_total", pool="web", backend=a.address) == 2
    assert value(s, "fulcrum_backend_response_seconds_count", pool="web", backend=b.address) == 2
    assert value(s, "fulcrum_http_requests_total", listener="front") == 4


async def test_rate_limited_requests_are_counted(nursery):
    (a,) = await start_backends(nursery, "a")
    node, bound = await start_node(nursery, node_toml(
        listener_toml("front", "http", "web", extra="[listeners.rate_limit]\nrate = 1\nburst = 2\n"),
        pool_toml("web", [a.address]),
    ))
    port, admin = bound.listeners["front"][1], bound.admin[1]

    def burst() -> list[int]:
        with httpx.Client(timeout=30) as c:
            return [c.get(f"http://127.0.0.1:{port}/").status_code for _ in range(5)]

    codes = await trio.to_thread.run_sync(burst)
    # a burst of 2, then 1 per second: 5 requests within a second or two get 2 or 3 answers
    refused = codes.count(429)
    assert codes[:2] == [200, 200] and refused >= 2 and set(codes) <= {200, 429}, codes
    _, s = await scrape(admin)
    assert value(s, "fulcrum_http_rate_limited_total", listener="front") == refused
    assert value(s, "fulcrum_http_responses_total", listener="front", source="local", code="4xx") == refused
    assert value(s, "fulcrum_http_responses_total", listener="front", source="backend", code="2xx") == 5 - refused
