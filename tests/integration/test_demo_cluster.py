"""`lbnode demo --cluster` (what `make demo-cluster` runs) as a newcomer uses it: a real process
starting real etcd, three real ``lbnode run`` nodes and three demo backends; curl and the lbctl
commands it prints, run as printed; Ctrl-C; then nothing of it may be left.

As root with working namespaces: the namespace mode (a VIP that moves when its holder is killed).
Everywhere: the loopback mode, as root through ``--loopback`` and, as root, also as the user
``nobody`` (the path a non-root user takes, VIP-less); without root, as the user running the tests.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lbnode.cluster.heartbeat import DETECT_AFTER, HEARTBEAT_INTERVAL
from lbnode.demo_cluster import NODE_START, NODE_STOP, OTHER_STOP, READY, SERVICE_START
from lbnode.demo_lan import NS_PREFIX, delete_namespace, demo_namespaces, netns_unavailable
from tests.conftest import REPO
from tests.integration.etcd_helpers import require_etcd

BACKENDS = {"alpha", "beta", "gamma"}
# The demo's own start bounds (etcd, then the backends, then the nodes: it gives up after each),
# plus the namespaces and the certificates (about a second) with a margin.
STARTED_WITHIN = SERVICE_START * 2 + NODE_START + 5
# Ctrl-C: nodes get NODE_STOP, etcd and the backends OTHER_STOP, then the namespaces go (one
# `ip netns del` each: tens of milliseconds); 5 s for Python on 2 busy cores.
STOPPED_WITHIN = NODE_STOP + OTHER_STOP + 5
# kill -9 of the VIP holder (docs/vips.md, as tests/cluster/test_vip_failover.py bounds it): the
# two others revoke its lease DETECT_AFTER plus a report and a check after its last heartbeat;
# then a round, a campaign, the address and its gratuitous ARP: tens of milliseconds when idle,
# 1 s allowed for 2 busy cores; the probe's connect timeout (0.5 s) may hide the first answer.
PROBE_CONNECT_TIMEOUT = 0.5
VIP_BACK_WITHIN = DETECT_AFTER + 2 * HEARTBEAT_INTERVAL + 1.0 + PROBE_CONNECT_TIMEOUT


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            reading = self._reader.is_alive()  # before the look: a last line is seen after it ended
            for line in self.lines[start:]:
                if (match := re.search(pattern, line)) is not None:
                    return match
            assert reading, f"the demo exited ({self.proc.poll()}):\n{self.text}"
            assert time.monotonic() < deadline, f"no line matching {pattern!r} after {timeout}s:\n{self.text}"
            time.sleep(0.05)

    def usage(self) -> Usage:
        self.wait_line(READY, STARTED_WITHIN)
        self.wait_line(r"^Ctrl-C stops everything", 5)
        text = self.text
        nodes = {m[1]: (m[2], int(m[3])) for m in re.finditer(r"^  (n\d)  (\S+)  pid (\d+)  status page (\S+)", text, re.M)}
        port = re.search(r"^  # through node n1.*\n  curl http://[\d.]+(:\d+)?/$", text, re.M)
        lbctl = re.search(r"^  (.* --config \S+) nodes$", text, re.M)
        logs = re.search(r"^Logs and configuration: (\S+) ", text, re.M)
        vip = re.search(r"^  VIP  (\S+)  held by (\S+)$", text, re.M)
        assert port and lbctl and logs and len(nodes) == 3, text
        return Usage(nodes, port[1] or "", shlex.split(lbctl[1]), Path(logs[1]), vip[1] if vip else None)

    def interrupt_and_wait(self, *, twice: bool = False) -> None:
        """Ctrl-C (twice: again while it cleans up); it exits 0 within STOPPED_WITHIN."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        if twice:
            self.wait_line(r"^stopping the nodes", 5)
            self.proc.send_signal(signal.SIGINT)
        returncode = self.proc.wait(STOPPED_WITHIN)
        self._reader.join(5)
        took = time.monotonic() - started
        assert returncode == 0, self.text
        assert took <= STOPPED_WITHIN, f"stopped in {took:.1f}s"
        assert "demo stopped: everything it made is gone" in self.text
        assert "Traceback" not in self.text, self.text


@dataclass
class Usage:
    nodes: dict[str, tuple[str, int]]  # node -> (address, pid)
    port: str  # ":8080", or "" for 80
    lbctl: list[str]  # the printed lbctl command, up to its subcommand
    logs: Path  # the demo's temporary directory
    vip: str | None
    env: dict[str, str] = field(default_factory=dict)  # what the printed lbctl command needs (PYTHONPATH)


@pytest.fixture
def demo_runner(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    require_etcd()
    started: list[Demo] = []

    def run(*args: str, user: str | None = None, python: str = sys.executable, env: dict[str, str] | None = None,
            ) -> Demo:
        prefix = as_user(user) if user else []
        proc = subprocess.Popen([*prefix, python, "-m", "lbnode.cli", "demo", "--cluster", *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd="/" if user else tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        started.append(Demo(proc))
        return started[-1]

    yield run
    for demo in started:  # still running only after a failed test: Ctrl-C, else kill it
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGINT)
            try:
                demo.proc.wait(STOPPED_WITHIN)
            except subprocess.TimeoutExpired:
                demo.proc.kill()
                demo.proc.wait(10)
        left_behind(demo)  # nothing, unless a test failed (or killed the demo and failed after)
        demo._reader.join(5)
        for pipe in (demo.proc.stdin, demo.proc.stdout):
            if pipe is not None:
                pipe.close()


def as_user(user: str) -> list[str]:
    return ["setpriv", "--reuid", user, "--regid", "nogroup", "--clear-groups"]


def python_for(user: str) -> tuple[str, dict[str, str]]:
    """An interpreter ``user`` can run (and run again from it, as the demo does for its children) with
    this checkout importable: the tests' own, or else (a Python installed under /root, say) the
    system's of the same version with this venv's packages on PYTHONPATH. Skips if neither works."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [(sys.executable, {}),
                  (f"/usr/bin/{version}", {"PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"})]
    probe = "import subprocess, sys, lbnode.demo_cluster; subprocess.run([sys.executable, '-c', 'import lbnode.node'], check=True)"
    for python, env in candidates:
        done = subprocess.run([*as_user(user), "env", *(f"{k}={v}" for k, v in env.items()), python, "-c", probe],
                              capture_output=True, cwd="/", timeout=60)
        if done.returncode == 0:
            return python, env
    pytest.skip(f"user {user} can run no Python with this checkout importable")


def curl(url: str) -> str:
    done = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "5", url], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"curl {url}: exit {done.returncode}"
    return done.stdout.strip()


def answers(url: str, n: int = 6) -> set[str]:
    return {curl(url) for _ in range(n)}


def lbctl(usage: Usage, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBCTL_")} | usage.env
    done = subprocess.run([*usage.lbctl, *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"lbctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def listed_nodes(usage: Usage) -> list[str]:
    return sorted(line.split()[0] for line in lbctl(usage, "nodes").splitlines()[1:] if line.strip())


def nothing_left(demo: Demo, usage: Usage) -> None:
    """No process runs from the demo's directory (every child's cwd, and in its command line), the
    directory is gone, and so is every namespace and root link of this demo."""
    assert not usage.logs.exists()
    assert not running_from(usage.logs)
    for pid in (pid for _, pid in usage.nodes.values()):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    mine = f"{NS_PREFIX}{demo.proc.pid}"
    if os.geteuid() == 0:
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert mine not in namespaces
        assert subprocess.run(["ip", "link", "show", mine], capture_output=True).returncode != 0


def left_behind(demo: Demo) -> None:
    """Delete what a killed demo left: its children (by pid: their cwd is its directory), its
    namespaces, its directory."""
    directory = re.search(r"^starting .*; logs in (\S+)$", demo.text, re.M)
    if directory is None:
        return
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and inside(os.readlink(entry / "cwd"), Path(directory[1])):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue
    for name in demo_namespaces():
        if name.startswith(f"{NS_PREFIX}{demo.proc.pid}-"):
            delete_namespace(name)
    shutil.rmtree(directory[1], ignore_errors=True)


def heartbeats_settled(logs: Path, timeout: float = 20) -> None:
    """Every node's claimer hears both others (a kill right after the start would find them forming)."""
    deadline = time.monotonic() + timeout
    while True:
        last = {}
        for node in ("n1", "n2", "n3"):
            lines = [ln for ln in (logs / f"{node}.log").read_text(errors="replace").splitlines()
                     if "heartbeats confirmed by" in ln]
            last[node] = lines[-1] if lines else ""
        if all("(3 claimers)" in line for line in last.values()):
            return
        assert time.monotonic() < deadline, f"heartbeats never settled: {last}"
        time.sleep(0.1)


def vip_answers(vip: str) -> str | None:
    """One GET to the VIP: the backend's name, or None (no answer in time)."""
    try:
        with socket.create_connection((vip, 80), timeout=PROBE_CONNECT_TIMEOUT) as s:
            s.settimeout(2)
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    return data.rsplit(b"\r\n\r\n", 1)[-1].decode().strip()


def test_namespaces_a_vip_that_moves_when_its_holder_dies_and_ctrl_c_deletes_everything(demo_runner):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    demo = demo_runner()
    usage = demo.usage()
    assert usage.vip is not None and usage.port == ""
    assert "198.18." in usage.vip  # the benchmarking range, not a private one
    for node, (address, _) in usage.nodes.items():
        assert answers(f"http://{address}/") == BACKENDS, node
    assert answers(f"http://{usage.vip}/") == BACKENDS
    assert listed_nodes(usage) == ["n1", "n2", "n3"]

    heartbeats_settled(usage.logs)
    holder = lbctl(usage, "vips").splitlines()[1].split()[2]
    mark = len(demo.lines)
    killed_at = time.monotonic()
    os.kill(usage.nodes[holder][1], signal.SIGKILL)
    while True:  # the probe: a try every 50 ms until the VIP answers again
        tried_at = time.monotonic()
        if vip_answers(usage.vip) in BACKENDS:
            back = tried_at - killed_at
            break
        assert time.monotonic() - killed_at < 10, f"the VIP never answered again after {holder} died:\n{demo.text}"
        time.sleep(0.05)
    print(f"\nlbnode demo --cluster: the VIP answered again {back:.2f}s after its holder {holder} was killed")
    assert back <= VIP_BACK_WITHIN, f"the VIP answered again {back:.2f}s after {holder} died (bound {VIP_BACK_WITHIN:.2f}s)"
    # the demo says so: the holder's death, then where the VIP went
    demo.wait_line(rf"  {holder} exited \(killed by SIGKILL\)", 5, mark)
    moved = demo.wait_line(rf"  VIP {re.escape(usage.vip)}: on (n\d)", 5, mark)
    assert moved[1] != holder

    # 'start NODE' on the demo's stdin brings it back; it joins the cluster again
    assert demo.proc.stdin is not None
    demo.proc.stdin.write(f"start {holder}\n".encode())
    demo.proc.stdin.flush()
    demo.wait_line(rf"  {holder} started again: pid \d+", 5, mark)
    deadline = time.monotonic() + NODE_START
    while listed_nodes(usage) != ["n1", "n2", "n3"]:
        assert time.monotonic() < deadline, f"{holder} never rejoined:\n{lbctl(usage, 'nodes')}"
        time.sleep(0.5)

    demo.interrupt_and_wait()
    nothing_left(demo, usage)


@pytest.mark.parametrize("how", ["--loopback", "as nobody"])
def test_loopback_three_nodes_lbctl_and_ctrl_c_twice_still_cleans_up(demo_runner, how):
    env: dict[str, str] = {}
    if how == "--loopback":
        demo = demo_runner("--loopback")
    elif os.geteuid() != 0:
        demo = demo_runner()  # not root: the plain command is the non-root path
    else:
        python, env = python_for("nobody")
        demo = demo_runner(user="nobody", python=python, env=env)
    usage = demo.usage()
    usage.env = env
    assert usage.vip is None and usage.port == ":8080"
    assert "VIPs need root" in demo.text
    for node, (address, _) in usage.nodes.items():
        assert address.startswith("127.0.0."), node
        assert answers(f"http://{address}{usage.port}/") == BACKENDS, node
    assert listed_nodes(usage) == ["n1", "n2", "n3"]
    demo.interrupt_and_wait(twice=True)
    assert "still cleaning up" in demo.text
    nothing_left(demo, usage)


@pytest.mark.parametrize("mode", ["--loopback", "namespaces"])
def test_after_kill_9_no_process_is_left_and_the_next_demo_deletes_the_rest(demo_runner, mode):
    if mode == "namespaces" and (reason := netns_unavailable()) is not None:
        pytest.skip(reason)
    args = ["--loopback"] if mode == "--loopback" else []
    first = demo_runner(*args)
    usage = first.usage()
    first.proc.kill()
    first.proc.wait(10)
    # every child asked the kernel for SIGKILL when the demo dies (PR_SET_PDEATHSIG): at once;
    # 5 s for the kernel and init to finish them on 2 busy cores
    deadline = time.monotonic() + 5
    while running_from(usage.logs):
        assert time.monotonic() < deadline, f"still running after the demo was killed: {running_from(usage.logs)}"
        time.sleep(0.1)
    assert usage.logs.exists()
    mine = f"{NS_PREFIX}{first.proc.pid}-"
    if mode == "namespaces":
        assert any(name.startswith(mine) for name in demo_namespaces())

    second = demo_runner(*args)
    second.usage()
    assert f"deleted directory {usage.logs} of an earlier demo that did not clean up" in second.text
    assert not usage.logs.exists()
    if mode == "namespaces":
        assert f"deleted namespace {mine}lan of an earlier demo" in second.text
        assert not any(name.startswith(mine) for name in demo_namespaces())
    second.interrupt_and_wait()


def inside(cwd: str, directory: Path) -> bool:
    cwd = cwd.removesuffix(" (deleted)")
    return cwd == str(directory) or cwd.startswith(f"{directory}/")


def running_from(directory: Path) -> list[str]:
    """Processes whose working directory is ``directory`` (every child of a demo), or that name it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone, or a zombie
        if inside(cwd, directory) or str(directory) in cmdline:
            found.append(f"{entry.name}: {cmdline.replace(chr(0), ' ')}")
    return found


def test_a_node_that_cannot_start_ends_the_demo_with_its_log_and_nothing_left(demo_runner):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.12", 7070))  # n2's admin port
        except OSError:
            pytest.skip("127.0.0.12:7070 is in use on this machine")
        busy.listen()
        demo = demo_runner("--loopback")
        assert demo.proc.wait(STARTED_WITHIN + STOPPED_WITHIN) == 1
    demo._reader.join(5)
    assert READY not in demo.text
    directory = re.search(r"^starting .*; logs in (\S+)$", demo.text, re.M)
    assert directory is not None, demo.text
    assert re.search(r"lbnode demo --cluster: n2 exited \(exit status 1\); its log:", demo.text), demo.text
    assert "127.0.0.12:7070" in demo.text  # the node's own one-line reason, from its log
    assert "demo stopped: everything it made is gone" in demo.text
    assert not Path(directory[1]).exists()


def test_without_etcd_one_line_names_the_package(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lbnode.cli", "demo", "--cluster"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PATH=str(tmp_path)))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "lbnode demo --cluster: etcd is not installed: install the Debian package etcd-server (`make demo-cluster` does)"
    ]
