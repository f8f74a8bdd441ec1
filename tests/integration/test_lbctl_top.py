"""`lbctl top` against a real node with a control API over mutual TLS: the JSON snapshot shows
the backends' counters after traffic; over a pipe, each refresh's rates match the requests a
client sent in that interval; Ctrl-C ends it with exit 0 and no traceback."""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from lbctl.certs import init_certs
from tests.conftest import FAULTHANDLER_ENV, REPO, exit_code_or_stacks, pool_toml, start_backends
from tests.integration.test_control_api import Certs, start_control_node

# The client sends a request every 50 ms: at most 20/s, fewer when the cores are busy.
PACE = 0.05
# A refresh reads the node at the middle of its Status call and the header shows that moment;
# requests complete a few ms after the node counts them. On 2 busy cores both ends may be off by
# ~150 ms: 3 requests at 20/s each, and a quarter of the count for a slow call in the middle.
SLACK_REQUESTS, SLACK_SHARE = 6, 0.25
# lbctl starts (grpc import, TLS handshake) and draws a table per second; 20 s is the margin
# for 2 busy cores.
DEADLINE = 20.0
_HEADER = re.compile(r"^lbctl top  (\S+)Z  1 node \(n1\), summed; (?:rates over the last (\S+)s|rates from the next)")


def _lbctl_args(certs: Certs, endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lbctl.cli", *certs.flags(), "-e", endpoint, *args]


async def test_json_snapshot_shows_every_backend_with_its_requests(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address, b.address]),
                                  settings=certs.settings(), flags=certs.flags())

    def traffic() -> list[int]:
        with httpx.Client(timeout=10) as client:
            return [client.get(f"{cn.http}/").status_code for _ in range(6)] + [
                client.get(f"{cn.http}/status/503").status_code for _ in range(2)]

    assert await trio.to_thread.run_sync(traffic) == [200] * 6 + [503] * 2
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        _lbctl_args(certs, cn.endpoint, "-o", "json", "top", "--interval", "0.5"),
        capture_output=True, text=True, cwd=REPO, timeout=60))
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert snap["nodes"] == ["n1"] and snap["unreachable"] == {}
    assert 0.4 <= snap["interval_seconds"] <= 5.0  # asked 0.5 s; a slow call on busy cores stretches it
    (pool,) = snap["pools"]
    assert pool["name"] == "web" and pool["requests"] == 8 and pool["queue_length"] == 0
    backends = {be["id"]: be for be in pool["backends"]}
    assert set(backends) == {a.address, b.address}
    for be in backends.values():
        assert be["requests"] == 4 and be["health"] == {"up": 1} and be["admin"] == "enabled"
        assert be["nodes"]["n1"]["requests"] == 4  # the one node's share is all of it
        # nothing was sent during the interval: rates are zero, not the totals
        assert be["requests_per_s"] == 0 and be["p50_seconds"] is None
    # the two 503s: one per backend (round robin), passively seen as failures
    assert sorted(be["failures"] for be in backends.values()) == [1, 1]

    # a node that cannot be reached: one line, exit 1
    down = subprocess.run(_lbctl_args(certs, "127.0.0.1:1", "-o", "json", "top"), capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert down.returncode == 1 and down.stderr.startswith("lbctl: UNAVAILABLE") and "Traceback" not in down.stderr


async def test_over_a_pipe_each_refresh_shows_the_rate_sent_and_ctrl_c_exits_0(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    a, b = await start_backends(nursery, "a", "b")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address, b.address]),
                                  settings=certs.settings(), flags=certs.flags())
    sent: list[float] = []  # wall-clock time each request completed
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                assert c.get(f"{cn.http}/").status_code == 200
                sent.append(time.time())
                time.sleep(PACE)

    proc = subprocess.Popen(_lbctl_args(certs, cn.endpoint, "top"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, text=True, env=FAULTHANDLER_ENV)
    # The client runs in a nursery of its own, which this test leaves only once the client has
    # stopped: the node (in the fixture's nursery) serves to the end, so no request of the
    # client is left waiting on a node being torn down (it once timed out that way, 10 s).
    async with trio.open_nursery() as clients:
        try:
            clients.start_soon(trio.to_thread.run_sync, client)
            # tables: (wall time of the sample, interval, the pool's REQ/S and REQUESTS)
            tables: list[tuple[float, float | None, float | None, int]] = []
            raw: list[str] = []

            def read_tables() -> None:
                header: tuple[float, float | None] | None = None
                while len([t for t in tables if t[1] is not None]) < 2:
                    line = proc.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        return
                    raw.append(line)
                    m = _HEADER.match(line)
                    if m:
                        wall = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.UTC).timestamp()
                        header = (wall, float(m.group(2)) if m.group(2) else None)
                    elif header is not None and line.split()[:2] == ["web", "*"]:
                        cells = line.split()
                        rate = None if cells[3] == "-" else float(cells[3])
                        tables.append((header[0], header[1], rate, int(cells[-1])))
                        header = None

            with trio.fail_after(DEADLINE):
                await trio.to_thread.run_sync(read_tables)
            assert "\x1b" not in "".join(raw), "no escape codes when stdout is not a terminal"
            rated = [t for t in tables if t[1] is not None]
            assert len(rated) >= 2, "".join(raw) + proc.stderr.read()  # type: ignore[union-attr]
            for (wall0, _, _, requests0), (wall1, seconds, rate, requests1) in zip(tables, tables[1:], strict=False):
                assert seconds is not None and rate is not None
                # The design: a refresh per second, the rate over the time between the middles of the
                # two samples' calls; after a slow refresh the next starts at least half an interval
                # after it ended, so never less than 0.5 s. Above: the interval, plus up to 2 s for a
                # Status call (its timeout at this interval), plus 1 s of margin for busy cores.
                assert 0.5 <= seconds <= 4.0, seconds
                assert abs(rate * seconds - (requests1 - requests0)) <= 0.1 * seconds + 0.05, (rate, seconds)
                in_window = sum(1 for t in sent if wall0 < t <= wall1)
                assert in_window > 0, "the client kept sending"
                assert abs(rate * seconds - in_window) <= SLACK_SHARE * in_window + SLACK_REQUESTS, (
                    rate, seconds, in_window, "".join(raw))
            proc.send_signal(signal.SIGINT)
            code = await trio.to_thread.run_sync(lambda: exit_code_or_stacks(proc, DEADLINE, "lbctl top after Ctrl-C"))
            err = proc.stderr.read()  # type: ignore[union-attr]
            assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
        finally:
            stop.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_on_a_terminal_it_redraws_in_place_and_ctrl_c_gives_the_screen_back(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs
) -> None:
    from lbctl.top import ENTER_SCREEN, LEAVE_SCREEN, REDRAW

    (a,) = await start_backends(nursery, "a")
    cn = await start_control_node(nursery, tmp_path / "state", pool_toml("web", [a.address]),
                                  settings=certs.settings(), flags=certs.flags())
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(_lbctl_args(certs, cn.endpoint, "top"), stdin=terminal, stdout=terminal,
                            stderr=subprocess.PIPE, cwd=REPO, env=FAULTHANDLER_ENV)
    os.close(terminal)
    screen = b""

    def read_until(marker: bytes, count: int = 1) -> None:
        nonlocal screen
        while screen.count(marker) < count:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other side closed (EIO)
                return
            if not chunk:
                return
            screen += chunk

    async def read_within(marker: bytes, count: int, what: str) -> None:
        # The read is given up at the deadline (abandon_on_cancel: a thread blocked in read()
        # cannot be cancelled; the finally below kills lbctl, which ends it), and the failure
        # says where lbctl's threads stood, instead of a test that waits for good.
        with trio.move_on_after(DEADLINE):
            await trio.to_thread.run_sync(lambda: read_until(marker, count), abandon_on_cancel=True)
        if screen.count(marker) < count:
            exit_code_or_stacks(proc, 0, f"lbctl top, {what} (screen so far: {screen[-300:]!r})")
            raise AssertionError(f"lbctl top: {what}: it ended instead; screen so far: {screen[-300:]!r}")

    try:
        await read_within(REDRAW.encode(), 2, f"two refreshes within {DEADLINE:g} s")
        assert screen.startswith(ENTER_SCREEN.encode()) and b"127.0.0.1:" in screen
        proc.send_signal(signal.SIGINT)
        # Read the terminal until lbctl gives the screen back, then wait for its exit: a pty
        # holds a few KiB, and a refresh written while nobody reads it, then the screen's
        # release, would block lbctl in write() for good.
        await read_within(LEAVE_SCREEN.encode(), 1, f"the screen given back within {DEADLINE:g} s of Ctrl-C")
        code = await trio.to_thread.run_sync(lambda: exit_code_or_stacks(proc, DEADLINE, "lbctl top after Ctrl-C"))
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        assert code == 0 and "Traceback" not in err, err
        assert screen.endswith(LEAVE_SCREEN.encode()), screen[-200:]
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_top_refuses_an_interval_below_the_minimum(certs: Certs) -> None:
    done = subprocess.run(_lbctl_args(certs, "127.0.0.1:1", "top", "--interval", "0.01"), capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and done.stderr == "lbctl: --interval: at least 0.2 seconds, got 0.01\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """The cluster CA, node n1's certificate and the admin client's (lbctl certs init)."""
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["n1"], {})
    return Certs(directory)


@pytest.fixture(autouse=True)
def _no_lbctl_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LBCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
