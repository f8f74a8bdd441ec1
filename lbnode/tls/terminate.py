"""The TLS handshake of an accepted connection, before the listener's own handler runs.

Owns the handshake on a non-blocking ``ssl.SSLSocket`` driven by Trio's readiness waits
(the same waits as ``lbnode.sockio``), its timeout, the cap on handshakes in progress, the
counters of failed handshakes by reason (``/status``) and the verified client certificate.
A failed handshake ends that connection only; it never raises into the accept loop.
"""

from __future__ import annotations

import logging
import socket as stdsocket
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
from cryptography import x509

from lbnode.model import Listener
from lbnode.runtime import Snapshot
from lbnode.sockio import current_deadlines
from lbnode.tls.context import alpn_for, listener_context, make_sni_callback, wrap_accepted
from lbnode.tls.ticketkeys import TICKET_KEY_LIFETIME, Unsupported, set_ticket_key

log = logging.getLogger("lbnode.tls")

# Headers carrying the verified client certificate to the backend. Any copy a client sends
# is always removed (lbnode.http.headers.REQUEST_NOTED), whatever client_auth says.
CLIENT_SUBJECT_HEADER = b"X-Client-Cert-Subject"
CLIENT_SANS_HEADER = b"X-Client-Cert-SANs"

# OpenSSL reasons, grouped into the few kinds an operator can act on (the /status counters).
_REASON_KINDS = {
    "WRONG_VERSION_NUMBER": "not_tls", "HTTP_REQUEST": "not_tls", "HTTPS_PROXY_REQUEST": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls", "RECORD_LENGTH_MISMATCH": "not_tls", "LENGTH_MISMATCH": "not_tls",
    "UNSUPPORTED_PROTOCOL": "version", "TLSV1_ALERT_PROTOCOL_VERSION": "version", "VERSION_TOO_LOW": "version",
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher", "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_certificate", "CERTIFICATE_VERIFY_FAILED": "client_certificate",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}

Inner = Callable[[ssl.SSLSocket, str, bytes], Awaitable[None]]


class SnapshotSource(Protocol):
    """Where the SNI callback reads the current snapshot (``LbNode`` is one)."""

    @property
    def snapshot(self) -> Snapshot: ...


class TlsTerminator:
    """Wraps a listener's handler: ``handle(sock, ip)`` completes a handshake, then calls
    ``inner(tls_sock, ip, client_cert_headers)`` (raw header lines for the backend, b"" if none)."""

    def __init__(
        self,
        listener: Listener,
        node: SnapshotSource,
        inner: Inner,
        ticket_key_lifetime: float = TICKET_KEY_LIFETIME,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        assert listener.tls is not None
        self.listener = listener
        self.settings = listener.tls
        self.inner = inner
        self._node = node
        self._alpn = alpn_for(listener)
        self.clock = clock
        self.ticket_key_lifetime = ticket_key_lifetime
        self._context_until = 0.0
        # A session ticket key shared with other nodes and workers (use_ticket_key); None:
        # OpenSSL's own, made at random for each context.
        self.ticket_key: bytes | None = None
        self.context = self.new_ticket_keys()  # (sets it too; here for the type checker)
        self._slots = trio.Semaphore(self.settings.max_handshakes)
        self.in_progress = 0
        self.handshakes = 0  # completed
        self.resumed = 0  # of which resumed a session (ticket or id)
        self.failures: dict[str, int] = {}  # kind -> count

    def new_ticket_keys(self) -> ssl.SSLContext:
        """A new listener context (new ticket keys, an empty session cache), used from now on."""
        ctx = listener_context(self.settings, self._alpn)
        # typeshed types the callback's first argument SSLObject; a wrapped socket gets an SSLSocket
        ctx.sni_callback = make_sni_callback(  # type: ignore[assignment]
            self.listener.name, self.settings, self._alpn, lambda: self._node.snapshot, self._callback_failed
        )
        self._context_until = self.clock() + self.ticket_key_lifetime
        self.context = ctx
        if self.ticket_key is not None:
            self._set_ticket_key(ctx, self.ticket_key)
        return ctx

    def use_ticket_key(self, key: bytes | None) -> None:
        """Seal and open session tickets with ``key`` from the next handshake on (the cluster's
        or the node's, shared by every worker: lbnode.tls.ticketkeys); None: OpenSSL's own
        again, in a new context. Tickets sealed under the key it replaces get full handshakes."""
        if key == self.ticket_key:
            return
        self.ticket_key = key
        if key is None:
            self.new_ticket_keys()
        else:
            self._set_ticket_key(self.context, key)

    def _set_ticket_key(self, ctx: ssl.SSLContext, key: bytes) -> None:
        try:
            set_ticket_key(ctx, key)
        except Unsupported as exc:
            log.warning("listener %s: cannot share TLS session tickets (%s); each process seals its own",
                        self.listener.name, exc)
            self.ticket_key = None

    def status(self) -> dict[str, object]:
        return {
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "in_progress": self.in_progress,
            "failures": dict(sorted(self.failures.items())),
            # "shared": sealed with the cluster's (or the node's workers') key; "own": this process's
            "ticket_key": "own" if self.ticket_key is None else "shared",
        }

    def _failed(self, kind: str, client_ip: str, detail: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        level = logging.WARNING if kind == "no_certificate" else logging.DEBUG
        log.log(level, "listener %s: %s: TLS handshake failed (%s): %s", self.listener.name, client_ip, kind, detail)

    def _callback_failed(self, sock: ssl.SSLSocket, kind: str) -> None:
        sock.fulcrum_failure = kind  # type: ignore[attr-defined]  # read by handle() when the handshake fails

    async def handle(self, sock: stdsocket.socket, client_ip: str) -> None:
        # TCP_NODELAY: the listener's, inherited (lbnode.listen.nodelay_inherited).
        if self.clock() >= self._context_until:
            self.new_ticket_keys()
        deadline = trio.current_time() + self.settings.handshake_timeout
        slots = self._slots
        try:
            # A free slot is taken without a checkpoint (Semaphore.acquire yields to the run
            # loop even then: one more pass of the scheduler per handshake). When all are
            # taken, the wait is the semaphore's, in arrival order, within the handshake's time.
            slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_at(deadline) as waited:
                await slots.acquire()
            if waited.cancelled_caught:
                self._failed("timeout", client_ip, f"not done within {self.settings.handshake_timeout:g}s")
                return  # the caller closes ``sock``
        tls: ssl.SSLSocket | None = None
        try:
            try:
                try:
                    # The descriptor goes to ``tls`` (``sock`` is left detached).
                    tls = wrap_accepted(self.context, sock)
                    self.in_progress += 1
                    try:
                        done = await handshake_before(tls, deadline)
                    finally:
                        self.in_progress -= 1
                finally:
                    slots.release()
            except ssl.SSLError as exc:
                kind = getattr(tls, "fulcrum_failure", None) or _kind(exc)
                self._failed(kind, client_ip, str(exc))
                return
            except OSError as exc:
                self._failed("reset" if isinstance(exc, ConnectionResetError) else "eof", client_ip, str(exc))
                return
            if not done:
                self._failed("timeout", client_ip, f"not done within {self.settings.handshake_timeout:g}s")
                return
            self.handshakes += 1
            if tls.session_reused:
                self.resumed += 1
            await self.inner(tls, client_ip, self._client_headers(tls))
        finally:
            if tls is not None:
                # No notify_closing (close_tls): every task that used the socket has ended by
                # now (inner's nurseries are closed, a handshake is this task's alone), and Trio
                # keeps no registration for a socket nothing waits on; the kernel drops the fd
                # from epoll when it is closed. Plain connections close the same way
                # (lbnode.listen). notify_closing cost ~110 instructions and an epoll_ctl.
                tls.close()

    def _client_headers(self, tls: ssl.SSLSocket) -> bytes:
        if self.settings.client_auth == "none":
            return b""
        der = tls.getpeercert(binary_form=True)
        if not der:
            return b""  # optional, and none given
        return client_certificate_headers(der)


def client_certificate_headers(der: bytes) -> bytes:
    """Header lines naming a verified client certificate: its subject (RFC 4514) and its SANs
    (``DNS:a, email:b, URI:c, IP:d``), with any byte that could end a header escaped."""
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject.rfc4514_string()
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)]
        sans += [f"email:{v}" for v in ext.get_values_for_type(x509.RFC822Name)]
        sans += [f"URI:{v}" for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
        sans += [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    out = CLIENT_SUBJECT_HEADER + b": " + _header_safe(subject) + b"\r\n"
    if sans:
        out += CLIENT_SANS_HEADER + b": " + _header_safe(", ".join(sans)) + b"\r\n"
    return out


def _header_safe(text: str) -> bytes:
    return "".join(c if " " <= c != "\x7f" else f"\\x{ord(c):02x}" for c in text).encode("utf-8")


async def handshake(tls: ssl.SSLSocket) -> None:
    """The server side of a TLS handshake on a non-blocking socket (the caller bounds its time)."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)


async def handshake_before(tls: ssl.SSLSocket, deadline: float) -> bool:
    """``handshake``, False if not done by ``deadline`` (Trio time).

    The timeout is a ``Deadlines`` one (lbnode.sockio), not a cancel scope: entering and
    leaving a scope costs several microseconds on every connection, and nothing but this task
    waits on the socket during a handshake. A deadline that strikes while the task is already
    runnable (the data won) is seen before the next wait."""
    try:
        tls.do_handshake()  # usually the ClientHello is in: no wait, no deadline armed
        return True
    except ssl.SSLWantReadError:
        wait = trio.lowlevel.wait_readable
    except ssl.SSLWantWriteError:
        wait = trio.lowlevel.wait_writable
    deadlines = current_deadlines()
    entry = deadlines.arm(tls, deadline)
    try:
        while True:
            if entry[3]:
                return False
            try:
                await wait(tls)
            except trio.ClosedResourceError:
                if entry[3]:
                    return False
                raise
            try:
                tls.do_handshake()
                return True
            except ssl.SSLWantReadError:
                wait = trio.lowlevel.wait_readable
            except ssl.SSLWantWriteError:
                wait = trio.lowlevel.wait_writable
    finally:
        deadlines.disarm(entry)


def _kind(exc: ssl.SSLError) -> str:
    # A client that closes mid-handshake: SSLEOFError on Python 3.11.7, SSLZeroReturnError
    # ("TLS/SSL connection has been closed (EOF)") on Debian's 3.11.2.
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "eof"
    if "Closed before TLS handshake" in str(exc):
        # Python's own check in wrap_socket (CVE-2023-40217): the client sent bytes and went
        # away (a reset) before the handshake began.
        return "reset"
    reason = getattr(exc, "reason", None) or ""
    kind = _REASON_KINDS.get(reason)
    if kind is not None:
        return kind
    if reason.startswith(("TLSV1_ALERT", "SSLV3_ALERT", "TLSV13_ALERT")):
        return "client_alert"  # the client gave up (e.g. it does not trust the certificate)
    return "protocol"


def close_tls(tls: ssl.SSLSocket) -> None:
    """Close a listener-side TLS socket, telling Trio first (a task may wait on it)."""
    if tls.fileno() != -1:
        trio.lowlevel.notify_closing(tls)
        tls.close()
