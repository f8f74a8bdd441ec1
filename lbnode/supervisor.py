"""The supervisor of a node with ``[node] workers`` >= 2 (issue 13, docs/architecture.md).

An ``LbNode`` that keeps what must exist once per node (the cluster agent, store follower,
health checkers, VIP claimer, control API and admin endpoint) and hands its listening
sockets to N worker processes instead of accepting on them. Owns the workers' lives:
spawned (not forked) at start, restarted at once when one dies (with the same sockets and
the current configuration), drained on SIGTERM or ``lbctl nodes drain``. State flows one
way: configuration, health verdicts, the affinity entries other nodes write or delete and
the cluster's cookie key go out to every worker when they change; counters
come back when a reader asks (``/metrics``, ``/status``, ``lbctl status`` add them up).
"""

from __future__ import annotations

import logging
import math
import os
import socket as stdsocket
import sys
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lbnode.affinity import CookieKeyring
from lbnode.cluster.certstore import certificate_document
from lbnode.config import load_config, read_config_text
from lbnode.health.state import Transition
from lbnode.listen import Bound
from lbnode.model import Config, ConfigFileError, Listener, pool_to_dict
from lbnode.node import LbNode, has_tls_listener
from lbnode.reloadplan import ReloadRefused, socket_key
from lbnode.tls.ticketkeys import TICKET_KEY_BYTES, TICKET_KEY_LIFETIME
from lbnode.workers.channel import Channel, Kind, Message
from lbnode.workers.counters import Retired, add_up, add_up_listeners, merge_metrics
from lbnode.workers.outliers import NodeRuns

if TYPE_CHECKING:
    from lbnode.handover import Takeover

log = logging.getLogger("lbnode.supervisor")

# A worker that dies is started again at once; one that dies this soon after its start
# (a crash at start-up, say) is started again after RESTART_BACKOFF, so a crash loop does
# not spin a core. Both well under the "restarted within 1 s".
QUICK_DEATH = 1.0
RESTART_BACKOFF = 0.5
# How long a reader of the counters (a scrape, /status, lbctl status) waits for a worker's
# answer: a worker answers between two requests it serves, in well under a millisecond
# unloaded; one that does not answer within this is left out of that read (logged).
COUNTERS_TIMEOUT = 1.0
# How long a reload waits for every worker to say it applied the new file (RELOADED): a
# worker parses the file and builds its snapshot and handlers between two requests, in
# milliseconds; a worker that has not answered within this is named in the reload's answer.
RELOAD_TIMEOUT = 5.0
# After drain_timeout the workers have closed what was still in flight; this much more for
# them to flush their access logs and exit before they are killed.
EXIT_GRACE = 5.0


# A message waiting for a worker: its type, body and the sockets that go with it.
Outgoing = tuple[Kind, dict[str, Any], list[stdsocket.socket]]


class WorkerStartError(Exception):
    """A worker exited before it served: the node does not start (its log says why)."""


class WorkerHandle:
    """One worker slot: the process in it now, and the messages waiting to go to it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.pid: int | None = None
        self.ready = trio.Event()  # set once, when the first process in this slot served
        self.serving = False  # the current process has said READY
        self.restarts = 0  # processes started in this slot after one died
        self._outbox: trio.MemorySendChannel[Outgoing] | None = None
        self._pending: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}

    def post(self, kind: Kind, body: dict[str, Any], sockets: list[stdsocket.socket] | None = None) -> None:
        """Queue a message for the current process (dropped if there is none: a new one
        gets the whole current state at its start). ``sockets`` go with it (SCM_RIGHTS):
        copies (``dup``) that are this message's own, closed once sent or dropped."""
        if self._outbox is not None:
            try:
                self._outbox.send_nowait((kind, body, sockets or []))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        for sock in sockets or []:
            sock.close()

    def expect(self, request_id: int) -> None:
        """An answer (COUNTERS, RELOADED) matched by ``id`` is awaited: register before posting."""
        self._pending[request_id] = (trio.Event(), [])

    async def answer(self, request_id: int, timeout: float) -> dict[str, Any] | None:
        """The answer to ``request_id``; None if the process died or did not answer in time."""
        pending = self._pending.get(request_id)
        if pending is None:
            return None
        with trio.move_on_after(timeout):
            await pending[0].wait()
        self._pending.pop(request_id, None)
        first: dict[str, Any] | None = pending[1][0] if pending[1] else None
        return first

    async def counters(self, request_id: int) -> dict[str, Any] | None:
        if self._outbox is None or not self.serving:
            return None
        self.expect(request_id)
        self.post(Kind.COUNTERS, {"id": request_id})
        answer = await self.answer(request_id, COUNTERS_TIMEOUT)
        if answer is None and self.serving:  # (not serving: it died meanwhile)
            log.warning("worker %d did not answer a counters request within %gs", self.index, COUNTERS_TIMEOUT)
        return answer

    def gone(self) -> None:
        """The process closed its end: nobody waits for its answers (a reader of /status must
        not wait COUNTERS_TIMEOUT on a worker that is dead)."""
        self.serving = False
        for event, _ in self._pending.values():
            event.set()

    def answered(self, body: dict[str, Any]) -> None:
        pending = self._pending.get(int(body.get("id", -1)))
        if pending is not None:
            pending[1].append(body)
            pending[0].set()


class Supervisor(LbNode):
    """``lbnode run`` with ``[node] workers`` >= 2: everything but the data plane, and N workers."""

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.log_level = "INFO"
        self.worker_count = max(2, config.node.workers)
        self.workers = [WorkerHandle(i) for i in range(self.worker_count)]
        self.restarts = 0  # workers started again after they died
        self._stopping = False
        self._request_ids = count(1)
        self._worker_metrics: list[str] = []
        self._last_counters: list[dict[str, Any] | None] = []
        self._retired = Retired()  # what dead workers had counted, as last read
        self.worker_queues: dict[str, int] = {}
        # /status's and the page's listener counters (connections, TLS, access log): the
        # workers', summed at each read.
        self.worker_listeners: dict[str, dict[str, Any]] = {}
        self.worker_connections_open: int | None = None  # /status's node total: the workers' sum
        self._spare: tuple[trio.Process, Channel] | None = None
        self.spare_ready = False  # the spare has imported everything and waits for a slot
        self._spare_wait = trio.CancelScope()
        self._slots: trio.Nursery | None = None
        # The listening sockets every worker serves now (a reload changes them): what HELLO
        # sends a worker started later, and what a takeover hands over.
        self._sockets: list[tuple[Listener, stdsocket.socket]] = []
        # node.toml as last read and checked (at start by `lbnode run`, then by each reload):
        # the workers parse this text, never the file again (an edit not yet reloaded, or
        # made while they start, would split them from the supervisor and each other).
        self.config_text: str | None = None
        self._serving = False  # every worker has served once: reload and takeover may begin
        self._runs = NodeRuns()  # each worker's passive failures in a row, added up per backend
        # What etcd showed of the affinity tables since the last relay to the workers, by
        # (pool, key): an entry this node did not choose (other nodes'), or None once etcd
        # deleted one this node held. The last word per key is what goes.
        self._from_cluster: dict[tuple[str, str], str | None] = {}
        self._from_cluster_wake = trio.Event()
        if self.affinity is not None:
            self.affinity.on_learned(self._learned_from_cluster)
            self.affinity.on_forgotten(self._forgotten_in_cluster)
            self.affinity.on_cookie_key(self._tell_cookie_keys)

    # ----------------------------------------------------------- state to the workers
    def apply(self, config: Config) -> None:
        super().apply(config)
        body = self._config_body()
        for w in self.workers:
            w.post(Kind.CONFIG, body)

    def _config_body(self) -> dict[str, Any]:
        return {
            "version": self.snapshot.version,
            "pools": [pool_to_dict(p) for p in self.config.pools],
            "certificates": [certificate_document(c) for c in self.config.certificates],
            "health": self._health_entries(),
            # a cluster's cookie keys (a standalone node's is in state_dir, which workers read)
            "cookie_keys": self._cookie_keys(),
            "ticket_key": None if self.ticket_key is None else self.ticket_key.hex(),
        }

    def _cookie_keys(self) -> list[str] | None:
        """The cluster's cookie key in use, then the keys it replaced (hex), for the workers."""
        return [k.hex() for k in self.affinity.cookie_keyring().keys()] if self.affinity is not None else None

    def _tell_cookie_keys(self, keyring: CookieKeyring) -> None:
        """The cluster key switched or was rotated (no configuration change): every worker
        seals under the new key at once; a worker started later gets the keys in CONFIG."""
        body = {"keys": [k.hex() for k in keyring.keys()]}
        for w in self.workers:
            w.post(Kind.COOKIE_KEY, body)

    def use_ticket_key(self, key: bytes | None) -> None:
        """The cluster's ticket key changed (or this node's own was rotated): every worker seals
        and opens session tickets with it at once, so a client resumes on any worker; a worker
        started later gets it in CONFIG."""
        super().use_ticket_key(key)
        body = {"key": None if key is None else key.hex()}
        for w in self.workers:
            w.post(Kind.TICKET_KEY, body)

    def _share_ticket_keys(self, nursery: trio.Nursery) -> None:
        """The cluster's key as a single process takes it; without a cluster, once the node has a
        TLS listener, a random key of this node's, shared by its workers (in CONFIG, RELOAD
        and TICKET_KEY) and replaced every TICKET_KEY_LIFETIME in ``nursery``."""
        super()._share_ticket_keys(nursery)
        if self.ticket_keys is None and self.ticket_key is None and has_tls_listener(self.config):
            self.use_ticket_key(os.urandom(TICKET_KEY_BYTES))
            nursery.start_soon(self._rotate_own_ticket_key)

    async def _rotate_own_ticket_key(self) -> None:
        """Without a cluster: this node's random ticket key, shared by its workers, is replaced
        every TICKET_KEY_LIFETIME (tickets sealed under the one before get full handshakes)."""
        while True:
            await trio.sleep(TICKET_KEY_LIFETIME)
            self.use_ticket_key(os.urandom(TICKET_KEY_BYTES))

    def _health_entries(self, only: tuple[str, str] | None = None) -> list[list[Any]]:
        now = trio.current_time()
        out: list[list[Any]] = []
        for name, pool in self.snapshot.pools.items():
            for b in pool.backends:
                if only is None or only == (name, b.id):
                    up_for = now - b.up_since if b.up_since is not None else 0.0
                    out.append([name, b.id, b.health, b.health_reason, up_for])
        return out

    def _tell_health(self, pool_name: str, backend_id: str) -> None:
        body = {"health": self._health_entries((pool_name, backend_id))}
        for w in self.workers:
            w.post(Kind.HEALTH, body)

    def _transition_for(self, pool_name: str) -> Any:
        inner = super()._transition_for(pool_name)

        def on_transition(backend_id: str, t: Transition) -> None:
            inner(backend_id, t)
            self._tell_health(pool_name, backend_id)

        return on_transition

    def _on_verdict(self, pool_name: str, backend_id: str, up: bool, reason: str) -> None:
        super()._on_verdict(pool_name, backend_id, up, reason)
        self._tell_health(pool_name, backend_id)

    def _observed(self, sender: WorkerHandle, body: dict[str, Any]) -> None:
        """Affinity entries a worker learned: the first writer wins here (this node's table,
        etcd's in a cluster) and what stands goes to every worker; keys in use on one worker
        are kept alive here and on the others."""
        now = trio.current_time()
        stand: list[list[str]] = []
        for pool_name, key, backend_id, op in body.get("affinity", []):
            table = self._affinity_table(pool_name)
            if table is None:
                continue
            # What stands now goes out below: an older word from etcd still waiting for the
            # relay must not follow it (a forget would drop the entry just placed).
            self._from_cluster.pop((pool_name, key), None)
            if op == "replace":
                table.replace(key, backend_id, now)
                stand.append([pool_name, key, backend_id])
            else:
                stand.append([pool_name, key, table.put_if_absent(key, backend_id, now)])
        ejected = body.get("ejected", [])
        if ejected:
            self._ejected(sender, ejected, now)
        if body.get("runs"):
            self._add_up_runs(sender, body["runs"], now)
        touched = body.get("touched", [])
        for pool_name, key in touched:
            table = self._affinity_table(pool_name)
            if table is not None:
                table.get(key, now)
        if stand:
            for w in self.workers:
                w.post(Kind.AFFINITY, {"set": stand})
        if touched:
            for w in self.workers:
                if w is not sender:
                    w.post(Kind.AFFINITY, {"touched": touched})

    def _ejected(self, sender: WorkerHandle, ejected: list[list[Any]], now: float) -> None:
        """A worker's passive checks ejected backends: every other worker ejects them for the
        same time, and this node's /status shows it."""
        for pool_name, backend_id, seconds in ejected:
            pool = self.snapshot.pools.get(pool_name)
            self._runs.clear(pool_name, backend_id)
            if pool is None:
                continue
            for b in pool.backends:
                if b.id == backend_id:
                    b.ejected_until = max(b.ejected_until, now + float(seconds))
                    if pool.outlier is not None:  # /status and /metrics count it once, here
                        pool.outlier.adopt_ejection(backend_id, b.ejected_until, now)
                    log.info("pool %s backend %s ejected for %.1fs by worker %d's passive checks: on every worker",
                             pool_name, backend_id, float(seconds), sender.index)
        for w in self.workers:
            if w is not sender:
                w.post(Kind.HEALTH, {"ejected": ejected})

    def _learned_from_cluster(self, pool_name: str, key: str, backend_id: str) -> None:
        self._from_cluster[(pool_name, key)] = backend_id
        self._from_cluster_wake.set()

    def _forgotten_in_cluster(self, pool_name: str, key: str) -> None:
        self._from_cluster[(pool_name, key)] = None
        self._from_cluster_wake.set()

    async def _relay_cluster_affinity(self) -> None:
        """Entries other nodes wrote to etcd, and entries deleted there, to every worker
        (batched per loop turn: a full read of the tables after a reconnect is one message),
        so that a client another node pinned keeps its backend on whichever worker takes its
        first connection here, and a session ended elsewhere is balanced afresh here."""
        while True:
            await self._from_cluster_wake.wait()
            await trio.lowlevel.checkpoint()  # the rest of this watch batch joins
            batch, self._from_cluster = self._from_cluster, {}
            self._from_cluster_wake = trio.Event()
            body: dict[str, list[list[str]]] = {
                "set": [[pool, key, b] for (pool, key), b in batch.items() if b is not None],
                "forget": [[pool, key] for (pool, key), b in batch.items() if b is None],
            }
            for w in self.workers:
                w.post(Kind.AFFINITY, body)

    def _affinity_entries(self) -> list[list[str]]:
        """Every entry standing in this node's tables: a worker that starts gets them all."""
        now = trio.current_time()
        out: list[list[str]] = []
        for name, pool in self.snapshot.pools.items():
            table = pool.stickiness.table if pool.stickiness is not None else None
            if table is not None:
                out.extend([name, key, backend_id] for key, backend_id in table.items(now))
        return out

    def _add_up_runs(self, sender: WorkerHandle, runs: list[list[Any]], now: float) -> None:
        """A worker's runs of failures: ejected on every worker when the workers' runs add up to
        ``consecutive_failures`` (``lbnode.workers.outliers``: the bound is documented there)."""
        for pool_name, backend_id, run in runs:
            total = self._runs.report(sender.index, pool_name, backend_id, int(run))
            pool = self.snapshot.pools.get(pool_name)
            if pool is None or pool.outlier is None:
                continue
            until = pool.outlier.record_run(backend_id, total, now)
            if until is None:
                continue
            self._runs.clear(pool_name, backend_id)
            for b in pool.backends:
                if b.id == backend_id:
                    b.ejected_until = until
            log.warning("pool %s backend %s ejected for %.1fs on every worker: %d consecutive failures over "
                        "the workers", pool_name, backend_id, until - now, total)
            for w in self.workers:
                w.post(Kind.HEALTH, {"ejected": [[pool_name, backend_id, until - now]]})

    def _affinity_table(self, pool_name: str) -> Any:
        pool = self.snapshot.pools.get(pool_name)
        return pool.stickiness.table if pool is not None and pool.stickiness is not None else None

    # ----------------------------------------------------------- reload and takeover
    def reload(self, new: Config) -> str:
        raise ReloadRefused("a supervisor reloads from a file (reload_file): its workers read the same text")

    async def reload_file(self, path: Path) -> str:
        """``lbnode reload`` and SIGHUP with workers: the file read and checked here, the
        listener plan carried out on this process's sockets (added ones bound first, removed
        ones closed here once every worker has its own copy), then every worker sent the
        text, the configuration and the added sockets (RELOAD); each swaps its handlers as a
        single process does. Answers once every serving worker has said it applied it (or
        RELOAD_TIMEOUT passed: named in the answer). A worker that could not apply it is
        restarted, so it serves the new configuration from HELLO. Refused as a whole
        (``ReloadRefused``, one line) before anything changes: the node goes on as it was."""
        try:
            text = await trio.to_thread.run_sync(read_config_text, path)
            new = await trio.to_thread.run_sync(load_config, path, text)
        except ConfigFileError as exc:
            raise ReloadRefused(str(exc)) from None
        summary, request_id, asked = self._reload_workers(new, path, text)
        answers: dict[int, dict[str, Any] | None] = {}

        async def wait(w: WorkerHandle) -> None:
            answers[w.index] = await w.answer(request_id, RELOAD_TIMEOUT)

        async with trio.open_nursery() as nursery:
            for w in asked:
                nursery.start_soon(wait, w)
        notes = []
        for w in asked:
            answer = answers.get(w.index)
            if answer is not None and answer.get("error"):
                log.error("worker %d could not apply the reload (%s): restarting it on the new configuration",
                          w.index, answer["error"])
                notes.append(f"worker {w.index} restarted ({answer['error']})")
                if w.process is not None and w.process.returncode is None:
                    w.process.kill()
            elif answer is None and w.serving:
                notes.append(f"worker {w.index} did not confirm within {RELOAD_TIMEOUT:g}s")
        summary += f"; {len(self.workers)} workers" + "".join(f"; {n}" for n in notes)
        log.info("%s", summary)
        return summary

    def _reload_workers(self, new: Config, path: Path, text: str) -> tuple[str, int, list[WorkerHandle]]:
        """The synchronous half of a reload (nothing else runs meanwhile, so a worker started
        now gets either the old state and then this RELOAD, or the new state in its HELLO):
        plan, bind, apply here, the socket list changed, RELOAD queued for every worker."""
        plan, bound, new, pools_note = self._prepare_reload(new)
        try:
            LbNode.apply(self, new)  # not self.apply: RELOAD carries the configuration itself
        except Exception:
            for _, sock in bound:
                sock.close()
            raise
        if self._health_nursery is not None:
            self._share_ticket_keys(self._health_nursery)  # (a first TLS listener added: in RELOAD's body)
        held = {socket_key(li.name, li.bind): sock for li, sock in self._sockets}
        added = {li.name: sock for li, sock in bound}
        sockets = []
        for li in new.listeners:
            key = socket_key(li.name, li.bind)
            sockets.append((li, held.pop(key) if key in held else added[li.name]))
        self._sockets = sockets
        self.config_text = text  # SIGHUP still reads the file the node was started with
        assert self.bound is not None
        self.bound.listeners.clear()
        self.bound.listeners.update({li.name: sock.getsockname()[:2] for li, sock in sockets})
        request_id = next(self._request_ids)
        body = {"id": request_id, "config_path": str(path), "config_text": text,
                "listeners": [li.name for li, _ in bound], **self._config_body()}
        asked = []
        for w in self.workers:
            if w.serving:
                w.expect(request_id)
                asked.append(w)
            w.post(Kind.RELOAD, body, [sock.dup() for _, sock in bound])
        for sock in held.values():
            # A removed listener: each worker holds its own copy, takes what is queued and
            # closes it (the address stops listening when the last one has).
            sock.close()
        for li, _ in bound:
            log.info("listener %s: %s on %s -> pool %s", li.name, li.protocol, li.bind, li.pool)
        return f"reloaded: {plan.summary()}; {len(new.pools)} pools{pools_note}", request_id, asked

    def _accepting(self) -> bool:
        return self._serving and not self._draining

    def _listening_sockets(self) -> list[tuple[Listener, stdsocket.socket]]:
        """The sockets the workers accept on: one open file shared with every worker, so a VIP
        filter attached here (``_filter_moving_vips``) is the one their accepts see; each
        worker takes it off the connections it accepts (``listen._unfilter``). A takeover
        hands these over."""
        return list(self._sockets)

    # ----------------------------------------------------------- counters
    async def refresh_counters(self) -> None:
        """Ask every worker for its counters and write their sum into this node's snapshot
        (read by /status, lbctl status and the status page) and its /metrics text."""
        request_id = next(self._request_ids)
        answers: list[dict[str, Any] | None] = [None] * len(self.workers)

        async def ask(i: int, w: WorkerHandle) -> None:
            answers[i] = await w.counters(request_id)

        async with trio.open_nursery() as nursery:
            for i, w in enumerate(self.workers):
                nursery.start_soon(ask, i, w)
        if len(self._last_counters) != len(self.workers):
            self._last_counters = [None] * len(self.workers)
        for w, answer in zip(self.workers, answers, strict=True):
            if answer is not None:
                answer["pid"] = w.pid  # a worker that dies keeps this reading among the retired
                self._last_counters[w.index] = answer
        # A worker that did not answer (dying, or slow) counts with its last reading.
        docs = [d for d in self._last_counters if d is not None] + [self._retired.document()]
        self.worker_queues = add_up(self.snapshot, docs)
        self.worker_listeners = add_up_listeners(docs)
        self.worker_connections_open = sum(d.get("open", 0) for d in docs)  # (a dead worker's are gone)
        self._worker_metrics = [d["metrics"] for d in docs]

    def workers_status(self) -> dict[str, Any]:
        """/status "workers": each slot's process and what it counted (as of the last read);
        "spare_worker": "ready" (a dead worker is replaced in milliseconds), "starting" (the
        node or the spare's interpreter is still starting: a replacement now waits for it) or
        "none" (draining)."""
        if self._stopping:
            spare = "none"
        else:  # "starting" too while the workers start (the spare comes once they serve)
            spare = "ready" if self._spare is not None and self.spare_ready else "starting"
        return {"workers": self._workers_list(), "spare_worker": spare}

    def _workers_list(self) -> list[dict[str, Any]]:
        out = []
        for w in self.workers:
            doc = self._last_counters[w.index] if w.index < len(self._last_counters) else None
            requests = None
            if doc is not None:
                requests = sum(b["requests"] for p in doc["pools"].values() for b in p["backends"].values())
            out.append({"index": w.index, "pid": w.pid, "serving": w.serving, "restarts": w.restarts,
                        "backend_requests": requests})
        return out

    def render_metrics(self) -> bytes:
        from lbnode.admin.metrics import render

        return merge_metrics(render(self).decode(), self._worker_metrics).encode()

    # ----------------------------------------------------------- workers' lives
    async def _serve_listeners(
        self, sockets: list[tuple[Listener, stdsocket.socket]], outer: trio.Nursery, takeover: Takeover | None,
        *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the workers on ``sockets``; the node serves once every worker does. A
        takeover (``lbnode run --takeover``: ``sockets`` came from the running node, a single
        process or a supervisor) tells the old node to drain only then, so its accept loops
        serve the queues until ours do. On stop: VIPs handed over, every worker told to drain
        (after a hand-over, without closing idle keep-alive connections under their clients),
        and waited for (drain_timeout, then killed after EXIT_GRACE more)."""
        assert self.bound is not None
        if self.config_path is None:
            raise RuntimeError("a supervisor needs the path of node.toml (config_path) for its workers")
        if self.config_text is None:
            self.config_text = await trio.to_thread.run_sync(read_config_text, self.config_path)
        self._sockets = list(sockets)
        async with trio.open_nursery() as slots:
            self._slots = slots
            for w in self.workers:
                slots.start_soon(self._keep_worker, w)
            for w in self.workers:
                await w.ready.wait()
            slots.start_soon(self._make_spare)
            outer.start_soon(self._relay_cluster_affinity)  # (not in slots: their end is the workers')
            for li, _ in sockets:
                log.info("listener %s: %s on %s -> pool %s", li.name, li.protocol, li.bind, li.pool)
            log.info("%d workers serving", len(self.workers))
            if takeover is not None:
                await trio.to_thread.run_sync(takeover.finish)
                log.info("takeover: serving the sockets of lbnode pid %d, which drains and exits", takeover.pid)
                self.takeover = None
            self._serving = True
            if self.command_socket is not None and self.command_socket.bind(replace_live=takeover is not None):
                outer.start_soon(self.command_socket.serve, self._command)
            task_status.started(self.bound)
            await self._stop.wait()
            self._draining = True
            await self._hand_over_vips()
            self._stopping = True
            self._drop_spare()
            drain = self.config.node.drain_timeout
            log.info("draining: telling %d workers; waiting up to %gs for requests in flight", len(self.workers), drain)
            for w in self.workers:
                w.post(Kind.DRAIN, {"handed_over": self._handed_over})
            slots.cancel_scope.deadline = trio.current_time() + drain + EXIT_GRACE
        for _, sock in self._sockets:
            sock.close()
        if slots.cancel_scope.cancelled_caught:
            log.warning("workers still running %gs after the drain began: killed", drain + EXIT_GRACE)

    async def _keep_worker(self, w: WorkerHandle) -> None:
        """One worker slot: a process in it at all times until the node stops."""
        while not self._stopping:
            started = trio.current_time()
            served = await self._run_worker(w)
            if self._stopping:
                return
            if not w.ready.is_set() and not served:
                raise WorkerStartError(f"worker {w.index} exited before it served: see the log above")
            self.restarts += 1
            w.restarts += 1
            self._runs.forget_worker(w.index)
            last = self._last_counters[w.index] if w.index < len(self._last_counters) else None
            if last is not None and last.get("pid") == w.pid:
                self._retired.add(last)
                self._last_counters[w.index] = None
            quick = trio.current_time() - started < QUICK_DEATH
            log.warning("worker %d (pid %s) exited with status %s: starting it again%s", w.index, w.pid,
                        w.process.returncode if w.process is not None else None,
                        f" in {RESTART_BACKOFF}s" if quick else "")
            if quick:
                await trio.sleep(RESTART_BACKOFF)

    async def _spawn(self) -> tuple[trio.Process, Channel]:
        """A worker process with its end of a new socket pair; it waits for HELLO (imports done)."""
        ours, theirs = stdsocket.socketpair(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        with theirs:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "lbnode.workers.worker", str(theirs.fileno()), self.log_level],
                pass_fds=(theirs.fileno(),),
            )
        return process, Channel(ours)

    async def _make_spare(self) -> None:
        """Keep one worker process started and idle: a dead worker's slot takes it, so the
        restart costs a HELLO and a snapshot build, not an interpreter start and its imports
        (over a second on a busy host; measured 1.1-1.7 s on the shared 2-core CI machine)."""
        if self._spare is None and not self._stopping:
            process, channel = await self._spawn()
            self._spare = (process, channel)
            self.spare_ready = False
            with trio.CancelScope() as self._spare_wait:  # cancelled if a slot takes it before
                idle = await channel.receive()  # READY {"idle": true}: its imports are done
                self.spare_ready = idle is not None and idle.kind == Kind.READY
            if self._stopping:
                self._drop_spare()

    def _drop_spare(self) -> None:
        if self._spare is not None:
            process, channel = self._spare
            self._spare, self.spare_ready = None, False
            self._spare_wait.cancel()
            channel.close()  # the spare sees the pair closed before any HELLO and exits
            if process.returncode is None:
                process.kill()

    async def _run_worker(self, w: WorkerHandle) -> bool:
        """One worker process, from spawn (or the spare) to exit; whether it served."""
        spare = self._spare
        if w.ready.is_set() and spare is not None and spare[0].returncode is None:
            self._spare, self.spare_ready = None, False
            self._spare_wait.cancel()  # its READY {"idle"} now reaches _receive_from, which skips it
            process, channel = spare
            assert self._slots is not None
            self._slots.start_soon(self._make_spare)
        else:
            process, channel = await self._spawn()
        outbox_in, outbox_out = trio.open_memory_channel[Outgoing](math.inf)
        w._outbox, w.serving = outbox_in, False
        w.process, w.pid = process, process.pid
        try:
            async with trio.open_nursery() as talk:
                talk.start_soon(self._send_to, w, channel, outbox_out)
                talk.start_soon(self._receive_from, w, channel)
                await process.wait()
                talk.cancel_scope.cancel()
            return w.serving
        finally:
            w._outbox, w.serving = None, False
            outbox_in.close()
            while True:  # what was never sent: its sockets (a reload's copies) close here
                try:
                    _, _, unsent = outbox_out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                for sock in unsent:
                    sock.close()
            channel.close()
            if process.returncode is None:  # cancelled: the node is being killed, the worker goes too
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def _send_to(
        self, w: WorkerHandle, channel: Channel, outbox: trio.MemoryReceiveChannel[Outgoing],
    ) -> None:
        try:
            # The current sockets and text (a reload may have changed both since the start),
            # taken together with no checkpoint between: a RELOAD queued after this point
            # follows in the outbox.
            assert self.config_path is not None
            hello = {
                "index": w.index, "workers": self.worker_count, "config_path": str(self.config_path.resolve()),
                "config_text": self.config_text, "listeners": [li.name for li, _ in self._sockets],
            }
            copies = [s.dup() for _, s in self._sockets]  # ours while they go: a reload may close a listener's
            try:
                await channel.send(Kind.HELLO, hello, [s.fileno() for s in copies])
            finally:
                for sock in copies:
                    sock.close()
            await channel.send(Kind.CONFIG, self._config_body())
            entries = self._affinity_entries()
            if entries:
                await channel.send(Kind.AFFINITY, {"set": entries})
            async for kind, body, sockets in outbox:
                try:
                    await channel.send(kind, body, [s.fileno() for s in sockets])
                finally:
                    for sock in sockets:
                        sock.close()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker is gone: its process exit is what the slot waits for

    async def _receive_from(self, w: WorkerHandle, channel: Channel) -> None:
        try:
            while True:
                message: Message | None = await channel.receive()
                if message is None:
                    w.gone()
                    return
                if message.kind == Kind.READY and message.body.get("idle"):
                    continue  # imports done; HELLO is on its way
                if message.kind == Kind.READY:
                    w.serving = True
                    w.ready.set()
                    log.info("worker %d serving (pid %s)", w.index, w.pid)
                elif message.kind in (Kind.COUNTERS, Kind.RELOADED):
                    w.answered(message.body)
                elif message.kind == Kind.OBSERVATION:
                    self._observed(w, message.body)
        except (OSError, trio.ClosedResourceError):
            w.gone()
