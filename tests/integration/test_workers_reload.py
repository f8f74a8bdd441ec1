"""Reload and binary upgrade of a node with ``[node] workers = 2`` (issue 13), under load.

The single-process tests (test_reload.py) again, on a supervisor and two worker processes:
an ``lbnode run`` with two demo backends, the same clients (bench/reloadload.py: keep-alive
connections, a fresh connection per request, a TCP listener, the admin /healthz) running in
threads while node.toml changes and ``lbnode reload`` or SIGHUP applies it, or a second
``lbnode run --takeover`` (with workers too) takes every socket over. Each asserts zero
refused connections, zero failed requests, and that the new configuration is what answers,
on both workers (which worker accepted a connection is read from /proc).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, listener_toml, node_toml, pool_toml, wait_port
from tests.integration.test_node_process import Spawn, wait_log, wait_until
from tests.integration.test_reload import (
    Site,
    assert_seamless,
    backend_of,
    lbnode,
    refused,
    under_load,
)
from tests.integration.test_workers import accepted_by

# A reload answers once both workers applied it; a worker replaced after kill -9 serves
# within 1 s with the spare ready (test_workers.py). 10 s covers a spare still starting
# (its interpreter start is 1.1-1.7 s on 2 busy cores) several times over.
REPLACED_WITHIN = 10.0


class WorkersSite(Site):
    """test_reload's site with ``workers = 2`` and its own state_dir."""

    def write(self, listeners: list[tuple[str, str, int, str]], node_id: str = "t1", workers: int = 2) -> None:
        self.config.write_text(node_toml(
            pool_toml("pa", [f"127.0.0.1:{self.a}"]),
            pool_toml("pb", [f"127.0.0.1:{self.b}"]),
            *(listener_toml(name, proto, pool, bind=f"127.0.0.1:{port}") for name, proto, port, pool in listeners),
            admin=f"127.0.0.1:{self.admin}", node_id=node_id,
            workers=workers, node_extra=f'drain_timeout = "5s"\nstate_dir = "{self.tmp_path / "state"}"\n',
        ))

    def start(self, spawn: Spawn, *extra: str) -> subprocess.Popen[bytes]:
        proc = spawn("-m", "lbnode.cli", "run", "--config", str(self.config), *extra, name="node")
        wait_log(proc, r"2 workers serving", timeout=30)
        wait_port(self.web)
        return proc.popen

    def status(self) -> dict[str, Any]:
        r = httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5)
        r.raise_for_status()
        return r.json()

    def worker_pids(self) -> list[int]:
        workers = self.status()["workers"]
        assert len(workers) == 2 and all(w["serving"] for w in workers), workers
        return [int(w["pid"]) for w in workers]

    def worker_pids_or_empty(self) -> list[int]:
        """The workers' pids once both serve (empty while one is being replaced)."""
        workers = self.status()["workers"]
        return [int(w["pid"]) for w in workers] if all(w["serving"] for w in workers) else []


def replaced(site: WorkersSite, victim: int) -> bool:
    """Both workers serve again and ``victim`` is not one of them (while a slot is being
    refilled ``worker_pids_or_empty`` is empty, which must not count as replaced)."""
    pids = site.worker_pids_or_empty()
    return bool(pids) and victim not in pids


def served_by_each(port: int, pids: list[int], expected: str, attempts: int = 200) -> None:
    """Fresh connections to ``port`` until each worker in ``pids`` has accepted one; every
    answer is ``expected`` (the backend's name)."""
    seen: set[int] = set()
    for _ in range(attempts):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            client_port = s.getsockname()[1]
            seen |= {pid for pid in pids if client_port in accepted_by(pid, port)}
        assert data.startswith(b"HTTP/1.1 200 ") and data.rpartition(b"\r\n\r\n")[2].decode().strip() == expected, data
        if seen == set(pids):
            return
    raise AssertionError(f"workers {sorted(set(pids) - seen)} accepted none of {attempts} connections on {port}")


def test_reload_with_workers_changes_a_pool_under_load(spawn: Spawn, tmp_path: Path) -> None:
    site = WorkersSite(spawn, tmp_path)
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    site.start(spawn)
    pids = site.worker_pids()

    def change() -> None:
        site.config.write_text(site.config.read_text().replace(f"127.0.0.1:{site.a}", f"127.0.0.1:{site.b}"))
        done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("reloaded: listeners unchanged; 2 pools; 2 workers"), done.stdout

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "workers = 2: reload changing a pool's backends")
    assert site.worker_pids() == pids  # the same processes: a reload restarts nothing
    served_by_each(site.web, pids, "b")
    assert backend_of(site.tcp) == "b"


def test_reload_with_workers_adds_changes_and_removes_listeners_under_load(spawn: Spawn, tmp_path: Path) -> None:
    site = WorkersSite(spawn, tmp_path)
    old, extra = free_port(), free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("old", "http", old, "pa")])
    node = site.start(spawn)
    pids = site.worker_pids()
    # A request in flight on the listener the reload removes: it must be answered.
    slow: dict[str, object] = {}
    slow_thread = threading.Thread(
        target=lambda: slow.update(r=httpx.get(f"http://127.0.0.1:{old}/slow?ms=1500", timeout=10)), daemon=True)

    def change() -> None:
        slow_thread.start()
        time.sleep(0.3)  # the slow request is in flight
        site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pb"), ("extra", "http", extra, "pb")])
        done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "added extra" in done.stdout and "changed web, tcp" in done.stdout and "removed old" in done.stdout

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "workers = 2: reload (listener added, two changed, one removed)")
    slow_thread.join(10)
    response = slow["r"]
    assert isinstance(response, httpx.Response) and response.status_code == 200 and response.text == "a\n"
    # Both workers serve the added listener and the changed ones' new settings.
    served_by_each(extra, pids, "b")
    served_by_each(site.web, pids, "b")
    assert backend_of(site.tcp) == "b"
    assert refused(old)  # every copy of its socket closed: the supervisor's and both workers'
    assert set(site.status()["listeners"]) >= {"web", "tcp", "extra"}
    assert "old" not in site.status()["listeners"]
    assert node.poll() is None and site.worker_pids() == pids


def test_reload_with_workers_refuses_an_invalid_file_then_takes_a_sighup(spawn: Spawn, tmp_path: Path) -> None:
    site = WorkersSite(spawn, tmp_path)
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    node = site.start(spawn)
    log = tmp_path / "node-2.log"
    good = site.config.read_text()
    pids = site.worker_pids()

    def change() -> None:
        site.config.write_text(good + "\n[[listeners]]\nname = 'broken'\n")  # no protocol, bind, pool
        done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lbnode: reload refused: ") and "listeners[2]" in lines[0]
        node.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused, serving the previous configuration" in log.read_text(), 10,
                   "the SIGHUP's refusal logged")
        site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa")])
        node.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: listeners changed web" in log.read_text(), 10, "the SIGHUP's reload logged")

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "workers = 2: invalid file refused, then a reload by SIGHUP")
    served_by_each(site.web, pids, "b")
    assert backend_of(site.tcp) == "a"
    # A SIGHUP to the whole process group (`kill -HUP -PGID`, a terminal's hang-up) reaches the
    # workers too: they ignore it (the supervisor reloads; its default action would kill them).
    os.kill(pids[0], signal.SIGHUP)
    time.sleep(0.5)  # a worker killed by it would be seen (and replaced) by then
    assert site.worker_pids() == pids and site.status()["workers"][0]["restarts"] == 0


def test_a_worker_killed_after_a_reload_comes_back_on_the_new_listeners(spawn: Spawn, tmp_path: Path) -> None:
    """kill -9 of a worker after a reload: its replacement (the spare) gets the sockets and the
    configuration as they are now, not as they were at the node's start."""
    site = WorkersSite(spawn, tmp_path)
    old, extra = free_port(), free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("old", "http", old, "pa")])
    site.start(spawn)
    site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa"), ("extra", "http", extra, "pa")])
    done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
    assert done.returncode == 0 and "added extra" in done.stdout and "removed old" in done.stdout, done
    # The file changes again without a reload: a restarted worker must not read it.
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("old", "http", old, "pa")])
    wait_until(lambda: site.status()["spare_worker"] == "ready", 30, "the spare worker ready")
    pids = site.worker_pids()
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: replaced(site, victim), REPLACED_WITHIN, "the worker replaced")
    now = site.worker_pids()
    assert victim not in now and pids[1] in now
    served_by_each(extra, now, "a")  # the new listener, on the replacement too
    served_by_each(site.web, now, "b")  # the reloaded settings, not the file's later edit
    assert refused(old)


def test_takeover_with_workers_under_load(spawn: Spawn, tmp_path: Path) -> None:
    """``lbnode run --takeover`` of a supervisor by a new supervisor: every listening socket
    (and the admin socket) handed over, the new workers serve them, then the old supervisor
    drains its workers and exits 0; the new process answers `lbnode reload`."""
    site = WorkersSite(spawn, tmp_path)
    gone, added = free_port(), free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("gone", "http", gone, "pa")])
    old = site.start(spawn)
    old_pids = site.worker_pids()
    new_log = tmp_path / "node-3.log"
    new: list[subprocess.Popen[bytes]] = []

    def change() -> None:
        site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa"), ("added", "http", added, "pa")])
        new.append(spawn("-m", "lbnode.cli", "run", "--config", str(site.config), "--takeover", name="node").popen)
        assert old.wait(60) == 0  # drained its workers and exited on its own
        text = new_log.read_text()
        assert "takeover: serving the sockets of lbnode pid" in text and "2 workers serving" in text

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "workers = 2: binary upgrade (lbnode run --takeover)")
    assert new[0].poll() is None
    for pid in old_pids:  # the old workers are gone with their supervisor
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    new_pids = site.worker_pids()
    assert not set(new_pids) & set(old_pids)
    served_by_each(site.web, new_pids, "b")
    served_by_each(added, new_pids, "a")
    assert backend_of(site.tcp) == "a"
    assert refused(gone)  # the old process closed it when it exited
    done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("reloaded: listeners unchanged"), done


def test_reload_cannot_change_the_number_of_workers(spawn: Spawn, tmp_path: Path) -> None:
    """The process layout is chosen at start: a reload to other workers is refused in one line
    naming node.workers (--takeover applies it), and the node serves on."""
    site = WorkersSite(spawn, tmp_path)
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    site.start(spawn)
    site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa")], workers=3)
    done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("lbnode: reload refused: node.workers changed: a running node cannot take")
    assert backend_of(site.web) == "a" and len(site.worker_pids()) == 2


def test_takeover_changes_a_single_process_node_to_two_workers_and_back(spawn: Spawn, tmp_path: Path) -> None:
    """What a reload refuses, --takeover applies: a single process (workers = 1) handed over
    to a supervisor with two workers under load, then that supervisor to a single process
    again; each time the old node exits 0, nothing is refused and nothing fails."""
    site = WorkersSite(spawn, tmp_path)
    listeners = [("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")]
    site.write(listeners, workers=1)
    old = spawn("-m", "lbnode.cli", "run", "--config", str(site.config), name="node")
    wait_log(old, r"listener web: http on ")
    wait_port(site.web)
    procs: list[subprocess.Popen[bytes]] = [old.popen]

    def hand_over(workers: int, pool: str) -> None:
        site.write([("web", "http", site.web, pool), ("tcp", "tcp", site.tcp, pool)], workers=workers)
        procs.append(spawn("-m", "lbnode.cli", "run", "--config", str(site.config), "--takeover", name="node").popen)
        assert procs[-2].wait(60) == 0

    load, t0, t1 = under_load(site, lambda: hand_over(2, "pb"))
    assert_seamless(load, t0, t1, "takeover: one process -> workers = 2")
    pids = site.worker_pids()
    served_by_each(site.web, pids, "b")
    load, t0, t1 = under_load(site, lambda: hand_over(1, "pa"))
    assert_seamless(load, t0, t1, "takeover: workers = 2 -> one process")
    assert "workers" not in site.status() and backend_of(site.web) == "a" and backend_of(site.tcp) == "a"
    assert procs[-1].poll() is None


def test_takeover_with_workers_of_a_node_with_a_control_api(spawn: Spawn, tmp_path: Path) -> None:
    """[control] with workers: the old supervisor stops its control API for the new one, which
    reads the store (a pool changed through the API is still what both new workers serve),
    binds the control port and holds the state_dir lock; the sockets go over under load."""
    site = WorkersSite(spawn, tmp_path)
    control = free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    site.config.write_text(site.config.read_text() + f'[control]\nbind = "127.0.0.1:{control}"\ninsecure = true\n')
    old = site.start(spawn)
    wait_port(control)

    def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lbctl.cli", "--insecure", "-e", f"127.0.0.1:{control}", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=30)

    for args in (("backends", "add", "pa", f"127.0.0.1:{site.b}"), ("backends", "remove", "pa", f"127.0.0.1:{site.a}")):
        done = lbctl(*args)
        assert done.returncode == 0, done.stderr
    wait_until(lambda: backend_of(site.web) == "b", 5, "the API's change served")
    new: list[subprocess.Popen[bytes]] = []

    def change() -> None:
        new.append(spawn("-m", "lbnode.cli", "run", "--config", str(site.config), "--takeover", name="node").popen)
        assert old.wait(60) == 0

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "workers = 2: binary upgrade of a node with [control]")
    served_by_each(site.web, site.worker_pids(), "b")  # the store's pool, not the file's
    wait_port(control)
    listed = lbctl("pools", "show", "pa")
    assert listed.returncode == 0 and f"127.0.0.1:{site.b}" in listed.stdout, listed
    assert (tmp_path / "state" / "lock").read_text().strip() == str(new[0].pid)


def test_reload_with_workers_rotates_an_https_listeners_certificate(spawn: Spawn, tmp_path: Path) -> None:
    """[[certificates]] pointing at new files: the supervisor reads them and sends them to both
    workers; new handshakes on each worker get the new certificate, and a keep-alive TLS
    connection open across the reload is still served. A worker reads no certificate file
    itself: with the files gone after the reload, one killed with -9 comes back serving it."""
    import ssl

    from tests.tlsutil import make_ca

    old_ca, new_ca = make_ca(tmp_path, "old"), make_ca(tmp_path, "new")
    old_cert = old_ca.issue(tmp_path, "old-site", ["localhost"])
    new_cert = new_ca.issue(tmp_path, "new-site", ["localhost"])
    site = WorkersSite(spawn, tmp_path)
    secure = free_port()

    def write(cert: Path, key: Path) -> None:
        site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
        site.config.write_text(
            site.config.read_text()
            + listener_toml("secure", "https", "pa", bind=f"127.0.0.1:{secure}",
                            extra='  [listeners.tls]\n  certificates = ["site"]\n')
            + f'[[certificates]]\nname = "site"\ncert = "{cert}"\nkey = "{key}"\n')

    write(old_cert.cert, old_cert.key)
    site.start(spawn)
    wait_port(secure)
    pids = site.worker_pids()

    def client(ca: Path) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=5)

    with client(old_ca.path) as kept:
        assert kept.get(f"https://localhost:{secure}/").text == "a\n"
        write(new_cert.cert, new_cert.key)
        done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
        assert done.returncode == 0 and "listeners unchanged" in done.stdout, done
        again = kept.get(f"https://localhost:{secure}/")
        assert again.status_code == 200 and again.text == "a\n"
    for path in (new_cert.cert, new_cert.key):
        path.unlink()  # moved away after the reload: what the node serves is in memory
    wait_until(lambda: site.status()["spare_worker"] == "ready", 30, "the spare worker ready")
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: replaced(site, pids[0]), REPLACED_WITHIN, "the worker replaced")
    pids = site.worker_pids()
    served: set[int] = set()
    context = ssl.create_default_context(cafile=str(new_ca.path))
    for _ in range(200):  # fresh handshakes until each worker has made one, all with the new certificate
        with socket.create_connection(("127.0.0.1", secure), timeout=5) as raw:
            port = raw.getsockname()[1]
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                served |= {pid for pid in pids if port in accepted_by(pid, secure)}
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"a\n")
        if served == set(pids):
            break
    assert served == set(pids), "both workers completed handshakes with the new certificate"
    with client(old_ca.path) as stale, pytest.raises(httpx.ConnectError):
        stale.get(f"https://localhost:{secure}/")
