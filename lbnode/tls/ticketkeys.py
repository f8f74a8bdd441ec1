"""Session ticket keys set by us, so that every context holding the same key resumes the
sessions of the others: the listeners of every node of a cluster, and of every worker.

OpenSSL makes a context's ticket keys at random; its control
``SSL_CTRL_SET_TLSEXT_TICKET_KEYS`` replaces them with 80 bytes of ours (a 16-byte key name,
a 32-byte HMAC key and a 32-byte AES key, for TLS 1.2 and 1.3 tickets alike). Python's
``ssl`` does not expose it, nor the ``SSL_CTX *`` of a context: it is read here from the
``SSLContext`` object, where CPython keeps it right after the object header (``PySSLContext``
in ``Modules/_ssl.c``, unchanged since Python 3.0), and the control is called through ctypes
on the OpenSSL that ``_ssl`` is linked with.

Reading a private layout is only safe if it is checked: before the first use, a scratch
context's options are read both ways (``SSLContext.options`` and ``SSL_CTX_get_options`` on the
pointer), changed, and read both ways again; and every context's options are compared again
before its keys are set. If a check fails (another Python, another layout), ``Unsupported``
says why and the caller keeps OpenSSL's own keys: resumption then works per process, as
before. docs/tls.md, "Session tickets across nodes".
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl

TICKET_KEY_BYTES = 80
# OpenSSL makes the session ticket keys once per context and never changes them; a key that
# lives as long as the process would let whoever steals it later decrypt every resumed
# session recorded since (no forward secrecy for resumptions). So the listener's context
# (and with it the ticket keys and the session cache) is replaced this often: tickets older
# than this cost a full handshake. 12 h, as Go's crypto/tls rotates its keys daily-ish and
# Mozilla's guideline asks for rotation at least daily.
TICKET_KEY_LIFETIME = 12 * 3600.0
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


class Unsupported(Exception):
    """Ticket keys cannot be set on this Python or OpenSSL; the message says why."""


class _LibSsl:
    """The two OpenSSL functions used, from the library ``_ssl`` is linked with."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_ssl.__file__)  # dlsym on its handle finds its libssl's symbols
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64


def _pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``: the first field after CPython's object header."""
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0


@functools.cache
def _checked() -> _LibSsl | str:
    """The library once a scratch context passed the check, or why it did not."""
    try:
        lib = _LibSsl()
    except (OSError, AttributeError) as exc:
        return f"OpenSSL's SSL_CTX_ctrl is not reachable through ctypes ({exc})"
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pointer = _pointer(scratch)
    for _ in range(2):
        if not pointer or lib.get_options(pointer) != int(scratch.options):
            return "this Python does not keep an SSLContext's SSL_CTX where CPython 3 does"
        scratch.options ^= ssl.OP_CIPHER_SERVER_PREFERENCE  # a second, different value
    return lib


def unsupported() -> str | None:
    """Why ticket keys cannot be set here; None if they can."""
    checked = _checked()
    return checked if isinstance(checked, str) else None


def set_ticket_key(ctx: ssl.SSLContext, key: bytes) -> None:
    """Seal and open the session tickets of ``ctx`` (and of the connections that start on it)
    with ``key`` (TICKET_KEY_BYTES) from now on; ``Unsupported`` if that cannot be done."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes, not {len(key)}")
    lib = _checked()
    if isinstance(lib, str):
        raise Unsupported(lib)
    pointer = _pointer(ctx)
    if lib.get_options(pointer) != int(ctx.options):
        raise Unsupported("an SSLContext's SSL_CTX did not match its options")
    buf = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)
    if lib.ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, buf) != 1:
        raise Unsupported("OpenSSL refused the ticket keys (SSL_CTRL_SET_TLSEXT_TICKET_KEYS)")
