"""``lbnode run --takeover`` (binary upgrade) of a cluster member, in the namespace topology.

Three ``lbnode run`` nodes (tests/cluster/test_vip_failover.py's setup: an etcd member per node
host, heartbeats on, lease TTL 2 s, one VIP, cookie affinity), a client sending 200 requests/s
to the VIP with a sticky session. One node is replaced by ``lbnode run --takeover``: the new
process adopts the old one's sockets, lease, VIPs and heartbeat state. What the user sees:
no failed request and no refused connection, the VIP on exactly one host in every sample
(on the same host throughout: it does not move), the node's key in etcd throughout under the
same lease (``lbctl nodes`` lists it from there), the other nodes see nobody leave and revoke
nobody, the session keeps its backend, the old process exits 0, and a pool change made after
the takeover is served by the new process. Skipped unless root with working ``ip netns``.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnode.cluster.vips import FREE_GRACE, HANDOFF_LINGER
from tests.cluster.test_vip_failover import (  # noqa: F401 (fixtures)
    ANSWER_WINDOW,
    NODES,
    PYTHON,
    RATE,
    REPO,
    REVOKED_BY,
    TAKEN_WITHIN,
    VIP,
    LbNodes,
    Probe,
    _lbnodes,
    endpoints,
    lan,
    rate,
    session_start,
    wait_for,
)
from tests.cluster.topology import Lan

# How often the VIP's hosts and the node key are sampled (as the VIP tests sample holders).
SAMPLE = 0.05

# Prints "<monotonic> <lease hex or ->" for the node key every SAMPLE seconds, from a node host.
KEY_SAMPLER = """
import sys, time
from lbnode.cluster.etcd import EtcdConnection
conn = EtcdConnection(sys.argv[1].split(","))
key = sys.argv[2]
while True:
    try:
        kv = conn.get(key)
        print(f"{time.monotonic():.3f} {'%x' % kv.lease if kv is not None else '-'}", flush=True)
    except Exception as exc:
        print(f"{time.monotonic():.3f} error:{type(exc).__name__}", flush=True)
    time.sleep(float(sys.argv[3]))
"""

# Keeps only one backend in pool "web" (through the store, as lbctl does).
KEEP_ONE_BACKEND = """
import sys
from dataclasses import replace
from lbnode.config import load_config
from lbnode.cluster.etcd import EtcdStore
config = load_config(sys.argv[1])
store = EtcdStore(config.cluster)
record = store.get_pool("web")
pool = record.pool
store.update_pool(replace(pool, backends=tuple(b for b in pool.backends if b.name == sys.argv[2])), record.revision)
print("ok")
"""


# Backend names of this module's own (the logs tell them from the VIP tests' be1 and be2).
BACKENDS = {"tk1": 9000, "tk2": 9001}


@pytest.fixture
def lbnodes(lan: Lan, tmp_path: Path) -> Iterator[LbNodes]:  # noqa: F811
    yield from _lbnodes(lan, tmp_path, VIP, 24, BACKENDS)


def release_time(text: str, vip: str) -> float:
    """When the new process began handing ``vip`` over (wall clock, from its log line)."""
    line = next(line for line in text.splitlines() if f"VIP {vip} is not in this configuration" in line)
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def fence_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "dropping VIPs" in line or "not heard by a majority" in line]


def fences(logs: dict[str, Path], marks: dict[str, int]) -> list[str]:
    """Heartbeat or lease fences logged by any node since ``marks`` (log lengths)."""
    return [f"{n}: {line}" for n in NODES
            for line in fence_lines(logs[n].read_text(errors="replace")[marks[n]:])]


class Sampler:
    """A thread that notes which hosts have the VIP every SAMPLE seconds."""

    def __init__(self, net: Lan) -> None:
        self.lan = net
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), frozenset(self.lan.holders(VIP, NODES))))
            time.sleep(SAMPLE)

    def close(self) -> list[tuple[float, frozenset[str]]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def exit_code(proc: subprocess.Popen[bytes], timeout: float, what: str, *logs: Path) -> int | None:
    """``proc.wait(timeout)``; past it, an AssertionError with the tail of each log (a CI
    failure must say why the process did not exit, not only that it did not)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
        raise AssertionError(f"{what}: still running after {timeout:g} s\n{tails}") from None


def node_key_sampler(net: Lan, node: str) -> subprocess.Popen[bytes]:
    return net.spawn(node, [PYTHON, "-c", KEY_SAMPLER, ",".join(endpoints(node)), f"/lbnode/nodes/{node}", str(SAMPLE)],
                     stdout=subprocess.PIPE, cwd=REPO)


def answered_by(net: Lan, n: int) -> list[str]:
    """``n`` requests without a cookie from the client host: the backend of each answer."""
    out = []
    for _ in range(n):
        result = net.run("cli", ["curl", "-s", "-m", "2", "-D", "-", "-o", "/dev/null", f"http://{VIP}:8080/"])
        backend = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
                   if line.lower().startswith("x-backend:")]
        out.append(backend[0] if backend else f"no answer ({result.returncode})")
    return out


@pytest.mark.parametrize("which", ["holder", "non-holder"])
def test_lbnode_takeover_of_a_cluster_member_loses_no_request_and_moves_nothing(
    lan: Lan, lbnodes: LbNodes, which: str, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    # no SYN is dropped on this path (no VIP moves): a refused or unanswered connection fails
    # at once, or after the 1 s connect timeout (the kernel's first SYN retransmission)
    probe = Probe(lan, mode="sticky", interval=1 / RATE, connect_timeout=1.0)
    key_sampler: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    try:
        backend = session_start(probe)
        holder = steady(lbnodes)
        node = holder if which == "holder" else next(n for n in NODES if n != holder)
        others = [n for n in NODES if n != node]
        old = lbnodes.procs[node]
        logs = dict(lbnodes.logs)  # the old process's log for ``node``
        other_logs = {n: lbnodes.logs[n].read_text(errors="replace") for n in others}
        key_sampler = node_key_sampler(lan, node)
        sampler = Sampler(lan)
        marks = {n: len(lbnodes.logs[n].read_text(errors="replace")) for n in NODES}
        time.sleep(1.0)  # samples and requests before the takeover (judged from here on)
        started = time.monotonic()
        log = lbnodes.tmp / f"{node}-takeover.log"
        new = lan.spawn(node, [PYTHON, "-m", "lbnode.cli", "run", "--takeover", "--config", str(lbnodes.config(node))],
                        log_path=log, cwd=REPO)
        # the old process drains (drain_timeout 2 s) and exits 0
        assert exit_code(old, 15, f"the old process of {node}", logs[node], log) == 0, (
            f"the old process of {node} did not exit 0")
        exited = time.monotonic()
        lbnodes.procs[node], lbnodes.logs[node] = new, log
        time.sleep(2.0)  # requests and samples after the old process is gone
        time.sleep(ANSWER_WINDOW)
        until = time.monotonic() - ANSWER_WINDOW
        samples = sampler.close()
        key_sampler.kill()
        key_out, _ = key_sampler.communicate(timeout=5)
        text = log.read_text(errors="replace")
        assert new.poll() is None, f"the new process of {node} exited: {text[-2000:]}"
        assert "taken over from the process it replaces" in text, text[-3000:]

        # judged from the steady second before the takeover on (what came before was not steady)
        results = probe.since(started - 1.0, until)
        samples = [(t, h) for t, h in samples if t >= started - 1.0]
        failures = [r for r in results if not r[1]]
        slow = sum(1 for t, _, _ in results if probe.took[t] > 0.5)
        holders = {s for _, s in samples}
        keys = [line.split()[1] for line in key_out.decode().splitlines()
                if len(line.split()) == 2 and float(line.split()[0]) >= started - 1.0]
        summary = (f"takeover of {which} {node} at {RATE} req/s ({rate(results, started - 1.0, until)}): "
                   f"{len(results)} requests, {len(failures)} failed, {slow} over 0.5 s "
                   f"(longest {max(probe.took[t] for t, _, _ in results):.2f}s); old process exited "
                   f"{exited - started:.2f}s after the start; VIP hosts seen {sorted(map(sorted, holders))} in "
                   f"{len(samples)} samples; node key leases seen {sorted(set(keys))} in {len(keys)} samples")
        fenced = fences(logs, marks) + [f"{node} (new process): {line}" for line in fence_lines(text)]
        if fenced:
            summary += "; fences: " + " | ".join(fenced)
        with capsys.disabled():
            print("\n" + summary)
        assert not failures, f"{summary}: {failures[:5]}"
        assert holders == {frozenset({holder})}, f"the VIP was not on {holder} alone in every sample: {summary}"
        assert len(keys) >= 20 and len(set(keys)) == 1 and keys[0] not in ("-",) and not keys[0].startswith("error"), (
            f"node {node}'s key was not there under one lease throughout: {summary}")
        assert {what for _, ok, what in probe.since(0) if ok} == {backend}, "the session changed its backend"
        for n in others:
            seen = lbnodes.logs[n].read_text(errors="replace")[len(other_logs[n]):]
            assert f"node {node} left the cluster" not in seen, f"{n} saw {node} leave: {seen[-2000:]}"
            assert "revoking its lease" not in seen, f"{n} revoked a lease: {seen[-2000:]}"
            assert f"VIP {VIP}:" not in seen, f"{n} saw the VIP move: {seen[-2000:]}"
    finally:
        probe.close()
        if sampler is not None:
            sampler.close()
        if key_sampler is not None and key_sampler.poll() is None:
            key_sampler.kill()
            key_sampler.wait(5)

    # pools changed after the takeover are followed by the new process (the VIP's holder
    # answers every request: after a holder's takeover, that is the new process)
    keep = "tk1"
    applied = log.read_text(errors="replace").count("configuration version")
    result = lan.run(node, [PYTHON, "-c", KEEP_ONE_BACKEND, str(lbnodes.config(node)), keep], timeout=20)
    assert result.stdout.strip() == "ok", result.stderr
    wait_for(lambda: set(answered_by(lan, 4)) == {keep}, 10, "the pool change was not followed")
    assert set(answered_by(lan, 10)) == {keep}
    # the new process (holder or not) applied it too
    wait_for(lambda: log.read_text(errors="replace").count("configuration version") > applied, 5,
             f"the new process of {node} did not apply the pool change")
    if which == "holder":
        # a second upgrade of the same node: the lease, the VIP and the first process's guard go
        # on to a third process (its Trio clock is still the first one's)
        log3 = lbnodes.tmp / f"{node}-takeover-2.log"
        third = lan.spawn(node, [PYTHON, "-m", "lbnode.cli", "run", "--takeover", "--config",
                                 str(lbnodes.config(node))], log_path=log3, cwd=REPO)
        assert exit_code(new, 15, "the second process after the second takeover", log, log3) == 0, (
            "the second process did not exit 0 after the second takeover")
        lbnodes.procs[node], lbnodes.logs[node] = third, log3
        assert "taken over from the process it replaces" in log3.read_text(errors="replace")
        assert lbnodes.holders() == {node} and lan.holders(VIP, NODES) == {node}
        # the VIP guard went over with the VIPs: the third process killed with kill -9, the
        # guard (started by the first process, its pipe now held by the third) takes the
        # address off, and another node takes the VIP
        third.kill()
        third.wait(5)
        wait_for(lambda: VIP not in lan.addresses(node), 1.0, f"the killed process's VIP is still on {node}")
        wait_for(lambda: len(lbnodes.holders()) == 1 and node not in lbnodes.holders(), 10,
                 "no other node took the VIP after the new process died")


CONTROL = 7001  # the control API of each node, on its loopback (lbctl's port in these tests)


class ControlNodes(LbNodes):
    """``lbnodes`` with a control API on each node ([control]: a takeover first asks the old
    process to stop its own, then binds the port again)."""

    def config(self, node: str) -> Path:
        path = super().config(node)
        path.write_text(path.read_text() + f'\n[control]\nbind = "127.0.0.1:{CONTROL}"\ninsecure = true\n')
        return path


@pytest.fixture
def control_nodes(lan: Lan, tmp_path: Path) -> Iterator[LbNodes]:  # noqa: F811
    """As ``_lbnodes``, each node with [control]."""
    yield from _lbnodes(lan, tmp_path, VIP, 24, BACKENDS, kind=ControlNodes)


def steady(lbnodes: LbNodes) -> str:
    """Wait for one second with no fence anywhere and the VIP on one host; that host."""
    for _ in range(10):
        # on 2 cores shared with other test runs (load 10-30), a holder may fence for a moment
        # (a late heartbeat, an etcd call that times out; docs/vips.md) with no takeover near
        lbnodes.settled()
        holder = lbnodes.holder()
        marks = {n: len(lbnodes.logs[n].read_text(errors="replace")) for n in NODES}
        time.sleep(1.0)
        if not fences(lbnodes.logs, marks) and lbnodes.holders() == {holder}:
            return holder
    pytest.fail(f"the cluster never held steady for a second: {fences(lbnodes.logs, marks)}")


def test_a_takeover_of_the_holder_that_fails_after_the_handover_gives_the_vip_back(
    lan: Lan, control_nodes: LbNodes, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    """The new process adopted the holder's lease and VIP, then could not bind its control port:
    it hands them back as it exits, the old process takes them again and goes on. Nothing
    moves, no request fails, and the node keeps its lease."""
    lbnodes = control_nodes
    probe = Probe(lan, mode="sticky", interval=1 / RATE, connect_timeout=1.0)
    key_sampler: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    busy = 7002
    # the port the new process's control API cannot bind, on every node host (whichever holds)
    blockers = [lan.spawn(n, [PYTHON, "-c", "import socket, time; s = socket.socket(); "
                              f"s.bind(('127.0.0.1', {busy})); s.listen(); time.sleep(600)"]) for n in NODES]
    try:
        session_start(probe)
        node = steady(lbnodes)
        others = [n for n in NODES if n != node]
        old = lbnodes.procs[node]
        other_logs = {n: lbnodes.logs[n].read_text(errors="replace") for n in others}
        key_sampler = node_key_sampler(lan, node)
        sampler = Sampler(lan)
        time.sleep(1.0)
        started = time.monotonic()
        bad = lbnodes.tmp / f"{node}-bad.toml"
        bad.write_text(lbnodes.config(node).read_text().replace(f"127.0.0.1:{CONTROL}", f"127.0.0.1:{busy}"))
        log = lbnodes.tmp / f"{node}-failed-takeover.log"
        new = lan.spawn(node, [PYTHON, "-m", "lbnode.cli", "run", "--takeover", "--config", str(bad)],
                        log_path=log, cwd=REPO)
        assert new.wait(30) != 0
        text = log.read_text(errors="replace")
        assert f"control.bind: cannot listen on 127.0.0.1:{busy}" in text, text[-3000:]
        wait_for(lambda: "taking it back" in lbnodes.logs[node].read_text(errors="replace"), 5, "the old node's note")
        time.sleep(3.0)  # beyond the lease TTL (2 s): the old process keeps it alive again
        assert old.poll() is None
        time.sleep(ANSWER_WINDOW)
        until = time.monotonic() - ANSWER_WINDOW
        samples = sampler.close()
        key_sampler.kill()
        key_out, _ = key_sampler.communicate(timeout=5)
        results = probe.since(started - 1.0, until)
        failures = [r for r in results if not r[1]]
        holders = {s for _, s in samples}
        keys = [line.split()[1] for line in key_out.decode().splitlines() if len(line.split()) == 2]
        summary = (f"failed takeover of holder {node}: {len(results)} requests, {len(failures)} failed; VIP hosts "
                   f"seen {sorted(map(sorted, holders))}; node key leases seen {sorted(set(keys))}")
        with capsys.disabled():
            print("\n" + summary)
        assert not failures, f"{summary}: {failures[:5]}"
        assert holders == {frozenset({node})}, summary
        assert len(keys) >= 20 and len(set(keys)) == 1 and keys[0] != "-", summary
        for n in others:
            seen = lbnodes.logs[n].read_text(errors="replace")[len(other_logs[n]):]
            assert f"node {node} left the cluster" not in seen and "revoking its lease" not in seen, seen[-2000:]
            assert f"VIP {VIP}:" not in seen, f"{n} saw the VIP move: {seen[-2000:]}"
    finally:
        for blocker in blockers:
            blocker.kill()
        probe.close()
        if sampler is not None:
            sampler.close()
        if key_sampler is not None and key_sampler.poll() is None:
            key_sampler.kill()
            key_sampler.wait(5)


def test_a_takeover_whose_old_process_dies_before_release_cluster_fails_cleanly(
    lan: Lan, lbnodes: LbNodes, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    """The old holder is killed (kill -9) after it handed its sockets and before it answered
    "release-cluster": the new process was stopped with SIGSTOP in that window (it prepares
    netlink and the VIP guard first, tens to hundreds of milliseconds). The new process then
    gets no answer: it says so in one line and exits 1 without registering afresh or claiming
    (docs/reload.md). Its copy of the old guard's pipe closes with it, so the address leaves
    the host, and another node takes the VIP once the dead process's lease is revoked. The VIP
    is never on two hosts in any 50 ms sample."""
    sampler: Sampler | None = None
    try:
        node = steady(lbnodes)
        old, old_log = lbnodes.procs[node], lbnodes.logs[node]
        mark = len(old_log.read_text(errors="replace"))
        sampler = Sampler(lan)
        log = lbnodes.tmp / f"{node}-orphaned-takeover.log"
        config = lbnodes.config(node)
        new = lan.spawn(node, [PYTHON, "-m", "lbnode.cli", "run", "--takeover", "--config", str(config)],
                        log_path=log, cwd=REPO)
        lbnodes.procs[node], lbnodes.logs[node] = new, log  # killed at teardown if it does not exit
        deadline = time.monotonic() + 30
        while "sockets handed to a new process" not in old_log.read_text(errors="replace")[mark:]:
            assert time.monotonic() < deadline and new.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.005)
        new.send_signal(signal.SIGSTOP)
        try:
            assert "heartbeats handed to the new process" not in old_log.read_text(errors="replace")[mark:], (
                "release-cluster was answered before SIGSTOP: the case is not tested")
            old.kill()
            old.wait(5)
            killed = time.monotonic()
        finally:
            new.send_signal(signal.SIGCONT)
        code = exit_code(new, 30, f"the new process of {node}", log)
        text = log.read_text(errors="replace")
        assert code == 1, text[-3000:]
        assert text.strip().splitlines()[-1].startswith(
            f"lbnode: {config}: the running node did not hand over its cluster membership: the running lbnode "), (
            text[-3000:])
        assert "registered in etcd" not in text and "as the process it replaces did" not in text, text[-3000:]
        # the guard takes the address off when its last pipe (the new process's copy) closes
        wait_for(lambda: VIP not in lan.addresses(node), 1.0, f"the VIP is still on {node} after both processes died")
        # the others revoke the dead lease after DETECT_AFTER without heartbeats, then one claims
        wait_for(lambda: len(lbnodes.holders()) == 1 and node not in lbnodes.holders(), REVOKED_BY + TAKEN_WITHIN + 2,
                 "no other node took the VIP")
        taken = time.monotonic()
        time.sleep(1.0)
        samples = sampler.close()
        two = [(round(t - killed, 2), sorted(h)) for t, h in samples if len(h) > 1]
        summary = (f"old holder {node} killed before release-cluster: the new process exited {code}, "
                   f"{sorted(lbnodes.holders())[0]} took the VIP {taken - killed:.2f}s after the kill; "
                   f"{len(samples)} samples, {len(two)} with two hosts")
        with capsys.disabled():
            print("\n" + summary)
        assert not two, f"the VIP was on two hosts: {two[:5]}; {summary}"
        answers = answered_by(lan, 5)
        assert all(not a.startswith("no answer") for a in answers), answers
    finally:
        if sampler is not None:
            sampler.close()


VIP2, VIP3 = "10.77.0.101", "10.77.0.102"  # inside the test's namespaces only (tests/cluster/topology.py)


class TwoVipNodes(LbNodes):
    """``lbnodes`` with two VIPs on every node (VIP and VIP2): each is held by one node."""

    def config(self, node: str) -> Path:
        path = super().config(node)
        one = f'[[cluster.vips]]\naddress = "{self.vip}/{self.prefixlen}"\n'
        text = path.read_text()
        assert one in text
        path.write_text(text.replace(one, one + f'\n[[cluster.vips]]\naddress = "{VIP2}/{self.prefixlen}"\n'))
        return path


@pytest.fixture
def two_vip_nodes(lan: Lan, tmp_path: Path) -> Iterator[LbNodes]:  # noqa: F811
    try:
        yield from _lbnodes(lan, tmp_path, VIP, 24, BACKENDS, kind=TwoVipNodes)
    finally:
        for n in NODES:
            for vip in (VIP2, VIP3):
                lan.run(n, ["ip", "addr", "del", f"{vip}/24", "dev", "eth0"])


def test_a_takeover_that_drops_a_held_vip_and_adds_one_hands_it_over_and_claims_the_new_one(
    lan: Lan, two_vip_nodes: LbNodes, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    """Two VIPs on three nodes; the holder of one of them is taken over with a node.toml that
    drops the VIP it holds and adds a third (configured on no other node). The dropped VIP goes
    to another node make-before-break (in every 50 ms sample some host has it; requests to it
    do not fail), the added one is claimed by the new process, the kept one stays where it is.
    The new process's claimer key says which VIPs it takes before it releases the dropped one,
    so the others deal it among themselves at once, all to the same node: it is taken within a
    watch round trip of its release (not after FREE_GRACE), and it changes hands exactly once
    (on the hosts sampled, and in etcd as every other node saw it)."""
    lbnodes = two_vip_nodes
    wait_for(lambda: all(len(lan.holders(v, NODES)) == 1 for v in (VIP, VIP2)), 20, "the two VIPs never settled")
    time.sleep(1.0)
    (node,) = lan.holders(VIP2, NODES)
    (kept_on,) = lan.holders(VIP, NODES)
    # a client's patience, as for a drain (test_vip_failover.planned_drains): the SYNs dropped while
    # the VIP is handed off are sent again 1 s later, to the new holder
    probe = Probe(lan, mode="sticky", interval=1 / RATE, connect_timeout=3.0, vip=VIP2)
    samples: list[tuple[float, frozenset[str], frozenset[str], frozenset[str]]] = []
    walls: list[float] = []  # each sample's wall-clock time, to compare with the node's log
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            wall, now = time.time(), time.monotonic()
            held = [frozenset(lan.holders(v, NODES)) for v in (VIP, VIP2, VIP3)]
            walls.append(wall)
            samples.append((now, held[0], held[1], held[2]))
            time.sleep(SAMPLE)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        session_start(probe)
        sampler.start()
        time.sleep(1.0)
        started, started_wall = time.monotonic(), time.time()
        marks = {n: len(lbnodes.logs[n].read_text(errors="replace")) for n in NODES}
        old = lbnodes.procs[node]
        config = lbnodes.tmp / f"{node}-new.toml"
        config.write_text(lbnodes.config(node).read_text().replace(
            f'address = "{VIP2}/24"', f'address = "{VIP3}/24"'))
        log = lbnodes.tmp / f"{node}-vipset-takeover.log"
        new = lan.spawn(node, [PYTHON, "-m", "lbnode.cli", "run", "--takeover", "--config", str(config)],
                        log_path=log, cwd=REPO)
        assert exit_code(old, 15, f"the old process of {node}", lbnodes.logs[node], log) == 0
        lbnodes.procs[node], lbnodes.logs[node] = new, log
        # the dropped VIP: released make-before-break (HANDOFF_TIMEOUT 2 s at most) to another node;
        # the added one: a round and a campaign of the new process (its claimer runs at once)
        wait_for(lambda: len(lan.holders(VIP2, NODES)) == 1 and node not in lan.holders(VIP2, NODES), 10,
                 f"the dropped VIP {VIP2} did not move off {node}: {log.read_text(errors='replace')[-2000:]}")
        wait_for(lambda: lan.holders(VIP3, NODES) == {node}, 10,
                 f"the added VIP {VIP3} was not claimed by {node}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(1.0 + ANSWER_WINDOW)
        until = time.monotonic() - ANSWER_WINDOW
        stop.set()
        sampler.join(5)
        assert new.poll() is None, log.read_text(errors="replace")[-3000:]
        results = probe.since(started - 1.0, until)
        failures = [r for r in results if not r[1]]
        judged = [(w, *s) for w, s in zip(walls, samples, strict=True) if s[0] >= started - 1.0]
        nobody = [round(t - started, 2) for _, t, _, v2, _ in judged if not v2]
        kept = {v1 for _, _, v1, _, _ in judged}
        slow = [t - started for t, _, _ in results if probe.took[t] > 0.5]
        (taker,) = lan.holders(VIP2, NODES)
        # the dropped VIP's hosts, sample after sample, runs merged: one move is {node}, maybe
        # {node, taker} for the HANDOFF_LINGER overlap, then {taker}
        sequence: list[frozenset[str]] = []
        for _, _, _, v2, _ in judged:
            if not sequence or sequence[-1] != v2:
                sequence.append(v2)
        released = release_time(log.read_text(errors="replace"), VIP2)
        taken = next(w for w, _, _, v2, _ in judged if v2 - {node})  # first sample with another host
        moved = next(w for w, _, _, v2, _ in judged if node not in v2)  # first sample without this one
        # how every other node saw it in etcd: "VIP <vip>: <before> -> <after>" (its on_moved log)
        moved_line = f"lbnode.cluster.vips: VIP {VIP2}: "
        seen = {n: [line.split(moved_line, 1)[1] for line in
                    lbnodes.logs[n].read_text(errors="replace")[marks[n]:].splitlines() if moved_line in line]
                for n in NODES if n != node}
        summary = (f"takeover of {node} dropping {VIP2}, adding {VIP3}: {len(results)} requests to {VIP2}, "
                   f"{len(failures)} failed, {len(slow)} over 0.5 s"
                   + (f" (sent {min(slow):.2f}-{max(slow):.2f}s after the start)" if slow else "")
                   + f"; {VIP2} released {released - started_wall:.2f}s after the start, "
                   f"on another host {taken - released:.2f}s after its release, off {node} {moved - released:.2f}s after "
                   f"(now on {taker}); "
                   f"hosts {' -> '.join(','.join(sorted(h)) or '(none)' for h in sequence)}; in etcd as seen by "
                   f"{seen}; on no host in {len(nobody)} of {len(judged)} samples; {VIP} on {sorted(map(sorted, kept))}")
        if failures:
            summary += (f"; failures from {failures[0][0] - started:.2f}s to {failures[-1][0] - started:.2f}s "
                        f"after the start: {sorted({r[2] for r in failures})}")
        with capsys.disabled():
            print("\n" + summary)
        assert not nobody, f"{VIP2} was on no host at {nobody[:5]}: {summary}"
        assert kept == {frozenset({kept_on})}, summary
        assert not failures, f"{summary}: {failures[:5]}"
        # exactly one move, straight to the node the others dealt it to
        assert sequence in ([{node}, {node, taker}, {taker}], [{node}, {taker}]), f"not one move: {summary}"
        # every other node saw it move once: through "(free)", or straight across when one read of
        # its watch brought the release and the claim together (tests/cluster/test_vip_claimer.py)
        assert all(s in ([f"{node} -> (free)", f"(free) -> {taker}"], [f"{node} -> {taker}"])
                   for s in seen.values()), summary
        # taken within a watch round trip of its release: our claimer key and the key's deletion
        # (two etcd writes), the others' watch event, a round (one read), a claim (one write), the
        # address: tens of milliseconds when idle; FREE_GRACE / 2 leaves room for 2 busy cores and
        # is below the FREE_GRACE that the others waited before (the taker came 1.05 s after the
        # release). Off this host HANDOFF_LINGER after that, as in a drain (plus a sample).
        assert taken - released < FREE_GRACE / 2, summary
        assert moved - released < FREE_GRACE / 2 + HANDOFF_LINGER + 2 * SAMPLE, summary
    finally:
        stop.set()
        probe.close()
