"""TLS towards backends (re-encryption): client contexts per pool and a TLS socket for the data plane.

Owns ``[pools.tls]`` turned into an ``ssl.SSLContext`` (built once per distinct
setting and ALPN list: ``protocol = "h2"`` pools offer ``h2`` and refuse a backend that
does not select it), the client handshake, and ``TlsSocket``: a TLS connection over a
non-blocking socket with the few socket methods ``lbnode.sockio`` and the pumps
call (``recv``, ``recv_into``, ``send``, ``shutdown``, ``fileno``), so the L7
proxy and the L4 copy pump drive it unchanged. Never decides which backend or
pool to use, and never blocks the Trio thread.
"""

from __future__ import annotations

import functools
import socket
import ssl

import trio

from lbnode.model import Address, PoolTls
from lbnode.sockio import ConnectFailed, SendTimeout, connect, send_all

# One read of ciphertext from the backend: a few full TLS records (16 KiB each).
RAW_RECV = 64 * 1024
# Plaintext encrypted per send() call: bounds the ciphertext held when the socket is full.
SEND_CHUNK = 64 * 1024
# TLS sessions kept per pool for resumption (one per backend address is what is used).
MAX_SESSIONS = 1024


class TlsSetupError(Exception):
    """``[pools.tls]`` files that cannot be used; ``key`` is the setting to fix (``ca``, ``cert``...)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class BackendTls:
    """The client side of one ``[pools.tls]`` setting: its context and resumable sessions.

    ``alpn``: the protocols offered, the backend must select one of them (empty: no ALPN,
    what HTTP/1.1 pools and L4 sessions send); a session of an h2 pool is never resumed by an HTTP/1.1
    one, as each ALPN list has its own ``BackendTls``."""

    def __init__(self, settings: PoolTls, alpn: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.alpn = alpn
        self.context = _client_context(settings)
        if alpn:
            self.context.set_alpn_protocols(list(alpn))
        self._sessions: dict[str, ssl.SSLSession] = {}

    def server_name(self, address: Address) -> str:
        return self.settings.server_name or address.host

    def session_for(self, address: Address) -> ssl.SSLSession | None:
        return self._sessions.get(str(address))

    def remember(self, address: Address, session: ssl.SSLSession | None) -> None:
        if session is None:
            return
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[str(address)] = session


@functools.lru_cache(maxsize=256)
def backend_tls(settings: PoolTls, alpn: tuple[str, ...] = ()) -> BackendTls:
    """The ``BackendTls`` of a setting, shared by every snapshot that keeps the same setting
    (a config swap must not throw away the CA load and the resumable sessions).
    Raises ``TlsSetupError`` if a file cannot be used; not cached then, so a fixed file is retried."""
    return BackendTls(settings, alpn)


def alpn_refusal(tls: BackendTls, selected: str | None) -> str | None:
    """The one line that refuses a backend whose ALPN answer is not what the pool speaks
    (None: acceptable). A backend that ignores ALPN would be sent HTTP/2 frames it cannot read."""
    if not tls.alpn or selected in tls.alpn:
        return None
    offered = " or ".join(tls.alpn)
    got = f'it selected "{selected}"' if selected else "it selected no protocol"
    return f"TLS: the backend does not speak {offered} (ALPN: {got}); the pool's protocol needs it"


def _client_context(settings: PoolTls) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=settings.ca) if settings.ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("ca", f"cannot load {settings.ca}: {_why(exc)}") from None
    # TLS 1.2 and 1.3 only: the floor of the Mozilla "intermediate" profile.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        try:
            ctx.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError("cert", f"cannot load {settings.cert} with key {settings.key}: {_why(exc)}") from None
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


async def open_backend(
    address: Address, timeout: float, tls: PoolTls | None, preamble: bytes = b"", alpn: tuple[str, ...] = ()
) -> socket.socket | TlsSocket:
    """A connection to a backend: plain TCP, or TLS when the pool has ``[pools.tls]``.

    ``preamble`` (a PROXY protocol header) is written first, before the TLS handshake, as
    HAProxy sends ``send-proxy`` before ``ssl``. ``timeout`` bounds the TCP connect and
    then, again, the TLS handshake. Any failure, a certificate refused included, is a
    ``ConnectFailed``, a backend that does not select one of ``alpn`` too."""
    raw = await connect(address, timeout)
    if preamble:
        try:
            # A fresh socket's buffer takes these few hundred bytes at once: no wait here.
            await send_all(raw, preamble, timeout)
        except (OSError, SendTimeout) as exc:
            raw.close()
            raise ConnectFailed(f"cannot send the PROXY protocol header: {exc}") from None
    if tls is None:
        return raw
    try:
        return await tls_connect(raw, backend_tls(tls, alpn), address, timeout)
    except TlsSetupError as exc:
        raw.close()
        raise ConnectFailed(f"pools.tls.{exc.key}: {exc.reason}") from None
    except BaseException:
        raw.close()
        raise


async def tls_connect(raw: socket.socket, tls: BackendTls, address: Address, timeout: float) -> TlsSocket:
    """Run the client handshake on a connected non-blocking socket; ``ConnectFailed`` if it fails.

    A certificate that fails verification is a ``ConnectFailed`` with the reason
    (``certificate verify failed: ...``), counted like a refused connect; so is an ALPN
    answer outside ``tls.alpn`` (``alpn_refusal``)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.context.wrap_bio(
        incoming, outgoing, server_side=False,
        server_hostname=tls.server_name(address), session=tls.session_for(address),
    )
    conn = TlsSocket(raw, obj, incoming, outgoing, tls, address)
    with trio.move_on_after(timeout) as scope:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await conn.flush()
                data = await _recv(raw)
                if not data:
                    raise ConnectFailed("backend closed the connection during the TLS handshake") from None
                conn.incoming.write(data)
            except ssl.SSLCertVerificationError as exc:
                raise ConnectFailed(f"TLS: certificate verify failed: {exc.verify_message}") from None
            except ssl.SSLError as exc:
                raise ConnectFailed(f"TLS handshake failed: {_why(exc)}") from None
            except OSError as exc:
                raise ConnectFailed(f"TLS handshake failed: {_why(exc)}") from None
        await conn.flush()
        refusal = alpn_refusal(tls, obj.selected_alpn_protocol())
        if refusal is not None:
            raise ConnectFailed(refusal)
        return conn
    assert scope.cancelled_caught
    raise ConnectFailed(f"TLS handshake timeout after {timeout:g}s", timed_out=True)


async def _recv(raw: socket.socket) -> bytes:
    while True:
        try:
            return raw.recv(RAW_RECV)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(raw)


class TlsSocket:
    """A client TLS connection over a non-blocking socket, shaped like that socket.

    ``recv``/``recv_into`` return plaintext, b"" at the end (close_notify, or a TCP
    close without it: HTTP framing tells a truncated response on its own), and raise
    ``BlockingIOError`` only when the socket itself has nothing: waiting for it to be
    readable is then right. ``send`` encrypts and writes; when the kernel takes only
    part of the ciphertext, the rest is kept and the last plaintext byte is not
    acknowledged until it is written, so the caller's usual "send the remainder"
    loop (``sockio.send_all``, the L4 pump) also flushes the ciphertext.
    """

    __slots__ = ("raw", "obj", "incoming", "outgoing", "_pending", "_owed", "_tls", "_address")

    def __init__(self, raw: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 tls: BackendTls, address: Address) -> None:
        self.raw = raw
        self.obj = obj
        self.incoming = incoming  # ciphertext from the backend, for obj to decrypt
        self.outgoing = outgoing  # ciphertext obj produced, for the backend
        self._pending = b""  # ciphertext the kernel has not taken yet
        self._owed = 0  # plaintext bytes encrypted but not yet acknowledged to the caller
        self._tls = tls
        self._address = address

    @property
    def session_reused(self) -> bool:
        return self.obj.session_reused

    def fileno(self) -> int:
        return self.raw.fileno()

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None:
        self.raw.setsockopt(level, option, value)

    def recv(self, size: int) -> bytes:
        obj = self.obj
        while True:
            try:
                data = obj.read(size)
            except ssl.SSLWantReadError:
                self._flush_now()
                chunk = self.raw.recv(RAW_RECV)  # BlockingIOError: nothing on the socket, wait
                if not chunk:
                    return b""
                self.incoming.write(chunk)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS error from the backend: {_why(exc)}") from None
            if self.outgoing.pending:
                self._flush_now()
            return data

    def recv_into(self, buffer: bytearray, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def send(self, data: bytes | memoryview) -> int:
        if self._pending:
            self._flush_now()
            if self._pending:
                raise BlockingIOError()
        if self._owed:
            n = min(self._owed, len(data))
            self._owed -= n
            return n
        chunk = data[:SEND_CHUNK]
        try:
            self.obj.write(chunk)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS error towards the backend: {_why(exc)}") from None
        n = len(chunk)
        self._pending = self.outgoing.read()
        self._flush_now()
        if self._pending and n:
            self._owed = 1  # acknowledged once the ciphertext has left (see the class docstring)
            return n - 1
        return n

    def _flush_now(self) -> None:
        """Write what ciphertext the kernel takes now; keep the rest."""
        if self.outgoing.pending:
            self._pending += self.outgoing.read()
        while self._pending:
            try:
                sent = self.raw.send(self._pending)
            except BlockingIOError:
                return
            self._pending = self._pending[sent:]

    async def flush(self) -> None:
        """Write all ciphertext produced so far (handshake flights), waiting as needed."""
        self._flush_now()
        while self._pending:
            await trio.lowlevel.wait_writable(self.raw)
            self._flush_now()

    def shutdown(self, how: int) -> None:
        """Half-close: a close_notify if the socket takes it now, then the TCP FIN."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: the peer's close_notify has not come yet; nothing to wait for
        try:
            self._flush_now()
        except OSError:
            pass
        self.raw.shutdown(how)

    def still_open(self) -> bool:
        """An idle pooled connection the backend has not closed (nor written to)."""
        try:
            self.recv(1)
        except BlockingIOError:
            return True  # nothing at all, or only TLS records with no data (session tickets)
        except OSError:
            return False
        return False  # b"" (closed) or bytes nobody asked for: either way not reusable

    def close(self) -> None:
        try:
            self._tls.remember(self._address, self.obj.session)
        except (ValueError, ssl.SSLError):
            pass
        self.raw.close()

