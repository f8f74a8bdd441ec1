"""``ssl.SSLContext`` objects for TLS-terminating listeners: the protocol profile and SNI.

Owns the settings every handshake gets (TLS 1.2-1.3, Mozilla "intermediate" ciphers, ALPN,
no renegotiation, tickets) and the per-certificate contexts the SNI callback switches to,
cached by (certificate fingerprint, listener settings). Never reads a key from disk at
handshake time, and never writes one to disk: keys go to OpenSSL through an anonymous
memory file (memfd), closed at once.
"""

from __future__ import annotations

import _socket
import logging
import os
import socket as stdsocket
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lbnode.model import Listener, ListenerTls
from lbnode.runtime import Snapshot
from lbnode.tls.certs import Certificate

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger("lbnode.tls")

# Mozilla "intermediate" (guideline 5.7) TLS 1.2 suites, ECDHE only: its two DHE-RSA suites
# are left out (finite-field DHE costs several times ECDHE per handshake, and every client
# that offers them offers ECDHE too). TLS 1.3 suites are OpenSSL's defaults, which are
# exactly the profile's three (Python < 3.14 cannot set them, nor the group list: see tls.md).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
# ALPN offered per listener protocol, most preferred first (an https listener with HTTP/2
# on offers "h2" before it: alpn_for). An L4 listener does not know its protocol.
ALPN = {"https": ("http/1.1",), "tls": ()}
ALPN_H2 = ("h2", "http/1.1")


def alpn_for(listener: Listener) -> tuple[str, ...]:
    """The protocols a TLS listener offers: h2 first when its [listeners.http2] is on."""
    if listener.protocol == "https" and listener.http2 is not None:
        return ALPN_H2
    return ALPN[listener.protocol]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# TLS 1.3 tickets issued after each full handshake (OpenSSL's default, 2: one per parallel
# connection a browser opens right after the first).
TLS13_TICKETS = 2
# Per-certificate contexts kept: far above the certificates a node serves, so only
# rotated-away certificates fall out.
CONTEXT_CACHE_SIZE = 1024
# Server names whose context an SNI callback remembers (make_sni_callback): far above the
# names a listener serves, and small enough (a dict entry each) if clients send random ones.
SNI_MEMO_SIZE = 1024



class ListenerSocket(ssl.SSLSocket):
    """The ``ssl.SSLSocket`` of an accepted TLS connection (``sslsocket_class`` of the listener
    context), with ``recv``, ``send`` and ``pending`` calling OpenSSL's object directly.

    The stdlib versions pass through two or three Python frames each (``recv`` -> ``read``,
    ``_checkClosed`` twice) before the C call; a keep-alive request makes four such calls
    (pending, recv, send, and a recv that finds nothing), about 2 us of a ~12 us TLS share per
    request (docs/tls.md, "Where the CPU goes"). The behaviour is the stdlib's: a TCP end
    without close_notify reads as b"" (``suppress_ragged_eofs``), flags or an unwrapped socket
    go to the stdlib path.

    The class attributes are what ``socket.socket.__init__`` and ``SSLSocket._create`` set on
    an accepted, connected server-side socket (``wrap_accepted`` sets no more than the context
    and OpenSSL's object); the stdlib's path still sets its own on the instance."""

    _io_refs = 0
    _closed = False
    _session = None
    _connected = True
    _sslobj: Any = None
    server_side = True
    server_hostname = None
    do_handshake_on_connect = False
    suppress_ragged_eofs = True

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        sslobj = self._sslobj
        if sslobj is None or flags:
            return super().recv(buflen, flags)
        try:
            data: bytes = sslobj.read(buflen)
            return data
        except ssl.SSLEOFError as exc:
            if exc.args[0] == ssl.SSL_ERROR_EOF and self.suppress_ragged_eofs:
                return b""
            raise

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        sslobj = self._sslobj
        if sslobj is None or flags:
            return super().send(data, flags)
        sent: int = sslobj.write(data)
        return sent

    def pending(self) -> int:
        sslobj = self._sslobj
        if sslobj is None:
            return 0
        n: int = sslobj.pending()
        return n

    def do_handshake(self, block: bool = False) -> None:
        sslobj = self._sslobj
        if sslobj is None or block:  # not connected (the stdlib raises ENOTCONN), or blocking asked
            super().do_handshake(block)
            return
        sslobj.do_handshake()  # non-blocking: SSLWantReadError / SSLWantWriteError, as the stdlib's

    def selected_alpn_protocol(self) -> str | None:
        sslobj = self._sslobj
        if sslobj is None:
            return None
        protocol: str | None = sslobj.selected_alpn_protocol()
        return protocol


# The C socket's own family, type and protocol (plain ints): ``socket.socket``'s properties of
# the same names turn each into an enum, a dozen Python instructions apiece.
_FAMILY, _TYPE, _PROTO = _socket.socket.family, _socket.socket.type, _socket.socket.proto


def wrap_accepted(context: ssl.SSLContext, sock: stdsocket.socket) -> ssl.SSLSocket:
    """``context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)`` for an
    accepted non-blocking socket of a listener context: the same ``ListenerSocket`` (``sock`` is
    left detached), for about 60 Python instructions instead of 250.

    The stdlib's ``SSLSocket._create`` checks arguments a listener always gives right (stream
    socket, no server name, no session), reads family and type back as enums, and looks
    whether the socket is connected: only that last check is kept (``getpeername``). A socket
    the client already reset takes the stdlib's path, whose handling of data sent before the
    reset (CVE-2023-40217, counted as "reset" by ``lbnode.tls.terminate``) stays the stdlib's."""
    if context.sslsocket_class is not ListenerSocket:
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        sock.getpeername()
    except OSError:
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    family, type_, proto = _FAMILY.__get__(sock), _TYPE.__get__(sock), _PROTO.__get__(sock)
    fd = sock.detach()
    tls = _socket.socket.__new__(ListenerSocket)
    _socket.socket.__init__(tls, family, type_, proto, fd)  # (SSLSocket's own __init__ refuses)
    tls.settimeout(0.0)  # a socket made from a descriptor starts in blocking mode
    # The rest of what socket.__init__ and SSLSocket._create set is ListenerSocket's class
    # defaults (the same values): only the context and OpenSSL's object are this socket's.
    t: Any = tls
    t._context = context
    try:
        t._sslobj = context._wrap_socket(tls, True, None, owner=tls, session=None)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        tls.close()
        raise
    return tls


_cache: OrderedDict[tuple[tuple[str, ...], ListenerTls, tuple[str, ...]], ssl.SSLContext] = OrderedDict()


def listener_context(settings: ListenerTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A context with the listener's protocol settings and no certificate.

    The handshake starts on it (its settings: versions, ciphers, verification, tickets are
    the connection's, fixed by OpenSSL when the connection is created); the SNI callback
    then switches the connection to a per-certificate context built the same way."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslsocket_class = ListenerSocket
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(settings.ciphers or INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.num_tickets = TLS13_TICKETS
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if settings.client_auth != "none":
        assert settings.client_ca is not None  # model validation
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=settings.client_ca)
    return ctx


def certificate_context(certs: tuple[Certificate, ...], settings: ListenerTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """The listener's context with ``certs`` loaded (one per key type: OpenSSL serves the
    one the client supports); cached by (fingerprints, settings)."""
    key = (tuple(c.fingerprint for c in certs), settings, alpn)
    ctx = _cache.get(key)
    if ctx is not None:
        _cache.move_to_end(key)
        return ctx
    ctx = listener_context(settings, alpn)
    for cert in certs:
        with _memory_file(cert.chain_pem) as chain_path, _memory_file(cert.key_pem) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    _cache[key] = ctx
    if len(_cache) > CONTEXT_CACHE_SIZE:
        _cache.popitem(last=False)
    return ctx


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that reads ``data`` from memory only (Linux memfd)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("fulcrum-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # Elsewhere: a 0600 temporary file removed at once (the key touches the disk briefly).
    with tempfile.NamedTemporaryFile(prefix="fulcrum-", suffix=".pem") as f:
        f.write(data)
        f.flush()
        yield f.name


def make_sni_callback(
    listener: str,
    settings: ListenerTls,
    alpn: tuple[str, ...],
    snapshot: Callable[[], Snapshot],
    on_failure: Callable[[ssl.SSLSocket, str], None],
) -> Callable[[ssl.SSLSocket, str | None, ssl.SSLContext], int | None]:
    """The SNI callback: the CURRENT snapshot's table picks the certificate at each handshake,
    so a certificate changed in the store reaches new handshakes with no reload.

    The context chosen for a server name is remembered while the snapshot's table stays the
    same object (a table is built per snapshot and never changes): the choice, the key pairs
    and the cache key (which hashes the listener's settings) cost ~110 Python instructions
    per handshake otherwise. At most ``SNI_MEMO_SIZE`` names are remembered (clients choose
    them); past that a name is looked up each time."""
    memo: dict[str | None, ssl.SSLContext] = {}
    memo_of: list[object] = [None]  # the table ``memo`` was filled from

    def on_server_name(sock: ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        sock.fulcrum_sni = server_name  # type: ignore[attr-defined]  # for the access log
        try:
            table = snapshot().sni.get(listener)
            if table is None:
                on_failure(sock, "no_certificate")
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            if table is not memo_of[0]:
                memo.clear()
                memo_of[0] = table
            ctx = memo.get(server_name)
            if ctx is None:
                ctx = certificate_context(table.key_pairs(table.choose(server_name)), settings, alpn)
                if len(memo) < SNI_MEMO_SIZE:
                    memo[server_name] = ctx
            sock.context = ctx
            return None
        except Exception as exc:  # an exception here would be an unraisable error in OpenSSL's callback
            log.error("listener %s: cannot select a certificate for %r: %s", listener, server_name, exc)
            on_failure(sock, "no_certificate")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    return on_server_name
