"""The processes a benchmark run starts and shares: ports, ``Proc``, ``Context``, ``Options``.

A ``Context`` starts the backends, HAProxy, nginx, lbnode and etcd on first use, each
once, and stops every one of them in ``close()``; everything listens on and talks to
127.0.0.1 only. A ``Section`` is one block of the report. Sections (``bench.throughput``,
``bench.policies``, ...) import this module, never the other way round; measurements
are in ``bench.measure``, the report in ``bench.report``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.configs import (
    BULK_PATH,
    BULK_SIZE,
    HOST,
    SMALL_BODY,
    SMALL_PATH,
    Ports,
    fulcrum_config,
    haproxy_config,
    nginx_backend_config,
    nginx_lb_config,
)
from bench.procstat import listening_ports_of, process_group, process_tree

ETCD = "/usr/bin/etcd"  # Debian's etcd-server (`make sysdeps-test` installs it)


class StartError(RuntimeError):
    """A process that did not come up; ``str()`` is the short reason for the table."""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int, taken: set[int], limit: int = 2000) -> int:
    """``preferred`` or the next free port above it, never one in ``taken``."""
    for port in range(preferred, min(preferred + limit, 65535)):
        if port not in taken and port_is_free(port):
            taken.add(port)
            return port
    raise StartError(f"no free port in {preferred}..{preferred + limit}")


def allocate_ports(base: int = 27000) -> Ports:
    """Ports from ``base`` up (below Linux's ephemeral range, away from the 18xxx/19xxx
    examples other tools and tests use), each the next free one."""
    taken: set[int] = set()
    backends = [pick_port(base + 1 + i, taken) for i in range(3)]
    return Ports(
        backends=backends,
        fulcrum_web=pick_port(base + 80, taken),
        fulcrum_bulk=pick_port(base + 81, taken),
        fulcrum_admin=pick_port(base + 70, taken),
        haproxy_web=pick_port(base + 180, taken),
        haproxy_bulk=pick_port(base + 181, taken),
        haproxy_bulk_splice=pick_port(base + 182, taken),
        nginx_web=pick_port(base + 280, taken),
    )


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _log_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [t.strip() for t in text if t.strip()]


def failure_line(lines: Sequence[str], width: int = 120) -> str:
    """The most telling line of a dead process's output, for a table cell; shortened
    to ``width``. In order: the last Python exception line that is not an exception
    group (tracebacks of groups are prefixed with ``|``), the last haproxy ALERT or
    nginx emerg/crit line, the last line."""
    clean = [re.sub(r"^[|+\s-]*", "", ln).strip() for ln in lines]
    clean = [ln for ln in clean if ln]
    py = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")
    group = re.compile(r"^(Base)?ExceptionGroup\b")
    other = re.compile(r"\[(ALERT|emerg|crit)\]")
    pick = (
        next((ln for ln in reversed(clean) if py.match(ln) and not group.match(ln)), None)
        or next((ln for ln in reversed(clean) if other.search(ln)), None)
        or (clean[-1] if clean else "")
    )
    pick = re.sub(r"^\[(ALERT|NOTICE|WARNING)\]\s*\(\d+\)\s*:\s*", "", pick)
    return pick if len(pick) <= width else pick[: width - 1] + "…"


class Proc:
    """A child process in its own session, output to ``log``, stopped by ``stop()``."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._logf,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            self._logf.close()
            raise StartError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def why_dead(self) -> str:
        rc = self.popen.poll()
        tail = self.report_log()
        return f"{self.name} exited with code {rc}" + (f": {tail}" if tail else "")

    def report_log(self, lines: int = 15) -> str:
        """Print the end of the log to stderr (the temp dir is removed at exit);
        return its most telling line."""
        got = _log_lines(self.log)
        if got:
            print(f"  --- last lines of {self.name}'s output:", file=sys.stderr)
            for ln in got[-lines:]:
                print(f"  | {ln}", file=sys.stderr)
        return failure_line(got)

    def wait_ready(
        self, ports: Sequence[int], timeout: float, health: Callable[[], bool] | None = None
    ) -> None:
        """Until every port accepts and ``health()`` (if given) is true; raise ``StartError``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited() is not None:
                raise StartError(self.why_dead())
            # Our process must hold the listening sockets: a port that accepts but
            # belongs to someone else (taken after we picked it) is not ours.
            mine = listening_ports_of(process_tree(self.pid))
            if set(ports) <= mine and all(port_accepts(p) for p in ports):
                if health is None or health():
                    return
            time.sleep(0.1)
        if self.exited() is not None:
            raise StartError(self.why_dead())
        tail = self.report_log()
        missing = sorted(set(ports) - listening_ports_of(process_tree(self.pid)))
        what = f"not listening on {HOST}:{missing}" if missing else "not healthy"
        raise StartError(f"{self.name} {what} after {timeout:.0f}s" + (f": {tail}" if tail else ""))

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to the process group this process leads."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Not reaped yet, so the group id is still ours.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout)
            # Stragglers of the group this process led (e.g. children of a parent that
            # died on SIGTERM). While a member lives, the kernel does not reuse the
            # group id, so this only reaches processes we started.
            if process_group(self.popen.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
        finally:
            self._logf.close()


@dataclass
class Options:
    quick: bool = False
    duration: float = 10.0  # L7 measured seconds per balancer
    warmup: float = 2.0  # L7 warm-up seconds per balancer (not measured)
    connections: int = 50
    threads: int = 1
    bulk_duration: float = 4.0  # L4 seconds of downloads per path
    bulk_min_downloads: int = 3
    variant_duration: float = 4.0  # measured seconds per run in the policies/protections sections
    variant_warmup: float = 1.0  # warm-up seconds per run there (not measured)
    variant_rounds: int = 3  # ABBA rounds in the sections that compare two configs
    start_timeout: float = 20.0
    pin: bool = True
    rounds: int = 3  # interleaved runs per balancer in the l7, connections and tls sections


class Context:
    """What sections share: options, temp dir, ports, CPUs, started processes, results.

    Processes are started on first use and all stopped by ``close()``. A process
    that failed to start is remembered, so its rows say why in every section.
    """

    def __init__(self, opts: Options, repo: Path, tmp: Path) -> None:
        self.opts = opts
        self.repo = repo
        self.tmp = tmp
        self.ports = allocate_ports()
        self.run_as_root = os.geteuid() == 0
        self.results: dict[str, object] = {}
        self._etcd_url = ""
        self._procs: list[Proc] = []
        self._started: dict[str, Proc | StartError] = {}
        cpus = sorted(os.sched_getaffinity(0))
        have_taskset = shutil.which("taskset") is not None
        if opts.pin and len(cpus) >= 2 and have_taskset:
            self.client_cpu: int | None = cpus[0]
            self.balancer_cpu: int | None = cpus[1]
        else:
            self.client_cpu = self.balancer_cpu = None

    # -- process helpers

    def _pinned(self, argv: list[str], cpu: int | None) -> list[str]:
        return ["taskset", "-c", str(cpu)] + argv if cpu is not None else argv

    def spawn(self, name: str, argv: list[str], pin_balancer: bool = False) -> Proc:
        argv = self._pinned(argv, self.balancer_cpu if pin_balancer else None)
        log = self.tmp / f"{name}.log"
        proc = Proc(name, argv, log, cwd=self.tmp)
        self._procs.append(proc)
        return proc

    def _once(self, key: str, start: Callable[[], Proc]) -> Proc:
        got = self._started.get(key)
        if got is None:
            try:
                got = start()
            except StartError as exc:
                got = exc
            self._started[key] = got
        if isinstance(got, StartError):
            raise got
        return got

    def close(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self._procs.clear()

    # -- the processes

    def backends(self) -> Proc:
        def start() -> Proc:
            if not shutil.which("nginx"):
                raise StartError("nginx not installed")
            prefix = self.tmp / "backends"
            www = prefix / "www"
            www.mkdir(parents=True)
            chunk = os.urandom(1024 * 1024)
            with open(www / BULK_PATH.lstrip("/"), "wb") as f:
                for _ in range(BULK_SIZE // len(chunk)):
                    f.write(chunk)
            conf = prefix / "nginx.conf"
            conf.write_text(nginx_backend_config(prefix, www, self.ports, self.run_as_root))
            proc = self.spawn("backends", _nginx_argv(conf, prefix))
            proc.wait_ready(self.ports.backends, self.opts.start_timeout)
            status, body = http_get(self.ports.backends[0], SMALL_PATH)
            if status != 200 or body != SMALL_BODY:
                raise StartError(f"backend nginx answered {status} with {len(body)} bytes")
            return proc

        return self._once("backends", start)

    def haproxy(self, nbthread: int = 1) -> Proc:
        """HAProxy on its usual ports; ``nbthread`` above 1 is another key (``stop`` the other
        first: both bind the same ports)."""
        key = "haproxy" if nbthread == 1 else f"haproxy-nbthread{nbthread}"

        def start() -> Proc:
            if not shutil.which("haproxy"):
                raise StartError("haproxy not installed")
            conf = self.tmp / f"{key}.cfg"
            conf.write_text(haproxy_config(self.ports, nbthread))
            proc = self.spawn(key, ["haproxy", "-f", str(conf), "-db"], pin_balancer=True)
            ports = [
                self.ports.haproxy_web,
                self.ports.haproxy_bulk,
                self.ports.haproxy_bulk_splice,
            ]
            proc.wait_ready(ports, self.opts.start_timeout)
            return proc

        return self._once(key, start)

    def nginx_lb(self) -> Proc:
        def start() -> Proc:
            if not shutil.which("nginx"):
                raise StartError("nginx not installed")
            prefix = self.tmp / "nginx-lb"
            prefix.mkdir()
            conf = prefix / "nginx.conf"
            conf.write_text(nginx_lb_config(prefix, self.ports, self.run_as_root))
            proc = self.spawn("nginx-lb", _nginx_argv(conf, prefix), pin_balancer=True)
            proc.wait_ready([self.ports.nginx_web], self.opts.start_timeout)
            return proc

        return self._once("nginx-lb", start)

    def fulcrum(
        self,
        config: str | None = None,
        key: str = "fulcrum",
        ready_ports: Sequence[int] | None = None,
        admin_port: int | None = None,
    ) -> Proc:
        """lbnode with ``config`` (default: ``fulcrum_config(ports)``), started once per ``key``.

        A section that wants another config (say another algorithm) passes a
        different ``key``, its own config and the ports to wait for; it must use
        other ports or ``stop("fulcrum")`` first, since the default binds
        ``ports.fulcrum_*``.
        """
        if ready_ports is None:
            ready_ports = [self.ports.fulcrum_web, self.ports.fulcrum_bulk]
        admin = self.ports.fulcrum_admin if admin_port is None else admin_port

        def start() -> Proc:
            lbnode = _lbnode_path(self.repo)
            if lbnode is None:
                raise StartError("lbnode not installed (run make venv)")
            conf = self.tmp / f"{key}.toml"
            text = config
            if text is None:
                text = fulcrum_config(self.ports, state_dir=str(self.tmp / f"{key}-state"))
            conf.write_text(text)
            proc = self.spawn(key, [lbnode, "run", "--config", str(conf)], pin_balancer=True)

            def healthy() -> bool:
                # Only ask /healthz when the admin port is lbnode's own.
                if admin not in listening_ports_of(process_tree(proc.pid)):
                    return True
                return _healthz_ok(admin) and _spare_worker_settled(admin)

            proc.wait_ready(ready_ports, self.opts.start_timeout, health=healthy)
            return proc

        return self._once(key, start)

    def etcd(self) -> str:
        """A one-member etcd (data in the temp dir, free ports from 27400), started once;
        its client URL. ``StartError`` when ``ETCD`` is not installed or does not serve."""

        def start() -> Proc:
            if not Path(ETCD).exists():
                raise StartError(f"etcd not installed ({ETCD}; Debian package etcd-server)")
            taken = set(ports_of(self.ports))
            client, peer = pick_port(27400, taken), pick_port(27401, taken)
            proc = self.spawn("etcd", etcd_argv(ETCD, self.tmp / "etcd", client, peer))
            proc.wait_ready([client], self.opts.start_timeout, health=lambda: _etcd_healthy(client))
            self._etcd_url = f"http://{HOST}:{client}"
            return proc

        self._once("etcd", start)
        return self._etcd_url

    def stop(self, key: str) -> None:
        """Stop a process started through this context (e.g. before reusing its ports),
        also one that started but never became ready; forget it, so the next use of
        ``key`` starts it again."""
        self._started.pop(key, None)
        for proc in [p for p in self._procs if p.name == key]:
            try:
                proc.stop()
            finally:
                self._procs.remove(proc)


def ports_of(ports: Ports) -> list[int]:
    """Every port in ``ports``."""
    return [*ports.backends] + [
        ports.fulcrum_web,
        ports.fulcrum_bulk,
        ports.fulcrum_admin,
        ports.haproxy_web,
        ports.haproxy_bulk,
        ports.haproxy_bulk_splice,
        ports.nginx_web,
    ]


def etcd_argv(etcd: str, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """A one-member etcd on loopback: client and peer URLs on ``HOST``, warnings only."""
    client, peer = f"http://{HOST}:{client_port}", f"http://{HOST}:{peer_port}"
    return [
        etcd,
        "--name",
        "bench",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"bench={peer}",
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        "fulcrum-bench",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
        "--log-level",
        "warn",
    ]


def _etcd_healthy(client_port: int) -> bool:
    """etcd's ``GET /health`` says ``{"health":"true"}`` (a leader, no alarm)."""
    try:
        status, body = http_get(client_port, "/health", timeout=1.0)
    except (OSError, http.client.HTTPException):
        return False
    try:
        return status == 200 and json.loads(body).get("health") == "true"
    except ValueError:
        return False


def _nginx_argv(conf: Path, prefix: Path) -> list[str]:
    return [
        "nginx",
        "-e",
        str(prefix / "error.log"),
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


def _lbnode_path(repo: Path) -> str | None:
    cand = Path(sys.executable).parent / "lbnode"
    if cand.exists():
        return str(cand)
    cand = repo / ".venv" / "bin" / "lbnode"
    if cand.exists():
        return str(cand)
    return shutil.which("lbnode")


def _healthz_ok(admin_port: int) -> bool:
    """True when /healthz says 2xx, or when there is no admin endpoint (yet) to ask:
    a refused connection or a 404. False while it answers 5xx (starting)."""
    try:
        status, _ = http_get(admin_port, "/healthz", timeout=1.0)
    except OSError:
        return True
    except http.client.HTTPException:
        return True
    return status < 500


def _spare_worker_settled(admin_port: int) -> bool:
    """With ``[node] workers`` >= 2 the supervisor starts a spare worker once the others
    serve; its interpreter start (over a second of CPU on the balancer's core) must not fall
    into a measured run. True when /status has no "spare_worker" (one process) or it is ready."""
    try:
        status, body = http_get(admin_port, "/status", timeout=2.0)
        doc = json.loads(body) if status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return True
    return doc.get("spare_worker", "ready") in ("ready", "none")


@dataclass
class Section:
    name: str  # for --only
    title: str
    run: Callable[[Context], str]  # returns a markdown block (without the title)


def try_proc(getter: Callable[[], Proc]) -> tuple[Proc | None, str | None]:
    try:
        return getter(), None
    except StartError as exc:
        return None, str(exc)
