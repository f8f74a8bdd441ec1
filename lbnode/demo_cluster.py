"""``lbnode demo --cluster``: etcd, three nodes and three demo backends on this machine, lbctl set up.

Owns starting them (in network namespaces as root, so that a VIP can move between three
interfaces; on 127.0.0.x loopback addresses otherwise), printing what to try and what happens
(a node exits, the VIP moves), and deleting everything it made on Ctrl-C or SIGTERM, also when
a start fails. A plain process supervisor: no Trio, the nodes are ``lbnode run`` processes.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from lbnode import demo_lan
from lbnode.demo import BACKENDS

NODES = ("n1", "n2", "n3")
LEASE_TTL = 2  # seconds: a dead node's keys go quickly (the VIP moves in ~1 s with heartbeats)
HEARTBEAT_PORT = 7946
ADMIN_PORT = 7070
CONTROL_PORT = 7443
ETCD_PORT = 2379  # in the namespaces (the loopback mode takes free ports)
# How long each part may take to come up on 2 busy cores (a node imports grpc, joins etcd,
# wins or loses the VIP election): seconds, then the demo stops with the log's tail.
SERVICE_START = 20.0  # etcd, the backends
NODE_START = 40.0
# On Ctrl-C: a node hands its VIPs over (up to 2 s when every node stops at once) and drains
# (drain_timeout 1 s); after this, it is killed.
NODE_STOP = 6.0
OTHER_STOP = 5.0
POLL = 0.25  # seconds between two looks at the processes and the VIP
READY = "Fulcrum cluster demo is ready"
TMP_PREFIX = "fulcrum-demo-"  # then the demo's pid: a later demo tells a dead demo's directory
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies
ETCD_PACKAGE = "etcd-server"


class Stop(BaseException):
    """Ctrl-C or SIGTERM: unwinds to the cleanup (raised only at checkpoints, never inside Popen)."""


class DemoError(Exception):
    """The demo cannot go on; ``str()`` is the one line to print."""


class Signals:
    """SIGINT, SIGTERM and SIGHUP only set a flag; ``checkpoint()`` turns it into Stop.

    During cleanup a signal is noted and ignored: the cleanup always finishes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = False
        self.cleaning = False
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.cleaning:
            try:
                print("still cleaning up: one moment", file=sys.stderr, flush=True)
            except (OSError, RuntimeError):  # no terminal any more; or it came in the middle of a print
                pass
        self.requested = True

    def checkpoint(self) -> None:
        if self.requested and not self.cleaning:
            raise Stop

    def ignore_from_now(self) -> None:
        """After the cleanup: a late signal is ignored through the interpreter's exit too. Python
        puts the default action back on every signal it handled as it shuts down, so a second
        Ctrl-C landing then (in a test: sent on "stopping the nodes", after a quick cleanup)
        killed the demo with SIGINT instead of its exit status; an ignored one stays ignored."""
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def sleep(self, seconds: float) -> None:
        self.checkpoint()
        time.sleep(seconds)  # a signal's handler runs and the sleep goes on (PEP 475): Stop comes after it
        self.checkpoint()


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    host: str | None  # its namespace's member name (None on loopback)
    command: list[str]  # what runs (without `ip netns exec`): a stopped node starts again with it
    reported: bool = False  # its exit was printed

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


@dataclass
class Layout:
    """Where everything listens; ``lan`` is None on loopback (no namespaces, no VIP)."""

    lan: demo_lan.Lan | None
    nodes: dict[str, str]  # node -> its address
    etcd: str  # host:port
    etcd_peer: str
    backends: dict[str, str] = field(default_factory=dict)  # name -> host:port, once they listen
    backend_host: str = "127.0.0.1"
    http_port: int = 8080
    vip: str | None = None

    def etcd_health(self) -> bool:
        return '"true"' in _get(f"http://{self.etcd}/health")[1]


def _get(url: str) -> tuple[int, str]:
    """One GET, never through the user's proxy (http_proxy would take loopback and 198.18/15 away)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except OSError:
        return 0, ""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lbctl_program() -> str:
    """This installation's lbctl: ``lbctl`` when that is what the shell finds, else its full path."""
    beside = Path(sys.executable).parent / "lbctl"
    if not beside.exists():
        return f"{shlex.quote(sys.executable)} -m lbctl.cli"
    found = shutil.which("lbctl")
    return "lbctl" if found is not None and os.path.samefile(found, beside) else str(beside)


class ClusterDemo:
    def __init__(self, tmp: Path, signals: Signals, *, loopback: bool, out: Callable[[str], None]) -> None:
        self.tmp = tmp
        self.signals = signals
        self.out = out
        self.children: list[Child] = []
        self.nodes: dict[str, Child] = {}
        self.loopback_reason = ""
        self.vip_holders: list[str] | None = None
        for name in delete_stale_directories():
            self.out(f"deleted directory {name} of an earlier demo that did not clean up")
        lan = None
        if not loopback:
            reason = demo_lan.netns_unavailable()
            if reason is None:
                for name in demo_lan.delete_stale():
                    self.out(f"deleted namespace {name} of an earlier demo that did not clean up")
                lan = demo_lan.Lan(demo_lan.free_subnet())
            else:
                self.loopback_reason = reason
        else:
            self.loopback_reason = "--loopback"
        if lan is not None:
            svc = lan.address(2)
            self.layout = Layout(lan, {n: lan.address(10 + i) for i, n in enumerate(NODES, 1)},
                                 etcd=f"{svc}:{ETCD_PORT}", etcd_peer=f"{svc}:{ETCD_PORT + 1}", backend_host=svc,
                                 http_port=80, vip=lan.address(100))
        else:
            # 127.0.0.0/8 is all loopback on Linux: one address per node, the same ports on each
            self.layout = Layout(None, {n: f"127.0.0.{10 + i}" for i, n in enumerate(NODES, 1)},
                                 etcd=f"127.0.0.1:{_free_port('127.0.0.1')}",
                                 etcd_peer=f"127.0.0.1:{_free_port('127.0.0.1')}")

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        layout = self.layout
        if layout.lan is not None:
            layout.lan.build({"svc": 2, **{n: 10 + i for i, n in enumerate(NODES, 1)}})
        self.signals.checkpoint()
        self._start_etcd()
        self._start_backends()
        self._write_certs()
        for node in NODES:
            self.nodes[node] = self._spawn(node, node, self._node_args(node))
        self._wait_nodes()

    def _spawn(self, name: str, host: str | None, args: list[str]) -> Child:
        """Start ``args`` (in ``host``'s namespace when there are namespaces), in a session of its
        own: the terminal's Ctrl-C reaches the demo only, which then stops everything in order."""
        log = self.tmp / f"{name}.log"
        lan = self.layout.lan
        host = host if lan is not None else None
        full = (lan.exec_prefix(host) if lan is not None and host is not None else []) + args
        with open(log, "ab") as sink:
            popen = subprocess.Popen(full, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.tmp, start_new_session=True, preexec_fn=_die_with(os.getpid()),
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        child = Child(name, popen, log, host, args)
        self.children.append(child)
        return child

    def _start_etcd(self) -> None:
        etcd = shutil.which("etcd")
        assert etcd is not None  # checked before anything was made
        client, peer = f"http://{self.layout.etcd}", f"http://{self.layout.etcd_peer}"
        child = self._spawn("etcd", "svc", [
            etcd, "--name", "demo", "--data-dir", str(self.tmp / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"demo={peer}", "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ])
        self._wait("etcd", SERVICE_START, self.layout.etcd_health, [child])

    def _start_backends(self) -> None:
        layout = self.layout
        started: dict[str, Child] = {}
        for name, port in BACKENDS:
            bind = 0 if layout.lan is None else port  # loopback: any free port (9001-9003 may be taken)
            started[name] = self._spawn(name, "svc", [sys.executable, "-m", "lbnode.demo_backend", "--name", name,
                                                      "--host", layout.backend_host, "--port", str(bind)])

        def listening() -> bool:
            for name, child in started.items():
                lines = [ln for ln in child.log.read_text(errors="replace").splitlines() if ln.startswith("listening ")]
                if not lines:
                    return False
                layout.backends[name] = lines[0].split()[1]
            return True

        self._wait("the demo backends", SERVICE_START, listening, list(started.values()))

    def _write_certs(self) -> None:
        from lbctl.certs import init_certs

        certs = self.tmp / "certs"
        init_certs(certs, list(NODES), {n: [a] for n, a in self.layout.nodes.items()})
        endpoints = ", ".join(f'"{a}:{CONTROL_PORT}"' for a in self.layout.nodes.values())
        (self.tmp / "lbctl.toml").write_text(
            f"# lbctl settings of the demo: lbctl --config {self.tmp / 'lbctl.toml'} nodes\n"
            f"endpoints = [{endpoints}]\n"
            f'ca = "{certs / "ca.pem"}"\ncert = "{certs / "client.pem"}"\nkey = "{certs / "client.key"}"\n'
        )

    def _node_args(self, node: str) -> list[str]:
        layout = self.layout
        address = layout.nodes[node]
        certs = self.tmp / "certs"
        vip = ""
        if layout.vip is not None:
            vip = (f'vip_interface = "eth0"\nheartbeat = "{address}:{HEARTBEAT_PORT}"\n'
                   f'  [[cluster.vips]]\n  address = "{layout.vip}/24"\n')
        backends = "".join(f'  [[pools.backends]]\n  name = "{name}"\n  address = "{where}"\n'
                           for name, where in layout.backends.items())
        config = self.tmp / f"{node}.toml"
        config.write_text(f"""\
[node]
id = "{node}"
admin = "{address}:{ADMIN_PORT}"
state_dir = "{self.tmp / node}"
drain_timeout = "1s"
# One process per node, not the default "auto" (a worker per core): three nodes share this
# machine's cores, and the demo's story (kill a node by its pid, watch the VIP move) is one pid.
workers = 1

[cluster]
etcd = ["http://{layout.etcd}"]
lease_ttl = "{LEASE_TTL}s"
{vip}
[control]
bind = "{address}:{CONTROL_PORT}"
ca = "{certs / 'ca.pem'}"
cert = "{certs / f'{node}.pem'}"
key = "{certs / f'{node}.key'}"

[[listeners]]
name = "web"
protocol = "http"
bind = "{'0.0.0.0' if layout.vip is not None else address}:{layout.http_port}"
pool = "web"

[[pools]]
name = "web"
algorithm = "round_robin"
  [pools.health]
  type = "http"
  path = "/healthz"
  interval = "1s"
{backends}""")
        return [sys.executable, "-m", "lbnode.cli", "run", "--config", str(config)]

    def _node_ready(self, node: str) -> bool:
        child = self.nodes[node]
        return ("registered in etcd" in child.log.read_text(errors="replace")
                and _get(f"http://{self.layout.nodes[node]}:{ADMIN_PORT}/healthz")[0] == 200)

    def _wait_nodes(self) -> None:
        def ready() -> bool:
            if not all(self._node_ready(n) for n in NODES):
                return False
            if self.layout.vip is not None:
                self.vip_holders = self._holders()
                return len(self.vip_holders) == 1
            return True

        self._wait("the nodes", NODE_START, ready, list(self.nodes.values()))

    def _wait(self, what: str, timeout: float, condition: Callable[[], bool], children: Sequence[Child]) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for child in children:
                if child.popen.poll() is not None:
                    raise DemoError(f"{child.name} exited ({_how(child.popen.returncode)}); its log:\n{child.tail()}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"  {c.name}:\n{c.tail(5)}" for c in children)
                raise DemoError(f"{what} not ready after {timeout:g}s; their logs:\n{logs}")
            self.signals.sleep(0.1)

    def _holders(self) -> list[str]:
        assert self.layout.lan is not None and self.layout.vip is not None
        return self.layout.lan.holders(self.layout.vip, NODES)

    # ------------------------------------------------------------------ running

    def usage(self) -> str:
        layout = self.layout
        lbctl = f"{lbctl_program()} --config {self.tmp / 'lbctl.toml'}"
        n1 = layout.nodes["n1"]
        port = "" if layout.http_port == 80 else f":{layout.http_port}"
        where = (f"in network namespaces {layout.lan.prefix}-*, LAN {layout.lan.subnet} (this shell is .1)"
                 if layout.lan is not None else f"on loopback addresses ({self.loopback_reason})")
        lines = [f"{READY}: etcd, 3 nodes and 3 backends {where}.",
                 f"  etcd      http://{layout.etcd}   (one member)",
                 "  backends  " + ", ".join(f"{n} {a}" for n, a in layout.backends.items())]
        for node, address in layout.nodes.items():
            lines.append(f"  {node}  {address}  pid {self.nodes[node].popen.pid}  status page http://{address}:{ADMIN_PORT}/  "
                         f"metrics http://{address}:{ADMIN_PORT}/metrics")
        if layout.vip is not None:
            holder = self.vip_holders[0] if self.vip_holders else "nobody yet"
            lines.append(f"  VIP  {layout.vip}  held by {holder}")
        vip = layout.vip
        tries = [(f"curl http://{vip}/", "through the VIP: each call names the backend that served it")] if vip else []
        tries += [
            (f"curl http://{n1}{port}/", "through node n1 (each node: its address)"),
            (f"{lbctl} nodes", "the nodes, as the cluster sees them"),
            (f"{lbctl} vips", "who holds the VIP") if vip else (f"{lbctl} status", "the answering node's view"),
            (f"{lbctl} backends drain web alpha", "no new requests to alpha ('enable' undoes it)"),
            (f"{lbctl} nodes drain n2", "n2 hands its VIPs over, finishes its requests, exits 0"),
            (f"kill -9 {self.nodes['n2'].popen.pid}", "n2 dies (its pid)" + (": if it held the VIP, watch it move" if vip else "")),
        ]
        if vip:
            tries.append((f"watch -n 0.5 {lbctl} vips", "the VIP's holder, live (this window prints each move too)"))
        lines += ["", "Try:"]
        for command, comment in tries:
            lines += [f"  # {comment}", f"  {command}"]
        if not vip:
            lines.append("VIPs need root: run as root to see one move between the nodes.")
        lines += [f"Shorter: export LBCTL_CONFIG={self.tmp / 'lbctl.toml'}, then: {lbctl_program()} nodes",
                  "Type 'start n2' (Enter) here to start a stopped node again.",
                  f"Logs and configuration: {self.tmp} (deleted at the end).",
                  "Ctrl-C stops everything and deletes what the demo made."]
        return "\n".join(lines)

    def watch(self) -> None:
        """Until Ctrl-C: report exits and VIP moves; take 'start NODE' lines from stdin."""
        stdin_open = True
        pending = b""
        while True:
            self.signals.checkpoint()
            for child in self.children:
                if child.popen.poll() is not None and not child.reported:
                    child.reported = True
                    self._event(f"{child.name} exited ({_how(child.popen.returncode)})"
                                + (f": type 'start {child.name}' to start it again" if child.name in self.nodes else ""))
            if self.layout.vip is not None:
                holders = self._holders()
                if holders != self.vip_holders:
                    self._event(f"VIP {self.layout.vip}: " + (f"on {', '.join(holders)}" if holders else "no holder")
                                + (f" (was {', '.join(self.vip_holders)})" if self.vip_holders else ""))
                    self.vip_holders = holders
            if stdin_open and _stdin_is_ours():
                try:
                    readable, _, _ = select.select([0], [], [], POLL)
                    data = os.read(0, 4096) if readable else b""
                except OSError:  # no stdin at all
                    stdin_open, readable, data = False, [], b""
                if readable and not data:
                    stdin_open = False  # end of input (stdin from /dev/null, or a pipe that closed)
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self._command(line.decode(errors="replace").split())
                continue
            self.signals.sleep(POLL)

    def _command(self, words: list[str]) -> None:
        if not words:
            return
        if words[0] == "start" and len(words) == 2 and words[1] in self.nodes:
            node = words[1]
            if self.nodes[node].popen.poll() is None:
                self._event(f"{node} is running (pid {self.nodes[node].popen.pid})")
                return
            old = self.nodes[node]
            self.children.remove(old)
            self.nodes[node] = self._spawn(node, old.host, old.command)
            self._event(f"{node} started again: pid {self.nodes[node].popen.pid}")
        elif words[0] == "help":
            self.out(self.usage())
        else:
            self.out(f"commands: start {'|'.join(NODES)}, help (Ctrl-C stops the demo)")

    def _event(self, text: str) -> None:
        self.out(f"{datetime.datetime.now().strftime('%H:%M:%S.%f')[:10]}  {text}")

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Nodes first (they release their VIPs through etcd), then the rest; namespaces last."""
        nodes = [c for c in self.children if c.name in self.nodes]
        _stop([c.popen for c in nodes], NODE_STOP)
        _stop([c.popen for c in self.children if c not in nodes], OTHER_STOP)
        if self.layout.lan is not None:
            self.layout.lan.delete()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _stop(popens: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM all, then SIGKILL whatever is still running after ``grace`` seconds."""
    for p in popens:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in popens:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _die_with(demo: int) -> Callable[[], None]:
    """In the child before exec: SIGKILL when the demo dies, so a demo killed with ``kill -9``
    leaves no process (the kernel keeps this across exec; ``ip netns exec`` execs in place).
    preexec_fn is safe here: the demo runs no thread."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def arm() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != demo:  # the demo died before the prctl
            os._exit(1)

    return arm


def delete_stale_directories() -> list[str]:
    """This user's temporary directories of demos that died without cleaning up: deleted."""
    stale = []
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        match = re.fullmatch(rf"{TMP_PREFIX}(\d+)-\S+", path.name)
        try:
            if match is None or path.lstat().st_uid != os.geteuid():
                continue
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            stale.append(str(path))
        except OSError:
            continue  # alive (another user's pid), or gone meanwhile
    return stale


def _stdin_is_ours() -> bool:
    """stdin is there, and not a terminal of which we are in the background (a read would stop us)."""
    try:
        return not os.isatty(0) or os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def run_cluster_demo(*, loopback: bool = False) -> int:
    """The whole demo; 0 after Ctrl-C/SIGTERM (everything deleted), 1 if it could not start."""

    def out(text: str, stream: TextIO = sys.stdout) -> None:
        try:
            print(text, file=stream, flush=True)
        except OSError:  # the terminal went away (SIGHUP): the cleanup must go on all the same
            pass

    if shutil.which("etcd") is None:
        print(f"lbnode demo --cluster: etcd is not installed: install the Debian package {ETCD_PACKAGE} "
              "(`make demo-cluster` does)", file=sys.stderr)
        return 1
    signals = Signals()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    demo: ClusterDemo | None = None
    status = 0
    try:
        demo = ClusterDemo(tmp, signals, loopback=loopback, out=out)
        where = "in network namespaces" if demo.layout.lan is not None else "on loopback addresses"
        out(f"starting etcd, 3 demo backends and 3 nodes {where}; logs in {tmp}")
        demo.start()
        out(demo.usage())
        demo.watch()
    except Stop:
        pass
    except (DemoError, demo_lan.LanError) as exc:
        out(f"lbnode demo --cluster: {exc}", sys.stderr)
        status = 1
    finally:
        signals.cleaning = True
        out("stopping the nodes, etcd and the backends; deleting what the demo made...")
        if demo is not None:
            demo.cleanup()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        out("demo stopped: everything it made is gone")
        signals.ignore_from_now()
    return status

