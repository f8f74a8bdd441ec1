"""Shared test helpers: real demo backends, real nodes (in process or as a subprocess), real clients."""

from __future__ import annotations

import gc
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import settings as hypothesis_settings

from lbnode.config import load_config_text
from lbnode.demo_backend import BackendStats, serve_demo_backend
from lbnode.node import Bound, LbNode

# The suite's property tests (hypothesis) run the same examples on every run: a test that can
# find a new counterexample on any run fails CI by chance, on a change that has nothing to do
# with it (the VIP placement test did). `make explore` runs them with fresh random examples,
# which is how new counterexamples are found (docs/fuzzing.md); the fuzz targets have their
# own settings (tests/fuzz/budget.py).
hypothesis_settings.register_profile("suite", derandomize=True)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile("explore" if os.environ.get("HYPOTHESIS_EXPLORE") else "suite")

REPO = Path(__file__).resolve().parent.parent

# Tests stop lbctl, lbnode and the demos with Ctrl-C (SIGINT) as a user would. A suite started
# with SIGINT ignored (a background job of a non-interactive shell: `cmd &` in a script) would
# pass that on to every child, since an ignored signal stays ignored across exec, and Python
# installs no KeyboardInterrupt handler for a signal ignored at its start: the children would
# never see the tests' Ctrl-C. With a handler here, children start with SIGINT at its default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_per_module() -> Iterator[None]:
    """A socket or pipe a test module forgets to close is reported at the end of that module.

    An unclosed file warns when the garbage collector finalises it (the suite turns that
    warning into an error), which otherwise happens in whichever later test the collector
    runs: a clean-clone run once failed test_probes_never_leak_sockets on 6 sockets and
    3 pipes that earlier modules had left behind."""
    yield
    gc.collect()


@dataclass
class DemoBackend:
    name: str
    port: int
    stats: BackendStats

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_backends(nursery: trio.Nursery, *names: str) -> list[DemoBackend]:
    out = []
    for name in names:
        stats = BackendStats()
        port = await nursery.start(lambda task_status, n=name, s=stats: serve_demo_backend(n, "127.0.0.1", 0, stats=s, task_status=task_status))
        out.append(DemoBackend(name, port, stats))
    return out


def pool_toml(name: str, addresses: list[str], **settings: object) -> str:
    """A [[pools]] table; nested tables can be given as pre-rendered strings under '_extra'."""
    extra = settings.pop("_extra", "")
    lines = ["[[pools]]", f'name = "{name}"']
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_value(value)}")
    lines.append(str(extra))
    for addr in addresses:
        lines += ["  [[pools.backends]]", f'  address = "{addr}"']
    return "\n".join(lines) + "\n"


def listener_toml(name: str, protocol: str, pool: str, bind: str = "127.0.0.1:0", extra: str = "", **settings: object) -> str:
    lines = ["[[listeners]]", f'name = "{name}"', f'protocol = "{protocol}"', f'bind = "{bind}"', f'pool = "{pool}"']
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n" + extra + "\n"


def node_toml(*sections: str, node_id: str = "t1", admin: str | None = "127.0.0.1:0", node_extra: str = "",
              workers: int | str | None = 1) -> str:
    """A node.toml: ``[node]`` with ``sections`` after it.

    ``workers`` is pinned to 1 unless a test asks otherwise: the default is "auto" (a supervisor
    and one worker per core), and the tests that start ``lbnode run`` from this text measure the
    node as one process (its pid, RSS, descriptors, one log). A test about workers passes its
    count; ``workers=None`` writes no ``workers`` key, so the default applies."""
    pin = "" if workers is None else f"workers = {_toml_value(workers)}\n"
    head = f'[node]\nid = "{node_id}"\n' + (f'admin = "{admin}"\n' if admin else "") + pin + node_extra + "\n"
    return head + "\n".join(sections)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


async def start_node(nursery: trio.Nursery, toml_text: str) -> tuple[LbNode, Bound]:
    node = LbNode(load_config_text(toml_text, "test.toml"))
    bound = await nursery.start(lambda task_status: node.run(handle_signals=False, task_status=task_status))
    return node, bound


async def http_get(url: str, **kwargs: object) -> httpx.Response:
    """One request with a real client (httpx, in a worker thread)."""

    def call() -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            return client.request(kwargs.pop("method", "GET"), url, **kwargs)  # type: ignore[arg-type]

    return await trio.to_thread.run_sync(call)


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes; read until the server closes (or the timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    chunks = []
    try:
        await stream.send_all(data)
        with trio.move_on_after(read_timeout):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not until_close:
                    break
    finally:
        await stream.aclose()
    return b"".join(chunks)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports for the tests' listeners come from below the kernel's ephemeral range. A port that
# bind(0) handed out and the test closed again sits in that range, where the kernel may give it
# to any outgoing connection (an etcd client, a health check) before the process the test
# starts binds it: "address already in use" (two CI runs lost a cluster fixture that way).
# Below the range only an explicit bind takes a port, and the ones here are handed out in turn,
# each checked free, so the same port comes back only after the whole span was used.
_PORT_HIGH = _ephemeral_low()
_PORT_LOW = 20000 if _PORT_HIGH > 21000 else 1024
_next_port = itertools.count(random.randrange(_PORT_HIGH - _PORT_LOW))


def nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking sockets (the unit tests of lbnode.sockio's waits)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (connecting to it is refused), outside the
    ephemeral range, not handed out before by this process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    span = _PORT_HIGH - _PORT_LOW
    for _ in range(span):
        port = _PORT_LOW + next(_next_port) % span
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (or in TIME_WAIT): the next one
            return port
    raise RuntimeError(f"no free port on {host} in {_PORT_LOW}-{_PORT_HIGH - 1}")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# For a child process a test may find hung: with it set, SIGABRT makes the child print every
# thread's Python stack to its stderr before it dies (``exit_code_or_stacks``).
FAULTHANDLER_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def exit_code_or_stacks(proc: subprocess.Popen[Any], timeout: float, what: str) -> int:
    """``proc.wait(timeout)``; past it, an AssertionError with where each of the child's threads
    stood (started with ``env=FAULTHANDLER_ENV`` and stderr to a pipe): a CI run that finds a
    child hung must say where it hung."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        text = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
        raise AssertionError(f"{what}: still running {timeout:g} s later; its threads:\n{text[-6000:]}") from None


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Start real processes (lbnode, demo backends) that are always killed afterwards."""
    procs: list[Proc] = []

    def _spawn(*args: str, name: str = "proc") -> Proc:
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        proc = Proc(popen, log_path)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(10)


@pytest.fixture
def etcd(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real one-member etcd on free loopback ports, killed afterwards."""
    # Imported here: etcd_helpers imports this module.
    from tests.integration.etcd_helpers import etcd_cluster, require_etcd

    require_etcd()
    with etcd_cluster(tmp_path, size=1) as cluster:
        yield cluster


@pytest.fixture
def etcd_tls(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real one-member etcd on loopback serving TLS only, client certificates required."""
    from tests.integration.etcd_helpers import etcd_cluster, require_etcd

    require_etcd()
    with etcd_cluster(tmp_path, size=1, tls=True) as cluster:
        yield cluster


def spawn_backend(spawn, name: str) -> int:  # type: ignore[no-untyped-def]
    """A demo backend as its own process (so a test can kill -9 it); returns its port."""
    port = free_port()
    spawn("-m", "lbnode.demo_backend", "--name", name, "--port", str(port), name=f"backend-{name}")
    wait_port(port)
    return port
