"""The TLS ClientHello, read without decrypting anything: server name (SNI) and ALPN.

Owns the parse of the first handshake message of a TLS connection as it
arrives, possibly split over TCP segments and over several TLS records, so an
L4 listener can choose a pool by name and then forward the bytes untouched.
Pure: bytes in, a result out; no sockets, no clock. Never raises on any input:
garbage is a ``Malformed`` (with a reason) or ``NotTls``, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

# TLS record content type of handshake messages, and the handshake type of a ClientHello.
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
# RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
MAX_RECORD = 1 << 14
# Default bound on the ClientHello message (its handshake body). Browsers send
# 0.5-2 KiB (a post-quantum key share makes it ~1.8 KiB); 16 KiB leaves room
# for long ticket/PSK extensions while a client cannot make us buffer more.
DEFAULT_MAX_HELLO = 16 * 1024
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0
# RFC 1035: a DNS name is at most 253 characters written out (255 octets on the wire).
_MAX_NAME = 253
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The bytes so far are a valid beginning; read more."""


@dataclass(frozen=True, slots=True)
class NotTls:
    """The first byte is not a TLS handshake record: some other protocol."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A TLS handshake record, but not a ClientHello we can read; ``reason`` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A complete ClientHello. ``server_name`` is lower case without a trailing dot (None
    without SNI); ``alpn`` is the client's protocol list in its order."""

    server_name: str | None
    alpn: tuple[str, ...] = ()


HelloResult = NeedMore | NotTls | Malformed | ClientHello
NEED_MORE = NeedMore()
NOT_TLS = NotTls()


class _Truncated(Exception):
    """The message ends before a field does (internal)."""


class _Bad(Exception):
    """A field breaks the ClientHello grammar (internal); becomes ``Malformed``."""


class ClientHelloReader:
    """Accumulates a connection's first bytes until the ClientHello can be judged.

    ``feed(data)`` returns ``NEED_MORE`` until the result is final; after that it
    keeps returning the same final result. ``buffered`` holds every byte fed (to
    forward upstream as is). At most ``max_hello`` bytes of ClientHello are accepted
    (more is ``Malformed``), so the buffer never exceeds that plus record headers.
    """

    def __init__(self, max_hello: int = DEFAULT_MAX_HELLO) -> None:
        self.max_hello = max_hello
        self.buffered = bytearray()
        self.result: HelloResult = NEED_MORE
        # Length the buffer must reach before a new parse can tell more: a client
        # sending 1-byte segments costs one parse per record boundary, not per byte.
        self._next = 1

    def feed(self, data: bytes) -> HelloResult:
        if self.result is not NEED_MORE:
            return self.result
        self.buffered += data
        if len(self.buffered) >= self._next:
            self.result, self._next = _judge(bytes(self.buffered), self.max_hello)
        return self.result

    def feed_eof(self) -> HelloResult:
        """The client closed before the ClientHello was complete."""
        if self.result is NEED_MORE:
            self.result = Malformed(
                "connection closed before any byte" if not self.buffered
                else f"connection closed after {len(self.buffered)} bytes of an incomplete ClientHello"
            )
        return self.result


def parse_client_hello(data: bytes, max_hello: int = DEFAULT_MAX_HELLO) -> HelloResult:
    """Judge the first bytes of a connection: need more, not TLS, malformed, or the hello."""
    return _judge(data, max_hello)[0]


def _judge(data: bytes, max_hello: int) -> tuple[HelloResult, int]:
    """The result, and (for NEED_MORE) the buffer length at which to look again."""
    if not data:
        return NEED_MORE, 1
    if data[0] != _HANDSHAKE:
        return NOT_TLS, 0
    try:
        message = _handshake_message(data, max_hello)
        if isinstance(message, int):
            return NEED_MORE, message
        return _parse_hello_body(message), 0
    except _Bad as exc:
        return Malformed(str(exc)), 0
    except _Truncated:
        # The handshake message said how long it is and we hold all of it: a field
        # inside claims more than the message has.
        return Malformed("a field runs past the end of the ClientHello"), 0


def _handshake_message(data: bytes, max_hello: int) -> bytes | int:
    """The ClientHello body, joined from as many records as it spans; if incomplete, the
    buffer length needed to learn more (the end of the next record header or record)."""
    fragments = bytearray()
    pos = 0
    needed: int | None = None  # body length, once the 4-byte handshake header is in
    while True:
        if len(data) - pos < 5:
            return pos + 5
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != _HANDSHAKE:
            raise _Bad(f"record of content type {ctype} before the ClientHello was complete")
        if major != 3 or minor > 4:
            raise _Bad(f"record version {major}.{minor} is not TLS (3.x)")
        if length == 0:
            raise _Bad("empty handshake record")
        if length > MAX_RECORD:
            raise _Bad(f"record of {length} bytes is over the {MAX_RECORD}-byte limit")
        pos += 5
        # Judge the handshake header as soon as its bytes are in, even if the record is not:
        # a hello announced too large is refused before we buffer it.
        if needed is None:
            visible = fragments[:4] + data[pos : pos + min(length, 4)]
            if len(visible) >= 1 and visible[0] != _CLIENT_HELLO:
                raise _Bad(f"first handshake message is of type {visible[0]}, not ClientHello")
            if len(visible) >= 4:
                needed = int.from_bytes(visible[1:4], "big")
                if needed > max_hello:
                    raise _Bad(f"ClientHello of {needed} bytes is over the {max_hello}-byte limit")
        if len(data) - pos < length:
            # The header check above needs the first bytes of a record's body: look again then.
            return pos + (length if needed is not None else min(length, 4 - len(fragments)))
        fragments += data[pos : pos + length]
        pos += length
        if needed is not None and len(fragments) >= 4 + needed:
            # Bytes after the hello in the same record would be a second handshake
            # message: legal in theory, never sent by a client before the server speaks.
            if len(fragments) > 4 + needed:
                raise _Bad("bytes after the ClientHello in its record")
            return bytes(fragments[4:])


class _Cursor:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.end - self.pos < n:
            raise _Truncated()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sub(self, length_bytes: int) -> _Cursor:
        """A cursor over the next length-prefixed vector; this one moves past it."""
        n = self.uint(length_bytes)
        if self.end - self.pos < n:
            raise _Truncated()
        inner = _Cursor(self.data, self.pos, self.pos + n)
        self.pos += n
        return inner

    @property
    def left(self) -> int:
        return self.end - self.pos


def _parse_hello_body(body: bytes) -> ClientHello:
    c = _Cursor(body)
    major, _minor = c.uint(1), c.uint(1)
    if major != 3:
        raise _Bad(f"client version {major}.{_minor} is not TLS (3.x)")
    c.take(32)  # random
    if c.sub(1).left > 32:
        raise _Bad("session id longer than 32 bytes")
    suites = c.sub(2).left
    if suites == 0 or suites % 2:
        raise _Bad(f"cipher suite list of {suites} bytes (must be a non-empty even number)")
    if c.sub(1).left == 0:
        raise _Bad("empty compression method list")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if c.left == 0:
        return ClientHello(None)  # SSL 3.0 / early TLS: no extensions at all
    exts = c.sub(2)
    if c.left:
        raise _Bad(f"{c.left} bytes after the extensions")
    seen: set[int] = set()
    while exts.left:
        kind = exts.uint(2)
        ext = exts.sub(2)
        if kind in seen:
            raise _Bad(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(ext)
        elif kind == _EXT_ALPN:
            alpn = _alpn(ext)
    return ClientHello(server_name, alpn)


def _server_name(ext: _Cursor) -> str | None:
    if ext.left == 0:
        return None  # a server's empty echo; a client should not send it, but it names nothing
    names = ext.sub(2)
    if ext.left:
        raise _Bad("bytes after the server name list")
    found: str | None = None
    while names.left:
        kind = names.uint(1)
        raw = names.sub(2)
        value = raw.take(raw.left)
        if kind != _HOST_NAME:
            continue  # RFC 6066: unknown name types are skipped
        if found is not None:
            raise _Bad("two host names in the server name extension")
        found = _host_name(value)
    if found is None:
        raise _Bad("server name extension without a host name")
    return found


def _host_name(value: bytes) -> str:
    if value.endswith(b"."):
        value = value[:-1]
    if not value:
        raise _Bad("empty server name")
    if len(value) > _MAX_NAME:
        raise _Bad(f"server name of {len(value)} bytes (a DNS name has at most {_MAX_NAME})")
    if not _NAME_CHARS.issuperset(value) or b".." in value or value.startswith(b"."):
        shown = value[:64].decode("ascii", "backslashreplace")
        raise _Bad(f"server name {shown!r} is not a DNS name")
    return value.decode("ascii").lower()


def _alpn(ext: _Cursor) -> tuple[str, ...]:
    protos = ext.sub(2)
    if ext.left:
        raise _Bad("bytes after the ALPN protocol list")
    out: list[str] = []
    while protos.left:
        proto = protos.sub(1)
        if proto.left == 0:
            raise _Bad("empty ALPN protocol name")
        out.append(proto.take(proto.left).decode("latin-1"))
    if not out:
        raise _Bad("empty ALPN protocol list")
    return tuple(out)
