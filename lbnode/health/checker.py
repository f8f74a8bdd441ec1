"""Active health checks: one probe task per backend of a pool, over TCP, HTTP or gRPC.

Owns the probe sockets (always closed, every timeout a Trio scope), the gRPC
checks' channels (grpccheck.py: one per backend, closed when it leaves) and the
check schedule; an http check of a ``protocol = "h2"`` pool speaks HTTP/2 (h2check.py).
Decides nothing about routing: results go to ``HealthState`` (state.py) and
transitions to the caller's callbacks.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable

import httptools
import trio

from lbnode.health.grpccheck import GrpcChannels, grpc_check
from lbnode.health.h2check import h2_http_check
from lbnode.health.state import DOWN, HealthState, Observation, Transition
from lbnode.http2.upstream import ALPN as H2_ALPN
from lbnode.model import Address, Backend, HealthCheck, PoolTls
from lbnode.proxyproto import encode_own
from lbnode.tls.upstream import TlsSetupError, alpn_refusal, backend_tls

log = logging.getLogger("lbnode.health")

# A health answer's status line and headers fit in this; a bigger head is not a health page.
MAX_HEAD_BYTES = 16 * 1024
# expect_body is searched in this much of the body: a check must not download a big page.
MAX_BODY_BYTES = 64 * 1024
# One receive; health answers are small, so one or two reads finish most checks.
RECEIVE_BYTES = 16 * 1024
# A failed probe that took longer than its timeout by more than this share of it was not the
# backend's doing: the probe is bounded by the timeout, so the excess is time this process did
# not run (a stall of the event loop or of the host). Its result is inconclusive.
STALL_SHARE = 0.5

_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EPIPE: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timed out",
}

# (address, check[, tls][, send_proxy=][, protocol=]) -> (passed, reason)
Probe = Callable[..., Awaitable[tuple[bool, str]]]


async def check_backend(
    address: Address,
    check: HealthCheck,
    tls: PoolTls | None = None,
    *,
    send_proxy: str | None = None,
    channels: GrpcChannels | None = None,
    protocol: str = "http1",
) -> tuple[bool, str]:
    """Probe one backend once; ``(passed, reason)`` with a reason an operator can act on.

    The whole probe (resolve, connect, TLS handshake, request, answer) shares
    ``check.timeout``. With ``tls`` (the pool's ``[pools.tls]``) a tcp check passes
    once the handshake completes (the certificate verified), an http check is sent over TLS.
    With ``send_proxy`` (the pool's) a PROXY header comes first, as HAProxy's
    ``check-send-proxy``: a backend that expects one would refuse the check without it.
    A grpc check asks over ``channels`` (the checker's, kept between probes; without them a
    channel for this probe only), over TLS with ``tls``; it cannot send a PROXY header
    (the configuration refuses that pairing). With ``protocol = "h2"`` (the pool's) a check over
    TLS offers ALPN ``h2`` and fails, with the line the pool's connects log, if the backend
    selects something else; an http check then sends its request as HTTP/2 (with prior
    knowledge on cleartext), as the pool's requests go: an h2-only backend cannot answer HTTP/1.1.
    """
    h2 = protocol == "h2"
    if check.type == "grpc":
        if send_proxy is not None:
            return False, "send_proxy: a grpc check cannot send a PROXY header"
        return await _grpc_probe(address, check, tls, channels)
    phase = "while connecting"
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(check.timeout):
            tcp = await trio.open_tcp_stream(address.host, address.port)
            stream = tcp
            if send_proxy is not None:
                own, peer = tcp.socket.getsockname(), tcp.socket.getpeername()
                await tcp.send_all(encode_own(send_proxy, own[:2], peer[:2]))
            if tls is not None:
                try:
                    settings = backend_tls(tls, H2_ALPN if h2 else ())
                except TlsSetupError as exc:
                    return False, f"pools.tls.{exc.key}: {exc.reason}"
                stream = trio.SSLStream(stream, settings.context, server_hostname=settings.server_name(address),
                                        https_compatible=True)
                phase = "during the TLS handshake"
                await stream.do_handshake()
                refusal = alpn_refusal(settings, stream.selected_alpn_protocol())
                if refusal is not None:
                    return False, refusal
                if check.type == "tcp":
                    return True, "TLS handshake completed"
            if check.type == "tcp":
                return True, "connected"
            phase = "waiting for the response"
            if h2:
                return await h2_http_check(stream, address, check, tls=tls is not None)
            return await _http_check(stream, address, check)
    except trio.TooSlowError:
        return False, f"timeout after {format_seconds(check.timeout)} {phase}"
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return False, f"TLS: certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return False, f"TLS handshake failed: {(cause.reason or str(cause)).lower().replace('_', ' ')}"
        return False, describe_os_error(cause) if isinstance(cause, OSError) else "connection reset"
    except OSError as exc:
        return False, describe_os_error(exc)
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def _grpc_probe(
    address: Address, check: HealthCheck, tls: PoolTls | None, channels: GrpcChannels | None
) -> tuple[bool, str]:
    kept = channels if channels is not None else GrpcChannels()
    try:
        with trio.fail_after(check.timeout):
            return await grpc_check(address, check, tls, kept)
    except trio.TooSlowError:
        return False, f"timeout after {format_seconds(check.timeout)} waiting for the grpc answer (DEADLINE_EXCEEDED)"
    finally:
        if channels is None:
            kept.close_all()


class _Answer:
    """httptools callbacks for one health answer."""

    def __init__(self, keep_body: bool) -> None:
        self.keep_body = keep_body
        self.head_done = False
        self.complete = False
        self.body = bytearray()

    @property
    def done(self) -> bool:
        if self.complete:
            return True
        if not self.head_done:
            return False
        return not self.keep_body or len(self.body) >= MAX_BODY_BYTES

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        if self.keep_body:
            self.body += data[: MAX_BODY_BYTES - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


async def _http_check(
    stream: trio.abc.Stream, address: Address, check: HealthCheck
) -> tuple[bool, str]:
    host = check.host or str(address)
    request = (
        f"{check.method} {check.path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: fulcrum-health\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    await stream.send_all(request.encode("latin-1"))
    # A HEAD answer has no body even when it announces a Content-Length.
    answer = _Answer(keep_body=check.expect_body is not None and check.method != "HEAD")
    parser = httptools.HttpResponseParser(answer)
    head_bytes = 0
    while not answer.done:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            if head_bytes == 0:
                return False, "connection closed before the response"
            if not answer.head_done:
                return False, "connection closed in the middle of the response head"
            break  # body delimited by the close
        if not answer.head_done:
            head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            answer.complete = True
        except httptools.HttpParserError as exc:
            return False, f"invalid HTTP response: {exc}"
        if not answer.head_done and head_bytes > MAX_HEAD_BYTES:
            return False, f"response head larger than {MAX_HEAD_BYTES // 1024} KiB"
    status = parser.get_status_code()
    if not any(lo <= status <= hi for lo, hi in check.expect_status):
        return False, f"status {status}"
    if check.expect_body is not None and check.method != "HEAD":
        if check.expect_body.encode() not in answer.body:
            return False, f"body does not contain {check.expect_body!r}"
    return True, f"status {status}"


def describe_os_error(exc: OSError) -> str:
    """``connection refused`` rather than ``all attempts to connect to 192.0.2.5:80 failed``."""
    cause = exc.__cause__
    if exc.errno is None and isinstance(cause, BaseExceptionGroup):
        inner = next((e for e in cause.exceptions if isinstance(e, OSError)), None)
        if inner is not None:
            exc = inner
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def stalled(duration: float, timeout: float) -> bool:
    """Whether a probe bounded by ``timeout`` took so much longer that this process cannot have
    been running: a loopback connect that "times out after 100ms" when the loop was frozen
    for 300 ms says nothing about the backend (``make soak`` saw every backend of a pool
    marked down at once that way on a busy host)."""
    return duration > timeout * (1.0 + STALL_SHARE)


def format_seconds(seconds: float) -> str:
    """``1.0s``, ``2.5s``, ``250ms``: the way an operator wrote it in the config."""
    if seconds >= 1:
        text = f"{seconds:.3f}".rstrip("0")
        return f"{text}0s" if text.endswith(".") else f"{text}s"
    return f"{seconds * 1000:.0f}ms"


def _ignore(*args: object) -> None:
    return None


class HealthChecker:
    """Checks every backend of one pool, each in its own task, and reports what changed.

    Each backend's first check comes after a random delay within one
    interval, then every ``interval`` plus up to ``jitter`` x ``interval`` more,
    measured start to start: backends drift apart instead of being probed
    in lockstep, and no backend is ever probed more often than ``interval``.
    A probe slower than the interval delays the next one (no overlap).

    ``update`` follows a change of the pool: new backends get a task, removed
    ones lose theirs, unchanged ones keep their task and their state. The
    callbacks run in the checker's tasks; an exception there is a bug and
    ends the checker (and its nursery's owner), it is not swallowed.
    """

    def __init__(
        self,
        pool: str,
        check: HealthCheck,
        backends: Iterable[Backend] = (),
        *,
        on_transition: Callable[[str, Transition], object] = _ignore,
        on_observation: Callable[[Observation], object] = _ignore,
        rng: random.Random | None = None,
        probe: Probe | None = None,
        tls: PoolTls | None = None,
        send_proxy: str | None = None,
        protocol: str = "http1",
    ) -> None:
        self.pool = pool
        self.check = check
        self.tls = tls  # the pool's [pools.tls]: probes speak TLS too (set again on a pool change)
        self.send_proxy = send_proxy  # the pool's send_proxy: probes start with a header too (likewise)
        self.protocol = protocol  # the pool's: "h2" checks over TLS need ALPN h2, http checks speak HTTP/2 (likewise)
        self.on_transition = on_transition
        self.on_observation = on_observation
        self._rng = rng or random.Random()
        # grpc checks keep one channel per backend address between probes (check_backend by
        # default; a test's probe brings its own connections).
        self.grpc_channels = GrpcChannels()
        self._probe = probe or functools.partial(check_backend, channels=self.grpc_channels)
        self._backends: dict[str, Backend] = {}
        self.states: dict[str, HealthState] = {}  # by backend id, for the status page
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.update(backends)

    def update(self, backends: Iterable[Backend], check: HealthCheck | None = None) -> None:
        """Follow a new pool spec without restarting the checks of unchanged backends.

        A backend whose address changed is a new backend (its old results say
        nothing about the new address). A new ``check`` applies from each
        backend's next probe; rise and fall apply to the current counts.
        """
        if check is not None:
            self.check = check
            for state in self.states.values():
                state.rise, state.fall = check.rise, check.fall
            if check.type != "grpc":
                self.grpc_channels.close_all()
        wanted = {b.id: b for b in backends}
        for backend_id, old in list(self._backends.items()):
            new = wanted.get(backend_id)
            if new is None or new.address != old.address:
                self._stop(backend_id)
        for backend_id, backend in wanted.items():
            known = backend_id in self._backends
            self._backends[backend_id] = backend
            if not known:
                self.states[backend_id] = HealthState.for_check(self.check)
                if self._nursery is not None:
                    self._start(backend_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check until cancelled; ``started`` once every current backend has its task."""
        if self._nursery is not None:
            raise RuntimeError(f"health checker of pool {self.pool} is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for backend_id in self._backends:
                    self._start(backend_id)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._scopes.clear()
            self.grpc_channels.close_all()

    def _start(self, backend_id: str) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._scopes[backend_id] = scope
        backend = self._backends[backend_id]
        self._nursery.start_soon(self._watch, backend, self.states[backend_id], scope)

    def _stop(self, backend_id: str) -> None:
        scope = self._scopes.pop(backend_id, None)
        if scope is not None:
            scope.cancel()
        address = self._backends.pop(backend_id).address
        del self.states[backend_id]
        if all(b.address != address for b in self._backends.values()):
            self.grpc_channels.close(address)

    async def _watch(self, backend: Backend, state: HealthState, scope: trio.CancelScope) -> None:
        with scope:
            state.since = trio.current_time()
            await trio.sleep(self._rng.uniform(0, self.check.interval))
            while True:
                check = self.check
                started = trio.current_time()
                # Only what differs from the defaults: a test's probe takes what its test sets.
                args: tuple[object, ...] = () if self.tls is None else (self.tls,)
                options: dict[str, object] = {}
                if self.send_proxy is not None:
                    options["send_proxy"] = self.send_proxy
                if self.protocol != "http1":
                    options["protocol"] = self.protocol
                ok, reason = await self._probe(backend.address, check, *args, **options)
                if scope.cancel_called:  # removed while the answer was already on its way
                    return
                now = trio.current_time()
                state.durations.observe(now - started)
                late = not ok and stalled(now - started, check.timeout)
                if late and state.stalled_in_a_row < check.fall:
                    # Probe again at once: only a result the loop saw in time counts. A
                    # backend that is really dead still goes down, at most ``fall``
                    # stalled probes (each bounded by the timeout plus the stall) later.
                    state.stalled_in_a_row += 1
                    state.inconclusive += 1
                    log.info("pool %s backend %s: check inconclusive (%s, but the probe took %s: this "
                             "process was stalled); checking again", self.pool, backend.address, reason,
                             format_seconds(now - started))
                    continue
                if not late:
                    state.stalled_in_a_row = 0
                self._record(backend, state, ok, reason, now)
                spacing = check.interval * (1.0 + check.jitter * self._rng.random())
                await trio.sleep_until(started + spacing)

    def _record(
        self, backend: Backend, state: HealthState, ok: bool, reason: str, now: float
    ) -> None:
        self.on_observation(Observation(backend.id, ok, reason, now))
        transition = state.observe(ok, reason, now)
        if transition is None:
            return
        label = f"{backend.name} ({backend.address})" if backend.name else str(backend.address)
        log.log(
            logging.WARNING if transition.new == DOWN else logging.INFO,
            "pool %s backend %s %s -> %s: %s",
            self.pool,
            label,
            transition.old,
            transition.new,
            transition.reason,
        )
        self.on_transition(backend.id, transition)
