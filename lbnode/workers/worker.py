"""A worker process: ``python -m lbnode.workers.worker FD LOG_LEVEL``.

Serves the node's listeners on the sockets the supervisor passed over the socket pair
``FD`` (one trio.run, one thread), from its own ``Snapshot`` built from what the supervisor
sends: pools and certificates (CONFIG) and the backends' health (HEALTH). A reload (RELOAD)
brings node.toml's new text and the sockets of the listeners it adds: the worker swaps its
handlers as a single process does (``LbNode._take_plan``). It never waits on
the supervisor: a request is served from the last snapshot. It answers counter requests
(``lbnode.workers.counters``) and drains on DRAIN, on SIGTERM/SIGINT, or when the supervisor
is gone (its end of the pair closed): a worker left without a supervisor would hold the
ports of the node that replaces it.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import socket as stdsocket
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from lbnode import stopsignals
from lbnode.cluster.certstore import certificate_from_document
from lbnode.config import load_config
from lbnode.listen import _FILTERED, Bound
from lbnode.model import (
    Config,
    ConfigError,
    ConfigFileError,
    Listener,
    parse_config,
    pool_from_dict,
)
from lbnode.node import LbNode
from lbnode.reloadplan import plan_reload
from lbnode.runtime import Snapshot
from lbnode.workers.affinity import TOUCH_INTERVAL, WorkerAffinity
from lbnode.workers.channel import Channel, Kind, Message
from lbnode.workers.counters import counters_document
from lbnode.workers.shares import worker_config

log = logging.getLogger("lbnode.worker")

# Imported before the worker waits for HELLO, so that a spare serves at once: the handlers'
# modules the node imports only when a listener needs them.
# How often a worker looks for backends its passive checks ejected (and tells the supervisor).
EJECTION_SCAN = 0.05

WARM_MODULES = ("lbnode.proxyaccept", "lbnode.tcp.proxy", "lbnode.tls.terminate")


class WorkerNode(LbNode):
    """The data-plane half of an ``LbNode``: no store, agent, checkers or admin endpoint."""

    def __init__(self, config: Config, index: int, workers: int) -> None:
        self.base = config  # node.toml as the worker read it: the listeners and node settings
        self.index = index
        self.workers = workers
        super().__init__(worker_config(config, workers))
        # Affinity tables kept in step with the other workers' through the supervisor.
        self.worker_affinity = WorkerAffinity(Path(config.node.state_dir))
        self.reported_ejections: dict[tuple[str, str], float] = {}  # (pool, backend) -> ejected_until told
        self.reported_runs: dict[tuple[str, str], int] = {}  # (pool, backend) -> failures in a row told
        self._snapshot = Snapshot.build(self.config, shared_affinity=self.worker_affinity)

    def apply(self, config: Config) -> None:
        """``LbNode.apply`` for a worker: its pools' affinity tables are broadcast ones."""
        self.config = config
        self._snapshot = Snapshot.build(config, self._snapshot, shared_affinity=self.worker_affinity)
        log.info("configuration version %d applied", self._snapshot.version)

    def apply_message(self, body: dict[str, Any]) -> None:
        """CONFIG: the pools and certificates the supervisor serves, each worker's share of the limits."""
        self.worker_affinity.use_cookie_keys(body.get("cookie_keys"))
        self.use_ticket_key_hex(body.get("ticket_key"))
        self.apply(self._served(self.base, body))
        self.set_health(body.get("health", []))

    def use_ticket_key_hex(self, key: str | None) -> None:
        """CONFIG and TICKET_KEY: the session ticket key the supervisor gives every worker."""
        self.use_ticket_key(None if key is None else bytes.fromhex(key))

    def _served(self, base: Config, body: dict[str, Any]) -> Config:
        """``base`` (node.toml) with the pools and certificates of a CONFIG or RELOAD body, as
        this worker's share."""
        pools = tuple(pool_from_dict(p, f"pools[{i}]") for i, p in enumerate(body["pools"]))
        certificates = tuple(certificate_from_document(c, c["name"]) for c in body["certificates"])
        return worker_config(replace(base, pools=pools, certificates=certificates), self.workers)

    def reload_message(self, body: dict[str, Any], fds: list[int]) -> str | None:
        """RELOAD: node.toml's new text (checked by the supervisor) and the added listeners'
        sockets. The same plan as the supervisor's, carried out here: added listeners served
        on the sockets received, changed ones swapped on theirs, removed ones stop accepting
        (what is queued is taken) and finish in flight. None, or why it could not be applied
        (the supervisor then restarts this worker, which starts on the new state)."""
        received = {}
        for name, fd in zip(body.get("listeners", []), fds, strict=False):
            received[name] = stdsocket.socket(fileno=fd)
        for fd in fds[len(received):]:
            os.close(fd)
        bound: list[tuple[Listener, stdsocket.socket]] = []
        try:
            if self.draining:
                return None  # stopping anyway: nothing new to accept on
            base = checked_text(str(body["config_text"]), str(body["config_path"]))
            config = self._served(base, body)
            plan = plan_reload(self.config, config)
            for li in plan.added:
                sock = received.pop(li.name, None)
                if sock is None:  # (a worker whose HELLO came after the reload plans no addition)
                    raise ValueError(f"listener {li.name}: added by the reload, but no socket came with it")
                bound.append((li, _listening(sock, config)))
            self.base = base
            self.worker_affinity.use_cookie_keys(body.get("cookie_keys"))
            self.use_ticket_key_hex(body.get("ticket_key"))  # (before the added listeners are made)
            self.apply(config)
            self._take_plan(config, plan, bound)
            bound = []  # the listener set owns them now
            self.set_health(body.get("health", []))
            log.info("worker %d: %s", self.index, plan.summary())
            return None
        except Exception as exc:  # reported: the supervisor restarts this worker on the new state
            log.exception("worker %d: the reload could not be applied", self.index)
            return f"{type(exc).__name__}: {exc}"
        finally:
            for sock in [*received.values(), *(s for _, s in bound)]:
                sock.close()

    def drain_after(self, handed_over: bool) -> None:
        """DRAIN; ``handed_over``: a new node serves these sockets (``lbnode run --takeover``),
        so idle keep-alive connections are not closed under clients that may be sending."""
        self._handed_over = handed_over
        self.stop()

    def set_health(self, entries: list[list[Any]]) -> None:
        """HEALTH: ``[pool, backend, health, reason, up_for]`` as the supervisor's checkers decided."""
        now = trio.current_time()
        for pool_name, backend_id, health, reason, up_for in entries:
            pool = self.snapshot.pools.get(pool_name)
            if pool is None:
                continue
            for b in pool.backends:
                if b.id == backend_id and (b.health, b.health_reason) != (health, reason):
                    # up_for: slow start resumes where the supervisor's ramp is, not from zero
                    pool.health_changed(backend_id, health, reason, now - float(up_for or 0.0))

    def set_ejected(self, entries: list[list[Any]]) -> None:
        """``[pool, backend, seconds]``: another worker ejected the backend (passive checks)."""
        now = trio.current_time()
        for pool_name, backend_id, seconds in entries:
            pool = self.snapshot.pools.get(pool_name)
            if pool is None:
                continue
            for b in pool.backends:
                if b.id == backend_id and now + seconds > b.ejected_until:
                    b.ejected_until = now + seconds
                    self.reported_ejections[(pool_name, backend_id)] = b.ejected_until  # not sent back
                    if pool.outlier is not None:  # this worker's run restarts from zero, as the others'
                        pool.outlier.adopt_ejection(backend_id, b.ejected_until, now)

    def new_ejections(self) -> list[list[Any]]:
        """Backends this worker's passive checks ejected since the last look: [pool, backend, seconds]."""
        now = trio.current_time()
        out: list[list[Any]] = []
        for name, pool in self.snapshot.pools.items():
            for b in pool.backends:
                until = b.ejected_until
                if until > now and self.reported_ejections.get((name, b.id)) != until:
                    self.reported_ejections[(name, b.id)] = until
                    out.append([name, b.id, until - now])
        return out


    def changed_runs(self) -> list[list[Any]]:
        """[pool, backend, failures in a row] for each run that changed since the last look: the
        supervisor adds up every worker's (``lbnode.workers.outliers``)."""
        out: list[list[Any]] = []
        for name, pool in self.snapshot.pools.items():
            if pool.outlier is None:
                continue
            for b in pool.backends:
                run = pool.outlier.failures(b.id)
                if self.reported_runs.get((name, b.id), 0) != run:
                    self.reported_runs[(name, b.id)] = run
                    out.append([name, b.id, run])
        return out


async def serve(fd: int) -> int:
    channel = Channel(stdsocket.socket(fileno=fd))
    await channel.send(Kind.READY, {"idle": True})  # imports done: as a spare, it can take a slot at once
    hello = await channel.receive()
    if hello is None:
        return 0  # a spare the supervisor no longer needs
    if hello.kind != Kind.HELLO:
        log.error("worker: the supervisor sent %s before HELLO", hello.kind.name)
        return 1
    index, workers = int(hello.body["index"]), int(hello.body["workers"])
    for handler in logging.getLogger().handlers:  # which worker wrote a line, in the node's log
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s"))
    text = hello.body.get("config_text")
    path = Path(hello.body["config_path"])
    # The text the supervisor checked (the file may have been edited since); the file itself
    # only from a supervisor that sends none.
    base = checked_text(text, str(path)) if isinstance(text, str) else load_config(path)
    node = WorkerNode(base, index, workers)
    first = await channel.receive()
    if first is None or first.kind != Kind.CONFIG:
        log.error("worker %d: the supervisor sent no configuration", index)
        return 1
    node.apply_message(first.body)
    # As lbnode run does: what is loaded lives as long as the process, and a request allocates
    # a few hundred objects (the default gen-0 threshold would collect every couple of requests).
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    sockets = _listening_sockets(node.config, hello)
    node.bound = Bound(listeners={li.name: s.getsockname()[:2] for li, s in sockets}, admin=None)
    for writer in node.access_log_writers:
        writer.open()
    async with trio.open_nursery() as outer:
        await outer.start(_watch_signals, node)  # before the listeners serve
        access_log_scope = trio.CancelScope()
        if node.access_log_writers:
            outer.start_soon(node._run_access_logs, access_log_scope)
        async with trio.open_nursery() as serving:
            await serving.start(node._serve_listeners, sockets, outer, None)
            # Messages wait in the pair until the listeners serve (a RELOAD needs them).
            for task in (_follow_supervisor, _send_learned, _send_touched, _send_ejections):
                outer.start_soon(_until_the_pair_breaks, task, channel, node)
            await channel.send(Kind.READY, {"index": index, "pid": os.getpid()})
        # drained: every connection has finished (or drain_timeout passed)
        access_log_scope.cancel()
        await node._flush_access_logs()
        node.upstreams.close()
        outer.cancel_scope.cancel()
    channel.close()
    log.info("worker %d: stopped", index)
    return 0


def checked_text(text: str, origin: str) -> Config:
    """node.toml's text as the supervisor read and checked it, parsed only: the files it names
    are not read again here (certificates come in CONFIG, the admin token is the supervisor's),
    so a file moved since the check cannot stop a worker, nor make a restarted one crash-loop."""
    try:
        return parse_config(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise ConfigFileError(f"{origin}: {exc}") from None


def _listening_sockets(config: Config, hello: Message) -> list[tuple[Listener, stdsocket.socket]]:
    names = hello.body["listeners"]
    by_name = {li.name: li for li in config.listeners}
    return [(by_name[name], _listening(stdsocket.socket(fileno=fd), config))
            for name, fd in zip(names, hello.fds, strict=True)]


def _listening(sock: stdsocket.socket, config: Config) -> stdsocket.socket:
    """A listening socket received from the supervisor, ready for this worker's accept loop."""
    sock.setblocking(False)
    if config.cluster is not None and config.cluster.vips:
        # The supervisor filters these sockets while VIPs move; the filter it attaches is
        # copied into what we accept, so our accept path takes it off (listen._unfilter).
        _FILTERED.add(sock.fileno())
    return sock


async def _until_the_pair_breaks(
    task: Callable[[Channel, WorkerNode], Awaitable[None]], channel: Channel, node: WorkerNode,
) -> None:
    """A task on the socket pair; the pair broken means the supervisor is gone: drain."""
    try:
        await task(channel, node)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if not node.draining:
            log.warning("worker %d: the supervisor's socket pair broke (%s): draining", node.index, exc)
        node.stop()


async def _follow_supervisor(channel: Channel, node: WorkerNode) -> None:
    while True:
        message = await channel.receive()
        if message is None:
            if not node.draining:
                log.warning("worker %d: the supervisor is gone: draining", node.index)
            node.stop()
            return
        if message.kind == Kind.CONFIG:
            node.apply_message(message.body)
        elif message.kind == Kind.HEALTH:
            node.set_health(message.body.get("health", []))
            node.set_ejected(message.body.get("ejected", []))
        elif message.kind == Kind.DRAIN:
            node.drain_after(bool(message.body.get("handed_over")))
        elif message.kind == Kind.RELOAD:
            error = node.reload_message(message.body, message.fds)
            await channel.send(Kind.RELOADED, {"id": message.body["id"], "error": error})
        elif message.kind == Kind.AFFINITY:
            node.worker_affinity.adopt(message.body.get("set", []), message.body.get("touched", []),
                                       trio.current_time(), message.body.get("forget", []))
        elif message.kind == Kind.COOKIE_KEY:
            node.worker_affinity.use_cookie_keys(message.body.get("keys"))
        elif message.kind == Kind.TICKET_KEY:
            node.use_ticket_key_hex(message.body.get("key"))
        elif message.kind == Kind.COUNTERS:
            await channel.send(Kind.COUNTERS, {"id": message.body["id"], **counters_document(node)})


async def _send_learned(channel: Channel, node: WorkerNode) -> None:
    """Affinity entries this worker placed, to the supervisor: batched per loop turn."""
    affinity = node.worker_affinity
    while True:
        await affinity.wakeup.wait()
        await trio.lowlevel.checkpoint()  # the other requests of this turn join the batch
        await channel.send(Kind.OBSERVATION, {"affinity": affinity.take()})


async def _send_touched(channel: Channel, node: WorkerNode) -> None:
    """Keys served from this worker's tables, once per TOUCH_INTERVAL, so copies elsewhere live on."""
    affinity = node.worker_affinity
    while True:
        await trio.sleep(TOUCH_INTERVAL)
        if affinity.touched:
            await channel.send(Kind.OBSERVATION, {"touched": affinity.take_touched()})


async def _send_ejections(channel: Channel, node: WorkerNode) -> None:
    """Backends this worker ejected (outlier detection, failed connects), to the supervisor,
    which has every other worker eject them too; and the runs of failures that changed, which
    the supervisor adds up over the workers. A look every EJECTION_SCAN: the data path is not
    changed to report them, and a scan of a few hundred backends is microseconds."""
    while True:
        await trio.sleep(EJECTION_SCAN)
        ejected, runs = node.new_ejections(), node.changed_runs()
        if ejected or runs:
            await channel.send(Kind.OBSERVATION, {"ejected": ejected, "runs": runs})


async def _watch_signals(node: WorkerNode, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    # SIGINT too: a Ctrl-C in a terminal reaches the whole process group, and the supervisor
    # drains its workers itself (DRAIN). SIGHUP likewise (`kill -HUP -PGID`): the supervisor
    # reloads and sends the workers the result (RELOAD); its default action would kill us.
    with stopsignals.receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGUSR1:
                node.reopen_access_logs()
            elif signum == signal.SIGTERM:
                node.stop()


def main(argv: list[str]) -> int:
    fd, level = int(argv[0]), argv[1] if len(argv) > 1 else "INFO"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in WARM_MODULES:
        importlib.import_module(name)
    return trio.run(serve, fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
