"""The access log: one line per HTTP request or L4 connection of a listener (``[listeners.access_log]``).

Owns the entry the data path fills in, the bounded list it is appended to (the data path never
formats, locks or writes: a full list drops the entry and counts it), the JSON and combined line
formats (pure), and the writer task that formats and writes batches from a worker thread, so a
slow disk or a stdout pipe nobody reads never blocks the event loop. SIGUSR1 reopens the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import trio

from lbnode.model import AccessLog, Listener

log = logging.getLogger("lbnode.accesslog")

# How often the writer takes what the listeners buffered: a line reaches its file within about
# this, and a listener may buffer this long's worth of entries (``buffer``, 10,000 by default,
# covers 100,000 requests a second, several times what one node process serves).
FLUSH_INTERVAL = 0.1
# At a graceful stop the entries still buffered are written, within this; a stdout nobody
# reads must not hold the exit up.
FINAL_FLUSH_TIMEOUT = 2.0
# Longest value of a field taken from the request: a 64 KiB target or User-Agent would make
# one line 64 KiB (HAProxy cuts its whole line at 1024 bytes by default; we cut field by field).
MAX_TARGET = 4096
MAX_HEADER_VALUE = 1024
MAX_HOST = 255
# File mode of a log file the node creates (as nginx and HAProxy's syslog files: world-readable
# is the distributions' habit; a stricter umask still applies).
FILE_MODE = 0o644

_json_str = json.encoder.encode_basestring_ascii  # C: quoting and escaping
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class AccessLogError(Exception):
    """An access log file cannot be opened at start; ``str()`` is the one line to print."""


class Entry:
    """One request (or L4 connection) as the data path saw it; formatted later, in the writer.

    Filled in while the request is served; handed to ``ListenerAccessLog.add`` once done and
    never touched again (the writer's thread reads it)."""

    __slots__ = (
        "time", "started", "protocol", "client_ip", "client_port", "method", "host", "target", "version",
        "status", "bytes_in", "bytes_out", "duration", "backend_start", "backend_time", "pool", "backend",
        "attempts", "reason", "request_id", "user_agent", "referer", "tls_version", "sni",
    )

    def __init__(self, wall: float, started: float, protocol: str, client_ip: str, client_port: int) -> None:
        self.time = wall  # wall clock (seconds since the epoch) when the request head (L4: connection) came
        self.started = started  # the proxy's monotonic clock then (duration)
        self.protocol = protocol
        self.client_ip = client_ip
        self.client_port = client_port
        self.method: bytes | None = None
        self.host: str | None = None
        self.target: bytes | None = None
        self.version: str | None = None
        self.status: int | None = None  # sent to the client; 0 when none was (the client left first)
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration = 0.0
        self.backend_start = 0.0
        self.backend_time: float | None = None  # last attempt: backend picked to response head (L4: connect)
        self.pool: str | None = None
        self.backend: str | None = None
        self.attempts = 0  # backends tried (retries = attempts - 1)
        self.reason: str | None = None  # the node's own answer or cut, and why
        self.request_id: bytes | None = None
        self.user_agent: bytes | None = None
        self.referer: bytes | None = None
        self.tls_version: str | None = None
        self.sni: str | None = None


# --------------------------------------------------------------------------- formats (pure)


# (whole second, its "YYYY-MM-DDTHH:MM:SS." text): lines come in bursts within one second. One
# tuple, replaced whole: writer threads of two files may read it at once.
_second_text: list[tuple[int, str]] = [(-1, "")]


def _iso(wall: float) -> str:
    """2026-12-04T12:25:33.123Z (UTC, milliseconds)."""
    second = int(wall)
    cached = _second_text[0]
    if cached[0] != second:
        t = time.gmtime(second)
        cached = (second, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.")
        _second_text[0] = cached
    return f"{cached[1]}{int((wall - second) * 1000):03d}Z"


def json_line(e: Entry, listener: str) -> str:
    """One JSON object (keys always present, null when unknown), newline-terminated."""
    js = _json_str
    method, target, host, version, status = e.method, e.target, e.host, e.version, e.status
    backend_time, pool, backend, reason, rid = e.backend_time, e.pool, e.backend, e.reason, e.request_id
    ua, referer, tls_version, sni = e.user_agent, e.referer, e.tls_version, e.sni
    return (
        f'{{"time":"{_iso(e.time)}","listener":{js(listener)},"protocol":"{e.protocol}",'
        f'"client_ip":"{e.client_ip}","client_port":{e.client_port},'
        f'"method":{"null" if method is None else js(method[:64].decode("latin-1"))},'
        f'"host":{"null" if host is None else js(host[:MAX_HOST])},'
        f'"path":{"null" if target is None else js(target[:MAX_TARGET].decode("latin-1"))},'
        f'"version":{"null" if version is None else js(version)},'
        f'"status":{"null" if status is None else status},'
        f'"bytes_in":{e.bytes_in},"bytes_out":{e.bytes_out},"duration_ms":{e.duration * 1000:.3f},'
        f'"backend_ms":{"null" if backend_time is None else f"{backend_time * 1000:.3f}"},'
        f'"pool":{"null" if pool is None else js(pool)},"backend":{"null" if backend is None else js(backend)},'
        f'"retries":{e.attempts - 1 if e.attempts > 1 else 0},'
        f'"reason":{"null" if reason is None else js(reason)},'
        f'"request_id":{"null" if rid is None else js(rid.decode("latin-1"))},'
        f'"user_agent":{"null" if ua is None else js(ua[:MAX_HEADER_VALUE].decode("latin-1"))},'
        f'"referer":{"null" if referer is None else js(referer[:MAX_HEADER_VALUE].decode("latin-1"))},'
        f'"tls_version":{"null" if tls_version is None else js(tls_version)},'
        f'"sni":{"null" if sni is None else js(sni[:MAX_HOST])}}}\n'
    )


# Bytes Apache writes as they are in a quoted field; the others become \xHH (and " \" , \ \\).
_CLF_PLAIN = re.compile(rb'^[ !#-\[\]-~]*$')


def _clf(value: bytes | None, limit: int) -> str:
    if not value:
        return "-"
    value = value[:limit]
    if _CLF_PLAIN.match(value):
        return value.decode("ascii")
    out = []
    for byte in value:
        if byte == 0x22:
            out.append('\\"')
        elif byte == 0x5C:
            out.append("\\\\")
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def combined_line(e: Entry, listener: str) -> str:
    """Apache's combined format: ``%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"``.

    ``%b`` is every byte sent to the client for this request (head included, as ``%O``), ``-``
    for none; ``"%r"`` is ``"-"`` for a request the node could not parse."""
    t = time.gmtime(e.time)
    stamp = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    if e.method is None:
        request = "-"
    else:
        request = f"{_clf(e.method, 64)} {_clf(e.target, MAX_TARGET)} HTTP/{e.version}"
    size = str(e.bytes_out) if e.bytes_out else "-"
    status = e.status if e.status is not None else 0
    return (f'{e.client_ip} - - [{stamp}] "{request}" {status} {size} '
            f'"{_clf(e.referer, MAX_HEADER_VALUE)}" "{_clf(e.user_agent, MAX_HEADER_VALUE)}"\n')


FORMATTERS: dict[str, Callable[[Entry, str], str]] = {"json": json_line, "combined": combined_line}


# --------------------------------------------------------------------------- buffering and writing


class ListenerAccessLog:
    """One listener's side: the bounded list the data path appends to, and its counters
    (read by ``/metrics``)."""

    __slots__ = ("listener", "format", "limit", "entries", "dropped", "written", "_line")

    def __init__(self, listener: str, settings: AccessLog) -> None:
        self.listener = listener
        self.format = settings.format
        self.limit = settings.buffer
        self.entries: list[Entry] = []
        self.dropped = 0  # entries lost: the buffer was full (writer behind), or their write failed
        self.written = 0  # entries written out
        self._line = FORMATTERS[settings.format]

    def add(self, entry: Entry) -> None:
        """The data path's only call: an append, or a drop counted when the writer is behind."""
        entries = self.entries
        if len(entries) >= self.limit:
            self.dropped += 1
            return
        entries.append(entry)

    def lines(self, entries: Iterable[Entry]) -> str:
        line, name = self._line, self.listener
        return "".join([line(e, name) for e in entries])


class AccessLogWriter:
    """Writes the entries of the listeners that share one destination (a file, or stdout).

    Each ``FLUSH_INTERVAL`` it takes every listener's list whole (the data path starts a new
    one) and formats and writes the batch in a worker thread: a blocked write blocks that
    thread only, while the listeners' lists fill up to their cap and then count drops."""

    def __init__(
        self, path: str, logs: Sequence[ListenerAccessLog], interval: float = FLUSH_INTERVAL, key: str = ""
    ) -> None:
        self.path = path  # "-" for stdout
        self.key = key  # the config key that names it, for an error at start
        self.logs = list(logs)
        self.interval = interval
        self.fd = -1
        self.reopens = 0
        self._reopen = False
        self._wake = trio.Event()
        self._lock = threading.Lock()  # one write at a time (the final flush may overlap an abandoned one)
        self._failing = False

    @property
    def to_stdout(self) -> bool:
        return self.path == "-"

    def open(self) -> None:
        """At start, before anything is served: a file that cannot be opened stops the start."""
        if self.to_stdout:
            self.fd = 1
            return
        try:
            self.fd = _open(self.path)
        except OSError as exc:
            raise AccessLogError(f"{self.key or 'access log'}: cannot open {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        with self._lock:
            if self.fd > 2:
                os.close(self.fd)
            self.fd = -1

    def reopen(self) -> None:
        """SIGUSR1 (logrotate): the next write goes to a file opened again by its name."""
        if not self.to_stdout:
            self._reopen = True
            self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered now (and reopen first if asked)."""
        batches = []
        for lg in self.logs:
            if lg.entries:
                batches.append((lg, lg.entries))
                lg.entries = []
        reopen, self._reopen = self._reopen, False
        if not batches and not reopen:
            return
        error, reopen_error = await trio.to_thread.run_sync(
            self._write, batches, reopen, abandon_on_cancel=True
        )
        if reopen:
            self.reopens += 1
            if reopen_error is not None:
                log.error("access log %s: cannot reopen (%s); still writing to the file opened before",
                          self.path, reopen_error)
            else:
                log.info("access log %s reopened", self.path)
        if error is None:
            for lg, entries in batches:
                lg.written += len(entries)
            if self._failing:
                self._failing = False
                log.warning("access log %s: writing again", self.path)
            return
        for lg, entries in batches:
            lg.dropped += len(entries)
        if not self._failing:
            self._failing = True
            log.error("access log %s: write failed (%s): entries dropped until it works again", self.path, error)

    def _write(self, batches: list[tuple[ListenerAccessLog, list[Entry]]], reopen: bool) -> tuple[str | None, str | None]:
        """In a worker thread: format, (re)open, write. Returns (write error, reopen error)."""
        data = "".join([lg.lines(entries) for lg, entries in batches]).encode("utf-8")
        with self._lock:
            reopen_error = None
            if reopen and self.fd > 2:
                try:
                    fd = _open(self.path)
                except OSError as exc:
                    reopen_error = exc.strerror or str(exc)
                else:
                    os.close(self.fd)
                    self.fd = fd
            if self.fd < 0:
                return "closed", reopen_error
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:
                return exc.strerror or str(exc), reopen_error
            return None, reopen_error


def _open(path: str) -> int:
    # O_APPEND: every write lands at the end even if another writer (or a truncating
    # logrotate copytruncate) moved it.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


def build(listeners: Iterable[Listener]) -> tuple[dict[str, ListenerAccessLog], list[AccessLogWriter]]:
    """The listeners' logs and one writer per destination (listeners naming the same file share it)."""
    logs: dict[str, ListenerAccessLog] = {}
    by_path: dict[str, list[ListenerAccessLog]] = {}
    keys: dict[str, str] = {}
    for i, li in enumerate(listeners):
        if li.access_log is None:
            continue
        lg = logs[li.name] = ListenerAccessLog(li.name, li.access_log)
        path = li.access_log.path if li.access_log.to_stdout else os.path.abspath(li.access_log.path)
        by_path.setdefault(path, []).append(lg)
        keys.setdefault(path, f"listeners[{i}].access_log.path")
    return logs, [AccessLogWriter(path, group, key=keys[path]) for path, group in by_path.items()]
