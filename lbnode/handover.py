"""The node's command socket (``state_dir/lbnode.sock``): ``lbnode reload`` and the hand-over
of listening sockets to a new process (``lbnode run --takeover``, as HAProxy's
``expose-fd listeners``).

Owns the wire: one JSON line each way per command, and for a takeover the descriptors in
the same message (SCM_RIGHTS, ``socket.send_fds``). A takeover is one conversation:
"takeover" (answer: socket names and descriptors, the state_dir lock's among them),
"release-control" with [control], "release-cluster" with [cluster] (the lease, the VIPs held
and the heartbeat state: see docs/reload.md), then "drain" once the new process serves. What a command does is the node's.
The client half is blocking (the CLI, and a new process before its ``trio.run``); the server
half runs in Trio on a non-blocking socket. Only the node's user can connect: the socket is
created mode 0600 inside state_dir.
"""

from __future__ import annotations

import json
import logging
import os
import socket as stdsocket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

log = logging.getLogger("lbnode.handover")

SOCKET_NAME = "lbnode.sock"
# A Unix socket path holds 108 bytes (sun_path); longer state_dir paths go through
# /proc/self/fd/<dir> (Linux resolves it at bind and connect).
SUN_PATH_MAX = 100
# A command's reply comes from the node's event loop: a reload reads and checks a file, binds
# sockets (milliseconds). Generous for a loaded host; a takeover's drain reply is as quick.
REPLY_TIMEOUT = 30.0
# Descriptors in one takeover message: the listeners and the admin socket (SCM_RIGHTS takes
# up to 253 per message on Linux).
MAX_FDS = 253
MAX_MESSAGE = 1 << 20


class CommandError(Exception):
    """The command socket cannot be reached, or it answered an error; the message is one line."""


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


@contextmanager
def _short(path: Path) -> Iterator[str]:
    """``path`` as bind/connect can take it (see SUN_PATH_MAX)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- client (blocking)


def connect(path: Path, timeout: float = REPLY_TIMEOUT) -> stdsocket.socket:
    path = path.absolute()  # in messages: where it looked (a relative state_dir depends on the directory)
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short(path) as where:
            sock.connect(where)
    except FileNotFoundError:
        sock.close()
        raise CommandError(f"no running lbnode: {path} does not exist") from None
    except OSError as exc:
        sock.close()
        raise CommandError(f"no running lbnode answers at {path}: {exc.strerror or exc}") from None
    return sock


def _read_line(sock: stdsocket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        if fds is not None:
            data, got, _flags, _addr = stdsocket.recv_fds(sock, 65536, MAX_FDS)
            fds.extend(got)
        else:
            data = sock.recv(65536)
        if not data:
            raise CommandError("the running lbnode closed the command socket without an answer")
        buf += data
        if len(buf) > MAX_MESSAGE:
            raise CommandError("the running lbnode's answer is too long")
    return dict(json.loads(buf))


def _send(sock: stdsocket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def request(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    """Send one command, return the node's answer (``ok``, ``message``)."""
    with connect(path) as sock:
        try:
            _send(sock, message)
            return _read_line(sock)
        except TimeoutError:
            raise CommandError(f"the running lbnode did not answer within {REPLY_TIMEOUT:g}s") from None


@dataclass
class Takeover:
    """A new process's side of a hand-over: the running node's sockets, then ``finish``
    (the old one drains and exits) once this one serves them."""

    conn: stdsocket.socket
    listeners: dict[str, stdsocket.socket]  # reloadplan.socket_key -> listening socket
    admin: stdsocket.socket | None
    admin_bind: str | None
    pid: int
    lock: IO[str] | None = None  # the running node's state_dir lock (same open file: the flock is ours too)
    used: set[str] = field(default_factory=set)
    # [cluster]: the running node's Trio clock offset (HandoverClock), its node id and etcd prefix,
    # its claimer heartbeat socket and its VIP guards' pipes (cluster["guarded"]: the VIPs they cover)
    clock_offset: float | None = None
    cluster: dict[str, Any] | None = None
    heartbeat: stdsocket.socket | None = None
    guard_pipes: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, path: Path) -> Takeover:
        conn = connect(path)
        fds: list[int] = []
        try:
            _send(conn, {"command": "takeover"})
            answer = _read_line(conn, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            conn.close()
            raise
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            conn.close()
            raise CommandError(str(answer.get("message", "takeover refused")))
        names: list[str] = list(answer["sockets"])
        if len(fds) != len(names):
            for fd in fds:
                os.close(fd)
            conn.close()
            raise CommandError(f"takeover: {len(fds)} descriptors received for {len(names)} sockets")
        by_fd = dict(zip(names, fds, strict=True))
        lock_fd = by_fd.pop("lock", None)
        lock = os.fdopen(lock_fd, "r+") if lock_fd is not None else None
        guard_pipes = [by_fd.pop(name) for name in names if name.startswith("vipguard")]
        heartbeat_fd = by_fd.pop("heartbeat", None)
        heartbeat = stdsocket.socket(fileno=heartbeat_fd) if heartbeat_fd is not None else None
        by_key = {name: stdsocket.socket(fileno=fd) for name, fd in by_fd.items()}
        for s in by_key.values():
            s.setblocking(False)
        admin = by_key.pop("admin", None)
        clock = answer.get("clock")
        cluster = answer.get("cluster")
        return cls(conn, by_key, admin, answer.get("admin_bind"), int(answer.get("pid", 0)), lock,
                   clock_offset=float(clock) if isinstance(clock, int | float) else None,
                   cluster=cluster if isinstance(cluster, dict) else None, heartbeat=heartbeat, guard_pipes=guard_pipes)

    def cluster_mismatch(self, node_id: str, prefix: str, vips: bool) -> str | None:
        """Why this process cannot go on as the running node's cluster member (None: it can).
        Another id or etcd prefix would be a second member registering beside it; VIPs added
        or removed with the takeover would leave held addresses without a claimer."""
        assert self.cluster is not None
        theirs = (self.cluster.get("node"), self.cluster.get("prefix"))
        if theirs != (node_id, prefix):
            return (f"node.id and cluster.prefix ({node_id!r}, {prefix!r}) must stay those of the running node "
                    f"{theirs!r} to take over its cluster membership: restart the node to change them")
        if bool(self.cluster.get("vips")) != vips:
            return ("cluster.vips: a takeover cannot add the first VIP or remove the last one (the running node's "
                    "claimer hands over to this one's): restart the node to change that")
        return None

    def release_cluster(self) -> dict[str, Any]:
        """The running node stops acting as the cluster member (keepalives, heartbeats, VIP
        claims) without revoking its lease or removing its VIPs, and answers with what this
        process needs to go on as the same member: ``{"agent": ..., "vips": ...}``."""
        try:
            _send(self.conn, {"command": "release-cluster"})
            answer = _read_line(self.conn)
        except TimeoutError:
            raise CommandError(f"the running lbnode did not answer release-cluster within {REPLY_TIMEOUT:g}s") from None
        except OSError as exc:  # it died (kill -9): the connection is reset or the pipe broken
            raise CommandError(f"the running lbnode went away before answering release-cluster "
                               f"({exc.strerror or exc})") from None
        if not answer.get("ok"):
            raise CommandError(str(answer.get("message")))
        return dict(answer.get("state") or {})

    def take(self, key: str) -> stdsocket.socket | None:
        """The running node's socket for this listener (``reloadplan.socket_key``), if it had one."""
        sock = self.listeners.get(key)
        if sock is not None:
            self.used.add(key)
        return sock

    def close_unused(self) -> list[str]:
        """Our copies of the sockets no listener here takes (the old node closes its own after
        its drain: the address stops listening then)."""
        unused = [k for k in self.listeners if k not in self.used]
        for k in unused:
            self.listeners.pop(k).close()
        return unused

    def release_control(self) -> None:
        """The running node stops its control API (we bind its port and read the store next)."""
        _send(self.conn, {"command": "release-control"})
        answer = _read_line(self.conn)
        if not answer.get("ok"):
            raise CommandError(str(answer.get("message")))

    def hold_lock(self) -> IO[str] | None:
        """Keep the state_dir lock for this process: its pid in the lock file."""
        if self.lock is not None:
            self.lock.seek(0)
            self.lock.truncate()
            self.lock.write(f"{os.getpid()}\n")
            self.lock.flush()
        return self.lock

    def finish(self) -> None:
        """We serve: the old node stops accepting, finishes what it has, and exits."""
        try:
            _send(self.conn, {"command": "drain"})
            answer = _read_line(self.conn)
        finally:
            self.conn.close()
        if not answer.get("ok"):
            raise CommandError(str(answer.get("message")))

    def abandon(self) -> None:
        """This process failed to start: the old node goes on as if nothing happened."""
        for s in self.listeners.values():
            s.close()
        if self.admin is not None:
            self.admin.close()
        if self.lock is not None:
            self.lock.close()
        if self.heartbeat is not None:
            self.heartbeat.close()
        for fd in self.guard_pipes:
            os.close(fd)
        self.guard_pipes = []
        self.conn.close()


class HandoverClock(trio.abc.Clock):
    """Trio's clock (``perf_counter``, CLOCK_MONOTONIC on Linux, one for the whole host) with
    the offset of the process taken over: the times the old process handed over (lease
    expiry, heartbeat echoes and send times, fencing deadlines) mean the same here, and the
    heartbeats this process sends go on rising where the old one's stopped (its peers drop
    a send time that is not above the last one as a replay). Trio's own clock starts at a
    random offset per process."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self.offset + time.perf_counter()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - self.current_time()


def clock_offset() -> float:
    """This process's Trio clock offset (what a new process's ``HandoverClock`` takes)."""
    return trio.current_time() - time.perf_counter()


# --------------------------------------------------------------------------- server (Trio)

# A command's handler: the request, and the connection to answer on (``answer``, with
# descriptors for a takeover) and to read the rest of the conversation from (``next_line``).
Command = Callable[[dict[str, Any], "CommandConn"], Awaitable[None]]


class CommandConn:
    """One client of the command socket, on the node's side."""

    def __init__(self, sock: stdsocket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def peer_pid(self) -> int | None:
        """The client's pid (SO_PEERCRED), to name a takeover in progress; None if unknown."""
        try:
            cred = self.sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid: int = struct.unpack("3i", cred)[0]
        return pid or None

    async def next_line(self) -> dict[str, Any] | None:
        """The next JSON line, or None when the client closed."""
        while b"\n" not in self._buf:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return None
            self._buf += data
            if len(self._buf) > MAX_MESSAGE:
                return None
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            out = json.loads(line)
        except ValueError:
            return None
        return out if isinstance(out, dict) else None

    async def answer(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        if fds:
            await trio.lowlevel.wait_writable(self.sock)
            sent = stdsocket.send_fds(self.sock, [data], fds)  # the descriptors go with the first bytes
            data = data[sent:]
        while data:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                continue


class CommandSocket:
    """The listening command socket in state_dir; removed at the end unless a new process
    has taken the path over meanwhile (it binds its own there)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: stdsocket.socket | None = None
        self._inode: int | None = None

    def bind(self, *, replace_live: bool) -> bool:
        """Bind; False (and a warning) when another live node answers there and ``replace_live``
        is not set (two nodes started in one state_dir: the first keeps it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            log.warning("command socket %s: cannot create its directory (%s): `lbnode reload` will not reach "
                        "this node; SIGHUP still reloads it", self.path, exc.strerror or exc)
            return False
        if self.path.exists() or self.path.is_symlink():
            if not replace_live and _answers(self.path):
                log.warning("command socket %s belongs to another running lbnode: `lbnode reload` will not "
                            "reach this one (give each node its own [node] state_dir); SIGHUP still reloads it",
                            self.path)
                return False
            self.path.unlink(missing_ok=True)
        sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            with _short(self.path) as where:
                sock.bind(where)
        except OSError as exc:
            sock.close()
            log.warning("command socket %s: cannot bind (%s): `lbnode reload` will not reach this node",
                        self.path, exc.strerror or exc)
            return False
        finally:
            os.umask(old_umask)
        sock.listen(8)
        sock.setblocking(False)
        self.sock = sock
        self._inode = os.stat(self.path).st_ino
        return True

    async def serve(self, handle: Command) -> None:
        assert self.sock is not None
        async with trio.open_nursery() as clients:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                clients.start_soon(self._client, handle, conn)

    @staticmethod
    async def _client(handle: Command, sock: stdsocket.socket) -> None:
        with sock:
            conn = CommandConn(sock)
            request = await conn.next_line()
            if request is not None:
                try:
                    await handle(request, conn)
                except OSError as exc:
                    log.warning("command socket: client went away (%s)", exc)

    def close(self) -> None:
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
            self.path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    try:
        connect(path, timeout=1.0).close()
    except CommandError:
        return False
    return True
