"""Active health checks against real sockets on 127.0.0.1, and the check schedule.

The schedule tests swap the probe for a fake one and run on Trio's autojump
clock, so a minute of checks takes milliseconds and timings are exact.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from collections.abc import Awaitable, Callable

import pytest
import trio

from lbnode.health.checker import HealthChecker, check_backend, format_seconds
from lbnode.health.state import Observation, Transition
from lbnode.model import Address, Backend, HealthCheck

Respond = Callable[[trio.SocketStream], Awaitable[None]]


class TinyServer:
    """A throwaway TCP server on 127.0.0.1 that counts its connections; can close and reopen."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.port = 0
        self.accepted: list[float] = []
        self.requests: list[bytes] = []
        self._scope: trio.CancelScope | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted.append(trio.current_time())
        try:
            await self.respond(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def read_head(self, stream: trio.SocketStream) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        self.requests.append(data)
        return data


def http_server(status: int = 200, body: bytes = b"ok", extra: bytes | None = None) -> TinyServer:
    async def respond(stream: trio.SocketStream) -> None:
        await server.read_head(stream)
        if extra is not None:
            await stream.send_all(extra)
            return
        await stream.send_all(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, len(body), body)
        )

    server = TinyServer(respond)
    return server


def silent_server() -> TinyServer:
    async def respond(stream: trio.SocketStream) -> None:
        while await stream.receive_some(4096):  # never answers; hangs up when the client does
            pass

    return TinyServer(respond)


def closed_port() -> Address:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return Address("127.0.0.1", s.getsockname()[1])


HTTP = HealthCheck(type="http", path="/healthz", timeout=1.0)


# --------------------------------------------------------------------------- one probe


async def test_http_check_passes_on_200_and_sends_a_proper_request(nursery: trio.Nursery) -> None:
    server = http_server(200)
    await server.start(nursery)
    assert await check_backend(server.address, HTTP) == (True, "status 200")
    head = server.requests[0].decode()
    assert head.startswith("GET /healthz HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head
    assert "\r\nConnection: close\r\n" in head
    assert "\r\nUser-Agent: fulcrum-health\r\n" in head


async def test_http_check_uses_the_configured_host_and_method(nursery: trio.Nursery) -> None:
    server = http_server(200)
    await server.start(nursery)
    check = HealthCheck(type="http", method="HEAD", path="/", host="app.example.com")
    assert await check_backend(server.address, check) == (True, "status 200")
    head = server.requests[0].decode()
    assert head.startswith("HEAD / HTTP/1.1\r\n") and "\r\nHost: app.example.com\r\n" in head


async def test_http_check_fails_on_500(nursery: trio.Nursery) -> None:
    server = http_server(500, b"boom")
    await server.start(nursery)
    assert await check_backend(server.address, HTTP) == (False, "status 500")


async def test_expect_status_ranges_are_honoured(nursery: trio.Nursery) -> None:
    server = http_server(404)
    await server.start(nursery)
    only_404 = HealthCheck(type="http", expect_status=((404, 404),))
    assert await check_backend(server.address, only_404) == (True, "status 404")
    assert await check_backend(server.address, HTTP) == (False, "status 404")


@pytest.mark.parametrize("kind", ["tcp", "http"])
async def test_closed_port_fails_with_connection_refused(kind: str) -> None:
    assert await check_backend(closed_port(), HealthCheck(type=kind)) == (
        False,
        "connection refused",
    )


async def test_tcp_check_passes_when_the_port_accepts(nursery: trio.Nursery) -> None:
    server = silent_server()
    await server.start(nursery)
    assert await check_backend(server.address, HealthCheck(type="tcp")) == (True, "connected")


async def test_a_backend_that_never_answers_times_out(nursery: trio.Nursery) -> None:
    server = silent_server()
    await server.start(nursery)
    check = HealthCheck(type="http", timeout=0.2)
    started = trio.current_time()
    result = await check_backend(server.address, check)
    elapsed = trio.current_time() - started
    assert result == (False, "timeout after 200ms waiting for the response")
    assert 0.19 <= elapsed < 1.0


async def test_expect_body_matches_a_substring(nursery: trio.Nursery) -> None:
    server = http_server(200, b'{"status": "ok"}')
    await server.start(nursery)
    ok = HealthCheck(type="http", expect_body='"ok"')
    assert await check_backend(server.address, ok) == (True, "status 200")
    ready = HealthCheck(type="http", expect_body="ready")
    assert await check_backend(server.address, ready) == (False, "body does not contain 'ready'")


async def test_expect_body_reads_chunked_and_close_delimited_bodies(nursery: trio.Nursery) -> None:
    chunked = http_server(
        extra=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nall\r\n5\r\n is o\r\n1\r\nk\r\n0\r\n\r\n"
    )
    until_close = http_server(extra=b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall is ok")
    await chunked.start(nursery)
    await until_close.start(nursery)
    check = HealthCheck(type="http", expect_body="is ok")
    assert await check_backend(chunked.address, check) == (True, "status 200")
    assert await check_backend(until_close.address, check) == (True, "status 200")


async def test_a_status_mismatch_is_reported_before_the_body(nursery: trio.Nursery) -> None:
    server = http_server(503, b"ok")
    await server.start(nursery)
    check = HealthCheck(type="http", expect_body="ok")
    assert await check_backend(server.address, check) == (False, "status 503")


async def test_garbage_and_early_close_are_named(nursery: trio.Nursery) -> None:
    garbage = http_server(extra=b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    empty = http_server(extra=b"")
    await garbage.start(nursery)
    await empty.start(nursery)
    ok, reason = await check_backend(garbage.address, HTTP)
    assert not ok and reason.startswith("invalid HTTP response")
    assert await check_backend(empty.address, HTTP) == (
        False,
        "connection closed before the response",
    )


# A socket dropped without close() warns when collected: that fails the test too.
@pytest.mark.filterwarnings("error::ResourceWarning")
async def test_probes_never_leak_sockets(nursery: trio.Nursery) -> None:
    good, mute = http_server(200), silent_server()
    await good.start(nursery)
    await mute.start(nursery)
    refused = closed_port()
    quick = HealthCheck(type="http", timeout=0.02)
    await check_backend(good.address, quick)  # let lazy imports and the resolver settle
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        await check_backend(good.address, HTTP)
        await check_backend(mute.address, quick)
        await check_backend(refused, HTTP)
    with trio.move_on_after(0.01):  # cancelled from outside, mid-probe
        await check_backend(mute.address, HTTP)
    await trio.sleep(0.05)  # the servers close their side
    assert len(os.listdir("/proc/self/fd")) <= before


def test_durations_read_like_the_config() -> None:
    assert format_seconds(1.0) == "1.0s"
    assert format_seconds(2.5) == "2.5s"
    assert format_seconds(0.25) == "250ms"


# --------------------------------------------------------------------------- checker on real sockets


async def test_backend_goes_down_and_comes_back_within_fall_and_rise_intervals(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbnode.health")
    interval, rise, fall = 0.05, 2, 3
    check = HealthCheck(
        type="http", interval=interval, timeout=0.05, rise=rise, fall=fall, jitter=0.1
    )
    server = http_server(200)
    await server.start(nursery)
    changed = trio.Event()
    transitions: list[Transition] = []

    def on_transition(backend_id: str, transition: Transition) -> None:
        nonlocal changed
        transitions.append(transition)
        changed.set()
        changed = trio.Event()

    async def next_transition() -> Transition:
        with trio.fail_after(3):
            await changed.wait()
        return transitions[-1]

    checker = HealthChecker(
        "web", check, [Backend(server.address)], on_transition=on_transition, rng=random.Random(1)
    )
    await nursery.start(checker.run)
    first = await next_transition()
    assert (first.old, first.new) == ("unknown", "up")

    # Slack for a loaded 2-core machine; the budget itself is the checks.
    slack = 0.3
    longest_gap = interval * (1 + check.jitter)
    server.stop()
    closed_at = trio.current_time()
    down = await next_transition()
    assert (down.old, down.new, down.reason) == ("up", "down", "connection refused")
    assert down.at - closed_at <= fall * longest_gap + slack

    await server.start(nursery)  # same port again
    opened_at = trio.current_time()
    up = await next_transition()
    assert (up.old, up.new, up.reason) == ("down", "up", "status 200")
    assert up.at - opened_at <= rise * longest_gap + slack

    lines = [r.getMessage() for r in caplog.records if r.name == "lbnode.health"]
    assert f"pool web backend 127.0.0.1:{server.port} up -> down: connection refused" in lines
    assert f"pool web backend 127.0.0.1:{server.port} down -> up: status 200" in lines
    assert checker.states[str(server.address)].state == "up"


async def test_a_server_never_sees_checks_faster_than_the_interval(nursery: trio.Nursery) -> None:
    interval = 0.05
    servers = [http_server(200) for _ in range(3)]
    for server in servers:
        await server.start(nursery)
    check = HealthCheck(type="http", interval=interval, timeout=0.05, jitter=0.2)
    checker = HealthChecker(
        "web", check, [Backend(s.address) for s in servers], rng=random.Random(3)
    )
    with trio.CancelScope() as scope:
        nursery.start_soon(checker.run)
        await trio.sleep(1.0)
        scope.cancel()
    for server in servers:
        hits = server.accepted
        duration = hits[-1] - hits[0]
        # Start to start at least `interval` apart, so N hits span >= (N - 1) intervals;
        # a little tolerance for the server's own scheduling delay.
        assert duration >= (len(hits) - 1) * interval - 0.02
        assert 5 <= len(hits) <= 1.0 / interval + 1


# --------------------------------------------------------------------------- the schedule (fake clock)


class FakeProbe:
    """Records when each backend is probed and answers from a script."""

    def __init__(self, duration: float = 0.0) -> None:
        self.duration = duration
        self.calls: dict[int, list[float]] = {}
        self.failing: set[int] = set()
        self.stall = 0.0  # a failing probe takes this much longer than its timeout (a frozen process)

    async def __call__(self, address: Address, check: HealthCheck) -> tuple[bool, str]:
        self.calls.setdefault(address.port, []).append(trio.current_time())
        if self.stall and address.port in self.failing:
            await trio.sleep(check.timeout + self.stall)
            return False, f"timeout after {format_seconds(check.timeout)} while connecting"
        if self.duration:
            await trio.sleep(self.duration)
        if address.port in self.failing:
            return False, "connection refused"
        return True, "status 200"


def backends(*ports: int) -> list[Backend]:
    return [Backend(Address("127.0.0.1", p)) for p in ports]


async def run_for(checker: HealthChecker, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_checks_are_spaced_by_interval_plus_bounded_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = FakeProbe()
    check = HealthCheck(interval=1.0, jitter=0.2)
    checker = HealthChecker("web", check, backends(1, 2, 3), probe=probe, rng=random.Random(5))
    start = trio.current_time()
    await run_for(checker, 60.0)
    for times in probe.calls.values():
        assert 0 <= times[0] - start < 1.0  # spread over the first interval
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) >= 1.0
        assert max(gaps) <= 1.2 + 1e-9
        assert len(set(round(g, 6) for g in gaps)) > 1  # jitter is really applied


async def test_checks_of_several_backends_are_not_in_lockstep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = FakeProbe()
    check = HealthCheck(interval=1.0, jitter=0.1)
    checker = HealthChecker("web", check, backends(1, 2, 3, 4), probe=probe, rng=random.Random(11))
    await run_for(checker, 30.0)
    all_times = sorted(t for times in probe.calls.values() for t in times)
    mine = probe.calls[1]
    others = [t for t in all_times if t not in mine]
    nearest = [min(abs(t - o) for o in others) for t in mine]
    assert statistics.median(nearest) > 0.02  # lockstep would make this 0


async def test_a_slow_probe_delays_the_next_one_instead_of_overlapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = FakeProbe(duration=2.5)
    checker = HealthChecker("web", HealthCheck(interval=1.0, jitter=0.0), backends(1), probe=probe)
    await run_for(checker, 20.0)
    times = probe.calls[1]
    assert all(b - a >= 2.5 - 1e-9 for a, b in zip(times, times[1:], strict=False))


async def test_results_feed_the_state_machine_and_the_callbacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = FakeProbe()
    probe.failing.add(2)
    transitions: list[tuple[str, Transition]] = []
    observations: list[Observation] = []
    check = HealthCheck(interval=1.0, jitter=0.0, rise=2, fall=3)
    checker = HealthChecker(
        "web",
        check,
        [Backend(Address("127.0.0.1", 1), name="web1"), *backends(2)],
        on_transition=lambda b, t: transitions.append((b, t)),
        on_observation=observations.append,
        probe=probe,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(5.0)
        probe.failing.add(1)
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    moves = [(b, t.old, t.new, t.reason) for b, t in transitions]
    assert sorted(moves[:2]) == [
        ("127.0.0.1:2", "unknown", "down", "connection refused"),
        ("web1", "unknown", "up", "status 200"),
    ]
    assert moves[2:] == [("web1", "up", "down", "connection refused")]
    assert len(observations) == sum(len(t) for t in probe.calls.values())
    assert {o.backend_id for o in observations} == {"web1", "127.0.0.1:2"}
    assert checker.states["web1"].state == "down"


async def test_update_starts_and_stops_checks_without_restarting_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = FakeProbe()
    check = HealthCheck(interval=1.0, jitter=0.0)
    checker = HealthChecker("web", check, backends(1, 2), probe=probe, rng=random.Random(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(10.5)
        kept = checker.states["127.0.0.1:1"]
        updated_at = trio.current_time()
        checker.update(backends(1, 3))
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    assert checker.states["127.0.0.1:1"] is kept
    assert set(checker.states) == {"127.0.0.1:1", "127.0.0.1:3"}
    assert all(t <= updated_at for t in probe.calls[2])
    assert min(probe.calls[3]) >= updated_at
    ones = probe.calls[1]
    assert [round(b - a, 6) for a, b in zip(ones, ones[1:], strict=False)] == [1.0] * (
        len(ones) - 1
    )


async def test_an_address_change_is_a_new_backend(autojump_clock: trio.testing.MockClock) -> None:
    probe = FakeProbe()
    checker = HealthChecker("web", HealthCheck(interval=1.0), [], probe=probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        checker.update([Backend(Address("127.0.0.1", 1), name="app")])
        await trio.sleep(5.0)
        old = checker.states["app"]
        moved_at = trio.current_time()
        checker.update([Backend(Address("127.0.0.1", 2), name="app")])
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert checker.states["app"] is not old
    assert all(t <= moved_at for t in probe.calls[1])
    assert probe.calls[2]


# --------------------------------------------------------------------------- a stalled process


async def test_a_timeout_seen_late_by_a_frozen_process_does_not_take_a_backend_down(nursery: trio.Nursery) -> None:
    """The backend answers in 20 ms, but its first two answers come after this process froze for
    300 ms (a blocking sleep in the server's handler freezes the whole loop, as a stalled host
    does): the checker's 100 ms deadline passes unseen, and without the stall rule fall = 1
    would take the backend down. The rule discounts them and checks again at once."""
    import time

    stalls = [0.3, 0.3]

    async def respond(stream: trio.SocketStream) -> None:
        await server.read_head(stream)
        if stalls:
            time.sleep(stalls.pop())  # the loop, checker included, does not run
        await trio.sleep(0.02)  # the answer comes 20 ms after the loop runs again
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    server = TinyServer(respond)
    await server.start(nursery)
    transitions: list[Transition] = []
    observations: list[Observation] = []
    check = HealthCheck(type="http", interval=0.05, timeout=0.1, rise=1, fall=2, jitter=0.0)
    checker = HealthChecker("web", check, [Backend(server.address)], rng=random.Random(1),
                            on_transition=lambda _, t: transitions.append(t), on_observation=observations.append)
    async with trio.open_nursery() as inner:
        await inner.start(checker.run)
        with trio.fail_after(10):  # 2 stalled probes (0.32 s each) and a few good ones take ~1 s
            while stalls or sum(o.ok for o in observations) < 3:
                await trio.sleep(0.05)
        inner.cancel_scope.cancel()
    state = checker.states[str(server.address)]
    assert [t.new for t in transitions] == ["up"]  # never down
    assert state.inconclusive == 2 and state.checks == state.passed  # the stalled probes were not counted
    assert all(o.ok for o in observations)  # nor published to the cluster


async def test_a_dead_backend_still_goes_down_when_every_probe_is_stalled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At most ``fall`` stalled timeouts in a row are discounted: then each counts, so a backend
    that only ever times out is down after 2 x fall probes instead of fall."""
    probe = FakeProbe()
    probe.stall = 1.0
    transitions: list[tuple[Transition, int]] = []  # with the number of probes made by then
    check = HealthCheck(interval=1.0, timeout=1.0, jitter=0.0, rise=2, fall=3)
    checker = HealthChecker("web", check, backends(1), probe=probe,
                            on_transition=lambda _, t: transitions.append((t, len(probe.calls[1]))))
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(5.0)  # up after its first (good) probe
        probe.failing.add(1)
        start = len(probe.calls[1])
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert [t.new for t, _ in transitions] == ["up", "down"]
    assert transitions[1][1] - start == 6  # 3 discounted, then 3 counted
    assert checker.states["127.0.0.1:1"].inconclusive == 3


async def test_a_timeout_within_its_bound_counts_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """A probe that fails within 1.5 x its timeout is the backend's doing: fall probes suffice."""
    probe = FakeProbe()
    probe.stall = 0.4  # 1.4 x timeout: a busy loop, not a frozen one
    downs: list[int] = []  # probes made when it went down
    check = HealthCheck(interval=1.0, timeout=1.0, jitter=0.0, rise=2, fall=3)
    checker = HealthChecker("web", check, backends(1), probe=probe,
                            on_transition=lambda _, t: downs.append(len(probe.calls[1])) if t.new == "down" else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run)
        await trio.sleep(5.0)
        probe.failing.add(1)
        start = len(probe.calls[1])
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert [n - start for n in downs] == [3]
    assert checker.states["127.0.0.1:1"].inconclusive == 0
