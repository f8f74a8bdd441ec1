"""HAProxy (the Debian package) as a real peer in tests: started from a config text, stopped
at the end of the ``async with``. Used where the other end of a protocol must not be ours."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.conftest import free_port as free_port  # the one port picker (see there)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"  # `make sysdeps-test` installs it

# Every config starts with this: in the foreground, one thread (the tests share 2 cores).
HEAD = """\
global
    nbthread 1
    maxconn 1000
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


@asynccontextmanager
async def running_haproxy(tmp_path: Path, config: str, ports: list[tuple[str, int]]) -> AsyncIterator[Path]:
    """HAProxy running ``HEAD + config`` until the block ends; waits until ``ports`` are bound
    (without connecting: a test connection would reach the server behind and count there).

    Yields its log file (stderr: HAProxy's warnings and alerts, for assertion messages)."""
    assert Path(HAPROXY).exists(), "haproxy missing: run `make sysdeps-test` (Debian package haproxy)"
    cfg = tmp_path / f"haproxy-{len(list(tmp_path.glob('haproxy-*.cfg')))}.cfg"
    cfg.write_text(HEAD + config)
    log = cfg.with_suffix(".log")
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(log, "wb") as out:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        # 10 s: HAProxy binds in milliseconds; the margin is for 2 busy cores.
        with trio.fail_after(10):
            for host, port in ports:
                while not _bound(host, port):
                    assert proc.poll() is None, log.read_text()
                    await trio.sleep(0.02)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bound(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True  # EADDRINUSE: HAProxy listens there (it accepts once its loop runs)
        return False
