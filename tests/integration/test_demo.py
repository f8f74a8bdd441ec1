"""`lbnode demo` (what `make demo` runs) as a newcomer uses it: a real process, real curl-like clients."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

DEMO_PORTS = (8080, 8081, 7070, 9001, 9002, 9003)


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_serves_l7_and_l4_and_stops_cleanly_on_ctrl_c(tmp_path):
    busy = [p for p in DEMO_PORTS if not _free(p)]
    if busy:
        pytest.skip(f"demo ports in use on this machine: {busy}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbnode.cli", "demo"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 15
        names = []
        while time.monotonic() < deadline:
            try:
                names = [httpx.get("http://127.0.0.1:8080/", timeout=2).text.strip() for _ in range(3)]
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert sorted(names) == ["alpha", "beta", "gamma"]
        with socket.create_connection(("127.0.0.1", 8081), timeout=5) as s:  # L4
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.rstrip().split(b"\n")[-1] in (b"alpha", b"beta", b"gamma")
        assert httpx.get("http://127.0.0.1:7070/healthz", timeout=2).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        text = out.decode()
        assert "curl http://127.0.0.1:8080/" in text  # it tells the newcomer what to try
        assert "Traceback" not in text
        assert "stopped" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
