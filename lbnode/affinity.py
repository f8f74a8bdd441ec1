"""Session affinity: tables of learned key -> backend entries, and sealed affinity cookies.

Owns remembering which backend a session key was sent to (idle expiry, LRU
bound, first writer wins) and sealing a backend id into a cookie any node can
open. Never waits on the network and never reads the clock: ``now`` is passed
in; the only I/O is ``load_or_create_key``, called once at start-up. In a
cluster the tables and the cookie key come from ``SharedAffinity``
(``lbnode.cluster.affinity``), which does its etcd I/O in the background.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lbnode.balance.keys import cookie_value
from lbnode.model import Affinity

# --------------------------------------------------------------------------- tables


class AffinityTable(Protocol):
    """Session key -> backend id, with idle expiry. Independent of the balancing algorithm.

    Every method answers from local state at once, so an implementation backed
    by etcd fits the same shape: it serves ``get`` from the cache its watch
    keeps, and turns ``put_if_absent`` into a background ``create_revision ==
    0`` transaction on ``/fulcrum/v1/affinity/<pool>/<key>`` bound to a TTL
    lease (idle expiry; ``get`` queues a keepalive), adopting the winner when
    the watch reports another node's entry. The request never waits for the
    write; until it lands, the local choice stands.
    """

    evictions: int  # entries dropped to respect the size bound (not idle expiries)

    def get(self, key: str, now: float) -> str | None:
        """Backend id remembered for ``key``, refreshing its idle expiry; None if none or expired."""
        ...

    def put_if_absent(self, key: str, backend_id: str, now: float) -> str:
        """Remember ``backend_id`` unless a live entry exists; returns the entry that stands."""
        ...

    def replace(self, key: str, backend_id: str, now: float) -> None:
        """Overwrite the entry: the remembered backend was unusable and the request went elsewhere."""
        ...

    def delete(self, key: str) -> None:
        """Forget ``key`` (no error if absent)."""
        ...

    def items(self, now: float) -> list[tuple[str, str]]:
        """The live entries (key, backend id), without refreshing them."""
        ...

    def __len__(self) -> int: ...


def check_table_limits(idle_timeout: float, max_entries: int) -> None:
    """The limits every affinity table needs (ValueError otherwise)."""
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be > 0, got {idle_timeout}")
    if max_entries < 1:
        raise ValueError(f"max_entries must be >= 1, got {max_entries}")


class MemoryAffinityTable:
    """In-process table: an ``OrderedDict`` in least-recently-used order.

    Entries idle for ``idle_timeout`` seconds are gone (checked on use, and
    dropped from the old end on each insert); beyond ``max_entries`` the least
    recently used entry is evicted and counted in ``evictions``. ``len`` may
    include expired entries not yet dropped. ``now`` must not go backwards.
    """

    def __init__(self, idle_timeout: float, max_entries: int) -> None:
        check_table_limits(idle_timeout, max_entries)
        self.idle_timeout = idle_timeout
        self.max_entries = max_entries
        self.evictions = 0
        self.expirations = 0
        # key -> (backend id, last use), least recently used first
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        backend_id, last = entry
        if now - last >= self.idle_timeout:
            del self._entries[key]
            self.expirations += 1
            return None
        self._entries[key] = (backend_id, now)
        self._entries.move_to_end(key)
        return backend_id

    def put_if_absent(self, key: str, backend_id: str, now: float) -> str:
        existing = self.get(key, now)
        if existing is not None:
            return existing
        self._insert(key, backend_id, now)
        return backend_id

    def replace(self, key: str, backend_id: str, now: float) -> None:
        self._entries.pop(key, None)
        self._insert(key, backend_id, now)

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    def items(self, now: float) -> list[tuple[str, str]]:
        """The entries that stand now (key, backend), for a worker that starts."""
        return [(k, b) for k, (b, last) in self._entries.items() if now - last < self.idle_timeout]

    def expire(self, now: float) -> int:
        """Drop the entries idle for ``idle_timeout`` or more; returns how many."""
        entries = self._entries
        dropped = 0
        # Least recently used first: stop at the first entry still alive.
        while entries:
            key, (_, last) = next(iter(entries.items()))
            if now - last < self.idle_timeout:
                break
            del entries[key]
            dropped += 1
        self.expirations += dropped
        return dropped

    def _insert(self, key: str, backend_id: str, now: float) -> None:
        self.expire(now)
        entries = self._entries
        entries[key] = (backend_id, now)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1


# --------------------------------------------------------------------------- cookies

KEY_BYTES = 32  # AES-256-GCM
NONCE_BYTES = 12  # the GCM standard nonce; random per cookie
_VERSION = b"\x01"  # first byte of every sealed value, so the format can change later
_AAD = b"fulcrum-affinity-cookie"  # binds the ciphertext to this use of the key
_EXPIRY = struct.Struct(">Q")  # expiry in whole milliseconds since the epoch of ``now``
_MIN_SEALED = len(_VERSION) + NONCE_BYTES + _EXPIRY.size + 16  # + GCM tag


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    raw = text.encode("ascii")  # UnicodeEncodeError for non-ASCII: caught by the caller
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


class CookieSealer:
    """Seals a backend id and an expiry into a cookie-safe string (AES-GCM), and opens it.

    Any node holding the same key opens any node's cookie, with no lookup.
    The value is urlsafe base64 without padding: only ``A-Z a-z 0-9 - _``.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"affinity cookie key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        # Nonces never repeat under one key (all that AES-GCM needs): a random 64-bit prefix
        # per sealer and a 32-bit counter (NIST SP 800-38D's deterministic construction), so a
        # new session costs no getrandom system call; a fresh prefix when the counter wraps.
        self._prefix = os.urandom(NONCE_BYTES - 4)
        self._counter = 0

    def _nonce(self) -> bytes:
        self._counter += 1
        if self._counter >= 1 << 32:
            self._prefix, self._counter = os.urandom(NONCE_BYTES - 4), 1
        return self._prefix + self._counter.to_bytes(4, "big")

    def seal(self, backend_id: str, expires: float) -> str:
        nonce = self._nonce()
        plain = _EXPIRY.pack(max(0, int(expires * 1000))) + backend_id.encode(
            "utf-8", "surrogatepass"
        )
        return _b64encode(_VERSION + nonce + self._aead.encrypt(nonce, plain, _AAD))

    def open(self, value: str, now: float) -> str | None:
        """The backend id, or None for a tampered, malformed, expired or foreign value."""
        opened = self.unseal(value)
        return opened[0] if opened is not None and now < opened[1] else None

    def unseal(self, value: str) -> tuple[str, float] | None:
        """(backend id, expiry time) of an authentic value, expired or not; None otherwise."""
        try:
            raw = _b64decode(value)
            if len(raw) < _MIN_SEALED or raw[:1] != _VERSION:
                return None
            nonce = raw[1 : 1 + NONCE_BYTES]
            plain = self._aead.decrypt(nonce, raw[1 + NONCE_BYTES :], _AAD)
            (expires_ms,) = _EXPIRY.unpack_from(plain)
            return plain[_EXPIRY.size :].decode("utf-8"), expires_ms / 1000
        except (InvalidTag, ValueError, binascii.Error, TypeError, AttributeError, struct.error):
            # ValueError covers UnicodeEncodeError / UnicodeDecodeError.
            return None


# Replaced keys a keyring still opens cookies with (newest first). Each rotation adds one, and
# a cookie that the current key does not open is tried against each: a bound keeps both the
# memory and that cost fixed. A cookie sealed OLDER_KEYS + 1 rotations ago is not honoured:
# its client is balanced afresh and gets a new cookie. A cluster node keeps them across a
# restart (``save_older_keys``).
OLDER_KEYS = 4


class CookieKeyring:
    """The cookie key a node uses now, which may change while it runs.

    A node in a cluster starts with its own ``state_dir`` key and switches to
    the cluster's key when etcd answers, and again when an operator rotates the
    cluster key. It seals under the current key and opens under it or any of
    the ``OLDER_KEYS`` keys it replaced last, so the cookies handed out before a
    switch still work. Same interface as ``CookieSealer``.
    """

    def __init__(self, key: bytes, older: Sequence[bytes] = ()) -> None:
        """``older``: keys replaced before (newest first), e.g. ``load_older_keys``'s."""
        self.key = key
        self._current = CookieSealer(key)
        older = [k for k in dict.fromkeys(older) if k != key][:OLDER_KEYS]
        self._older: list[tuple[bytes, CookieSealer]] = [(k, CookieSealer(k)) for k in older]  # newest first

    def switch(self, key: bytes) -> bool:
        """Seal under ``key`` from now on; False (and nothing changes) if it is already current."""
        if key == self.key:
            return False
        sealer = CookieSealer(key)  # ValueError for a bad key, before anything changes
        self._older = [(k, s) for k, s in self._older if k != key]  # (a key that comes back)
        self._older.insert(0, (self.key, self._current))
        del self._older[OLDER_KEYS:]
        self.key, self._current = key, sealer
        return True

    def keys(self) -> list[bytes]:
        """The current key, then the older ones (newest first): what another process needs
        to seal and open exactly as this keyring does (``follow``)."""
        return [self.key, *(k for k, _ in self._older)]

    def follow(self, keys: list[bytes]) -> bool:
        """Take another keyring's ``keys()``: seal under ``keys[0]``, open under all of them (and
        under every key held before). ValueError for a bad key, before anything changes;
        whether the current key changed."""
        if not keys:
            raise ValueError("a cookie keyring needs at least one key")
        held = set(self.keys())
        added = [(k, CookieSealer(k)) for k in keys[1:] if k not in held]
        sealer = CookieSealer(keys[0]) if keys[0] != self.key else None
        self._older.extend(added)
        if sealer is None:
            del self._older[OLDER_KEYS:]
            return False
        self._older = [(k, s) for k, s in self._older if k != keys[0]]
        self._older.insert(0, (self.key, self._current))
        del self._older[OLDER_KEYS:]
        self.key, self._current = keys[0], sealer
        return True

    def seal(self, backend_id: str, expires: float) -> str:
        return self._current.seal(backend_id, expires)

    def open(self, value: str, now: float) -> str | None:
        opened = self.unseal(value)
        return opened[0] if opened is not None and now < opened[1] else None

    def unseal(self, value: str) -> tuple[str, float] | None:
        opened = self._current.unseal(value)
        if opened is None:
            for _, sealer in self._older:
                opened = sealer.unseal(value)
                if opened is not None:
                    break
        return opened


def set_cookie_header(name: str, value: str, ttl: float, tls: bool) -> str:
    """``Set-Cookie`` value for an affinity cookie; ``Secure`` when the client came over TLS."""
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max(0, int(ttl))}", "HttpOnly", "SameSite=Lax"]
    if tls:
        parts.append("Secure")
    return "; ".join(parts)


COOKIE_KEY_FILE = "cookie.key"
# The keys a node's keyring replaced (a cluster key rotated, its own key given up for the
# cluster's), newest first, one per line: what it still opens cookies with after a restart.
OLDER_KEYS_FILE = "cookie.key.older"
# Sealed cookie values already opened, kept per pool: enough for the clients of a busy node.
OPENED_CACHE_SIZE = 10_000


def load_or_create_key(state_dir: Path) -> bytes:
    """The node's cookie key from ``state_dir/cookie.key``, created (mode 0600) if missing.

    The file holds 64 hex digits. Two processes racing to create it agree: the
    key is written to a private temporary file and linked into place, and the
    loser reads the winner's file.
    """
    state_dir = Path(state_dir)
    path = state_dir / COOKIE_KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_dir / f".{COOKIE_KEY_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(KEY_BYTES).hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process got there first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def load_older_keys(state_dir: Path) -> list[bytes]:
    """The replaced keys ``save_older_keys`` wrote to ``state_dir``, newest first; [] if none.
    ValueError naming the file and the line if one is not a key."""
    path = Path(state_dir) / OLDER_KEYS_FILE
    try:
        lines = path.read_text(encoding="ascii", errors="replace").split()
    except FileNotFoundError:
        return []
    keys = []
    for n, line in enumerate(lines, 1):
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path}: line {n} is not {2 * KEY_BYTES} hex digits (a {KEY_BYTES}-byte key)")
        keys.append(key)
    return keys[:OLDER_KEYS]


def save_older_keys(state_dir: Path, keys: Sequence[bytes]) -> None:
    """Keep ``keys`` (a keyring's replaced keys, newest first) for the next start, in a file of
    mode 0600 replaced whole: written beside it, then renamed over it."""
    state_dir = Path(state_dir)
    tmp = state_dir / f".{OLDER_KEYS_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, "".join(f"{k.hex()}\n" for k in keys).encode("ascii"))
    finally:
        os.close(fd)
    os.replace(tmp, state_dir / OLDER_KEYS_FILE)


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"{path}: expected {2 * KEY_BYTES} hex digits (a {KEY_BYTES}-byte key); "
            "delete the file to generate a new key (existing affinity cookies stop matching)"
        )
    return key


# --------------------------------------------------------------------------- a pool's rules


class SharedAffinity(Protocol):
    """What a cluster gives the pools of its nodes: shared tables and the cluster cookie key.

    Both answer at once from local state (the etcd I/O happens in the
    background); ``Snapshot.build`` passes one down to every pool.
    """

    def table(self, pool: str, spec: Affinity, previous: AffinityTable | None) -> AffinityTable:
        """The pool's shared table; ``previous`` (same mode) is kept when it is a shared one."""
        ...

    def cookie_keyring(self) -> CookieKeyring:
        """The node's keyring for ``cookie`` mode pools without a configured ``key``."""
        ...


class Stickiness:
    """One pool's session persistence: which session a request belongs to, where it went.

    ``cookie`` mode seals the backend id into a cookie the node sets (no table:
    any node with the key honours it). ``source_ip``, ``header:NAME`` and
    ``cookie:NAME`` modes look the session key up in a table; the two last
    ones also learn keys that the application hands out in its response
    (``NAME`` response header, ``Set-Cookie: NAME=...``). Pure: times come in
    as arguments (``wall`` is wall-clock time, for cookie expiry across nodes).
    """

    def __init__(
        self, spec: Affinity, cookie_key: bytes | CookieKeyring | None, table: AffinityTable | None
    ) -> None:
        self.spec = spec
        self.mode, _, self.name = spec.mode.partition(":")
        self.sealer: CookieSealer | CookieKeyring | None
        if isinstance(cookie_key, CookieKeyring):
            self.sealer = cookie_key  # the cluster's: its key may switch while the node runs
            self.cookie_key: bytes | None = None
        else:
            self.sealer = CookieSealer(cookie_key) if cookie_key is not None else None
            self.cookie_key = cookie_key
        self.table = table
        self._opened: dict[str, tuple[str, float]] = {}  # sealed value -> (backend id, expiry)

    @classmethod
    def build(
        cls,
        spec: Affinity,
        state_dir: Path,
        previous: Stickiness | None,
        *,
        pool: str = "",
        shared: SharedAffinity | None = None,
    ) -> Stickiness:
        """Keep the previous table (sessions survive a config change) when the mode is unchanged.

        With ``shared`` (a cluster) the table and the generated cookie key are the
        cluster's; a configured ``key`` always wins.
        """
        if spec.mode == "cookie":
            if spec.key is None and shared is not None:
                return cls(spec, shared.cookie_keyring(), None)
            key = spec.key
            if key is None and previous is not None and previous.cookie_key is not None:
                key = previous.cookie_key  # generated at start: no need to read the file again
            return cls(spec, key if key is not None else load_or_create_key(state_dir), None)
        kept: AffinityTable | None = None
        if previous is not None and previous.spec.mode == spec.mode:
            kept = previous.table
        if shared is not None:
            return cls(spec, None, shared.table(pool, spec, kept))
        return cls(spec, None, kept if kept is not None else MemoryAffinityTable(spec.idle_timeout, spec.max_entries))

    def session_key(self, client_ip: str, header: Callable[[str], str | None]) -> str | None:
        """The table key of this request (None in cookie mode or when the request has none)."""
        if self.mode == "source_ip":
            return client_ip or None
        if self.mode == "header":
            return header(self.name.lower())
        if self.mode == "cookie" and self.name:
            cookies = header("cookie")
            return None if cookies is None else cookie_value(cookies, self.name)
        return None

    def remembered(self, client_ip: str, header: Callable[[str], str | None], now: float, wall: float) -> tuple[str | None, str | None]:
        """(backend id the session is bound to, session key) for this request."""
        if self.sealer is not None:
            cookies = header("cookie")
            value = None if cookies is None else cookie_value(cookies, self.spec.cookie_name)
            if value is None:
                return None, None
            # A returning client sends the same sealed value every time: decrypt it once.
            opened = self._opened.get(value)
            if opened is None:
                opened = self.sealer.unseal(value)
                if opened is None:
                    return None, None
                if len(self._opened) >= OPENED_CACHE_SIZE:
                    self._opened.pop(next(iter(self._opened)))  # oldest first: a bounded FIFO
                self._opened[value] = opened
            return (opened[0] if wall < opened[1] else None), None
        key = self.session_key(client_ip, header)
        if key is None or self.table is None:
            return None, key
        return self.table.get(key, now), key

    def bind(self, key: str | None, backend_id: str, previous_id: str | None, now: float) -> None:
        """The request with session ``key`` went to ``backend_id``: remember it (first writer wins)."""
        if key is None or self.table is None:
            return
        if previous_id is not None and previous_id != backend_id:
            self.table.replace(key, backend_id, now)  # its backend was down: the session moves
        else:
            self.table.put_if_absent(key, backend_id, now)

    def response_headers(self, backend_id: str, previous_id: str | None, wall: float, tls: bool) -> list[tuple[bytes, bytes]]:
        """Headers to add to the response: a fresh sealed cookie unless the client's one is right."""
        if self.sealer is None or previous_id == backend_id:
            return []
        value = self.sealer.seal(backend_id, wall + self.spec.ttl)
        cookie = set_cookie_header(self.spec.cookie_name, value, self.spec.ttl, tls)
        return [(b"Set-Cookie", cookie.encode("ascii"))]

    def learn(self, response_headers: list[tuple[bytes, bytes]], backend_id: str, now: float) -> None:
        """Session keys the application handed out in its response are bound to its backend."""
        if self.table is None or self.mode not in ("header", "cookie") or not self.name:
            return
        wanted = self.name.lower().encode("latin-1")
        for n, v in response_headers:
            lname = n.lower()
            if self.mode == "header" and lname == wanted:
                self.table.put_if_absent(v.decode("latin-1"), backend_id, now)
            elif self.mode == "cookie" and lname == b"set-cookie":
                first = v.decode("latin-1").split(";", 1)[0]
                k, sep, value = first.partition("=")
                if sep and k.strip() == self.name and value.strip():
                    self.table.replace(value.strip(), backend_id, now)
