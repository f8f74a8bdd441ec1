"""A reload and a takeover at the same time (issue 13/10): one change of the listener set at a time.

A reload that arrives while ``lbnode run --takeover`` is being handed the sockets is refused
(it could close a socket the new process is being given, or change the set it was given),
and so is a second takeover; a takeover asked while a reload runs is refused. Each refusal is
one line naming what is in progress, and the change in progress goes on unharmed. Real
processes: the new process is held in the middle of its takeover with SIGSTOP, a reload is
held in progress by a worker stopped with SIGSTOP (a supervisor's reload waits for its
workers' answers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import free_port
from tests.integration.test_node_process import Spawn, wait_log, wait_until
from tests.integration.test_reload import (
    Site,
    assert_seamless,
    backend_of,
    lbnode,
    refused,
    under_load,
)


def test_a_reload_during_a_takeover_is_refused_and_the_takeover_goes_on(spawn: Spawn, tmp_path: Path) -> None:
    """The old node (workers = 2) has handed its sockets to a new supervisor (workers = 2),
    which waits for its workers before it says "drain" (1-2 s of interpreter start); it is
    stopped with SIGSTOP in that window. `lbnode reload` (of a file that removes a listener the
    new process was given), SIGHUP and a second takeover are refused, naming the new process's
    pid; under load nothing fails; after SIGCONT the takeover completes, the listener the
    refused reload would have removed is still served, and the same reload then reaches the
    new process."""
    site = Site(spawn, tmp_path, workers=2)
    extra = free_port()
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa"), ("extra", "http", extra, "pa")])
    old = spawn("-m", "lbnode.cli", "run", "--config", str(site.config), name="node")
    wait_log(old, r"2 workers serving", timeout=30)
    # The reload the race is about: "extra" removed (its socket is among those being handed over).
    reload_file = tmp_path / "reload.toml"
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    reload_file.write_text(site.config.read_text())
    # The new process's configuration: every listener kept, web to pool pb.
    site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa"), ("extra", "http", extra, "pa")])
    new: list[subprocess.Popen[bytes]] = []
    second: list[subprocess.CompletedProcess[str]] = []

    def change() -> None:
        proc = spawn("-m", "lbnode.cli", "run", "--config", str(site.config), "--takeover", name="node")
        new.append(proc.popen)
        wait_log(old, r"takeover: \d+ sockets handed to a new process", timeout=30)
        proc.popen.send_signal(signal.SIGSTOP)
        try:
            # Still in the window: the new supervisor had not started its workers yet when stopped.
            assert "draining and exiting" not in old.log(), "the takeover ended before SIGSTOP: no race tested"
            done = lbnode("reload", "-c", str(reload_file), cwd=tmp_path)
            assert done.returncode == 1, done
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(
                f"lbnode: reload refused: a takeover is in progress: lbnode pid {proc.popen.pid} "
                "(lbnode run --takeover) is taking over this node's sockets"), lines
            old.popen.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload refused, serving the previous configuration: a takeover is in progress"
                       in old.log(), 10, "the SIGHUP's refusal logged")
            second.append(lbnode("run", "-c", str(site.config), "--takeover", cwd=tmp_path))
        finally:
            proc.popen.send_signal(signal.SIGCONT)
        assert old.popen.wait(60) == 0  # the first takeover completed: drained and exited
        assert "takeover: serving the sockets of lbnode pid" in proc.log()

    load, t0, t1 = under_load(site, change)
    assert_seamless(load, t0, t1, "reload and a second takeover refused during a takeover")
    assert second[0].returncode == 1
    assert second[0].stderr.strip() == (
        f"lbnode: {site.config}: --takeover: takeover refused: another takeover is in progress "
        f"(lbnode pid {new[0].pid} is taking over this node's sockets)")
    assert new[0].poll() is None
    # The refused reload changed nothing: "extra" was handed over and is served by the new process.
    site.worker_pids()
    assert backend_of(extra) == "a" and backend_of(site.web) == "b"
    done = lbnode("reload", "-c", str(reload_file), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("reloaded: listeners changed web; removed extra"), done
    wait_until(lambda: refused(extra), 10, "the removed listener closed by the new process")


def test_a_takeover_during_a_reload_is_refused_and_the_reload_completes(spawn: Spawn, tmp_path: Path) -> None:
    """A supervisor's reload waits for its workers' answers (up to RELOAD_TIMEOUT, 5 s); one
    worker is stopped with SIGSTOP, so the reload started by SIGHUP is in progress for 5 s. A
    `lbnode run --takeover` started right after the SIGHUP connects within that (its
    interpreter start is 1.1-1.7 s on 2 busy cores: about 3x margin) and is refused in one
    line; the reload completes, and a takeover after it succeeds."""
    site = Site(spawn, tmp_path, workers=2)
    site.write([("web", "http", site.web, "pa"), ("tcp", "tcp", site.tcp, "pa")])
    old = spawn("-m", "lbnode.cli", "run", "--config", str(site.config), name="node")
    wait_log(old, r"2 workers serving", timeout=30)
    victim = site.worker_pids()[0]
    site.write([("web", "http", site.web, "pb"), ("tcp", "tcp", site.tcp, "pa")])
    os.kill(victim, signal.SIGSTOP)
    try:
        old.popen.send_signal(signal.SIGHUP)
        wait_log(old, r"SIGHUP: reloading ")
        done = lbnode("run", "-c", str(site.config), "--takeover", cwd=tmp_path)
        reload_done = "reloaded: " in old.log()  # the reload answered (5 s passed) before the refusal
    finally:
        os.kill(victim, signal.SIGCONT)
    assert not reload_done, "the takeover connected after the reload had finished: no race tested"
    assert done.returncode == 1, done
    assert done.stderr.strip() == (f"lbnode: {site.config}: --takeover: takeover refused: a reload is in progress "
                                   "(lbnode reload or SIGHUP); try again once it has answered")
    wait_log(old, r"reloaded: listeners changed web; 2 pools; 2 workers", timeout=15)
    assert old.popen.poll() is None and backend_of(site.web) == "b"
    # A takeover after the reload is not refused.
    result: list[int] = []
    proc = spawn("-m", "lbnode.cli", "run", "--config", str(site.config), "--takeover", name="node")
    threading.Thread(target=lambda: result.append(old.popen.wait(60))).start()
    wait_log(proc, r"takeover: serving the sockets of lbnode pid", timeout=60)
    wait_until(lambda: result == [0], 60, "the old supervisor drained and exited 0")
    assert backend_of(site.web) == "b"
