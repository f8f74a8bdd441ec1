"""Reload and binary upgrade of a node with ``[node] workers = 2`` (issue 13): what only a
supervisor has.

The scenarios a single process has too (a reload under load, SIGHUP, --takeover, [control],
a certificate rotation) run with ``workers = 2`` in test_reload.py (parameter ``workers``).
Here: a worker killed with -9 after a reload, a reload that would change node.workers, and a
takeover from one process to a supervisor and back, with the same clients
(bench/reloadload.py) and the same real processes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import free_port, wait_port
from tests.integration.test_node_process import Spawn, wait_log
from tests.integration.test_reload import (
    Site,
    assert_seamless,
    backend_of,
    lbnode,
    refused,
    under_load,
)
from tests.integration.test_workers import served_by_each


def test_a_worker_killed_after_a_reload_comes_back_on_the_new_listeners(spawn: Spawn, tmp_path: Path) -> None:
    """kill -9 of a worker after a reload: its replacement (the spare) gets the sockets and the
    configuration as they are now, not as they were at the node's start."""
    site = Site(spawn, tmp_path, workers=2)
    old, extra = free_port(), free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("old", "http", old, "pa")])
    site.start(spawn)
    site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa"), ("extra", "http", extra, "pa")])
    done = lbnode("reload", "-c", str(site.config), cwd=tmp_path)
    assert done.returncode == 0 and "added extra" in done.stdout and "removed old" in done.stdout, done
    # The file changes again without a reload: a restarted worker must not read it.
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("old", "http", old, "pa")])
    now = site.kill_a_worker()
    served_by_each(extra, now, "a")  # the new listener, on the replacement too
    served_by_each(site.web, now, "b")  # the reloaded settings, not the file's later edit
    assert refused(old)


def test_reload_cannot_change_the_number_of_workers(spawn: Spawn, tmp_path: Path) -> None:
    """The process layout is chosen at start: a reload to other workers is refused in one line
    naming node.workers (--takeover applies it), and the node serves on."""
    site = Site(spawn, tmp_path, workers=2)
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
    site = Site(spawn, tmp_path, workers=2)
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
