"""Clients that run while a node reloads or is upgraded, and what they saw: refused
connections, failed requests, the longest request.

Real clients in threads: HTTP/1.1 keep-alive connections (httpx, each reusing its
connection until the server closes it), a fresh connection per request (raw socket,
``Connection: close``), a TCP listener's connections (raw socket through an L4 listener),
and the admin endpoint's ``/healthz`` (fresh connections: it must answer 200 all along, so
a draining old process must no longer answer it). Used by tests/integration/test_reload.py
and the bench's reload section.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

# Each client waits this long for one request: far above any delay a reload may cause, so
# a slow answer is measured (the longest delay) rather than counted as a failure.
REQUEST_TIMEOUT = 10.0


@dataclass
class Outcome:
    """One request: when it started, how long it took, and what went wrong (None: it worked)."""

    kind: str
    started: float
    seconds: float
    error: str | None = None
    refused: bool = False


@dataclass
class Load:
    """Start with ``start()``, stop with ``stop()``; then read ``outcomes``."""

    host: str = "127.0.0.1"
    http_port: int | None = None
    tcp_port: int | None = None
    admin_port: int | None = None
    path: str = "/slow?ms=20"
    keepalive: int = 4  # keep-alive clients on the HTTP listener
    fresh: int = 2  # clients opening a connection per request on the HTTP listener
    tcp: int = 2  # clients through the TCP listener
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        workers: list[tuple[str, Callable[[], None]]] = []
        if self.http_port is not None:
            workers += [("keepalive", self._keepalive)] * self.keepalive
            workers += [("fresh", lambda: self._fresh("fresh", self.http_port, self.path))] * self.fresh
        if self.tcp_port is not None:
            workers += [("tcp", lambda: self._fresh("tcp", self.tcp_port, self.path))] * self.tcp
        if self.admin_port is not None:
            workers.append(("admin", lambda: self._fresh("admin", self.admin_port, "/healthz", pause=0.01)))
        for name, fn in workers:
            t = threading.Thread(target=fn, name=f"load-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT + 5)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _keepalive(self) -> None:
        url = f"http://{self.host}:{self.http_port}{self.path}"
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.get(url)
                    error = None if r.status_code == 200 else f"status {r.status_code}"
                    refused = False
                except httpx.ConnectError as exc:
                    error, refused = f"connect: {exc}", True
                except httpx.HTTPError as exc:
                    error, refused = f"{type(exc).__name__}: {exc}", False
                self._record(Outcome("keepalive", t0, time.monotonic() - t0, error, refused))

    def _fresh(self, kind: str, port: int | None, path: str, pause: float = 0.0) -> None:
        assert port is not None
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode()
        while not self._stop.is_set():
            t0 = time.monotonic()
            error, refused = None, False
            try:
                with socket.create_connection((self.host, port), timeout=REQUEST_TIMEOUT) as s:
                    s.sendall(request)
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200 "):
                    error = f"answer {data[:40]!r}"
            except ConnectionRefusedError:
                error, refused = "connection refused", True
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._record(Outcome(kind, t0, time.monotonic() - t0, error, refused))
            if pause:
                time.sleep(pause)

    # ------------------------------------------------------------------ results
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.refused]

    def longest(self, since: float = 0.0, until: float = float("inf"), kinds: tuple[str, ...] = ()) -> float:
        """The longest request that was in flight at some moment of [since, until]."""
        return max(
            (o.seconds for o in self.outcomes
             if o.started <= until and o.started + o.seconds >= since and (not kinds or o.kind in kinds)),
            default=0.0,
        )

    def count(self, kind: str | None = None) -> int:
        return sum(1 for o in self.outcomes if kind is None or o.kind == kind)

    def report(self, since: float, until: float) -> str:
        served = [o for o in self.outcomes if o.kind != "admin"]
        return (f"{len(served)} requests ({self.count('keepalive')} keep-alive, {self.count('fresh')} fresh "
                f"connections, {self.count('tcp')} through TCP; {self.count('admin')} /healthz), "
                f"{len(self.failed())} failed, {len(self.refused())} refused; longest request around the change "
                f"{self.longest(since, until, ('keepalive', 'fresh', 'tcp')) * 1000:.0f} ms, "
                f"before it {self.longest(0.0, since - 0.001, ('keepalive', 'fresh', 'tcp')) * 1000:.0f} ms")
