"""The configuration model: pools, backends, listeners, routes, and their validation.

Owns the one place where raw data (a TOML table, later an API message or an
lbctl apply file) becomes frozen dataclasses, so an error reads the same
everywhere: ``pools[1].backends[0].address: "x" is not host:port``.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import builtins
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lbnode.routing import (
    TERMINAL_ACTIONS,
    FixedResponse,
    HeaderEdits,
    Mirror,
    Redirect,
    Route,
    Split,
    SplitSide,
    ValueMatch,
    check_regex,
)

if TYPE_CHECKING:
    from lbnode.tls.certs import Certificate

T = TypeVar("T")


class ConfigFileError(Exception):
    """A file that cannot be used (node.toml, a store or cache in state_dir); ``str()`` is the
    one line to print. Here, beside ConfigError, so that the stores below lbnode.config can
    raise it."""


class ConfigError(ValueError):
    """Invalid configuration; ``key`` is the dotted path of the offending value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


# --------------------------------------------------------------------------- values

ALGORITHMS = (
    "random",
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_loaded",
    "least_latency",
    "source_hash",
    "consistent_hash",
)
HASH_KEY_RE = re.compile(r"^(source_ip|path|(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")
AFFINITY_MODE_RE = re.compile(r"^(cookie|source_ip|(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")
ADMIN_STATES = ("enabled", "draining", "disabled")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object, key: str, *, bind: bool = False) -> Address:
    """``host:port`` or ``[v6]:port``; the host is an IP literal or a DNS name.

    A ``bind`` address may use port 0 (any free port; tests use it)."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string host:port, got {_type_name(value)}")
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", text) or re.fullmatch(
        r"([A-Za-z0-9.-]+):(\d{1,5})", text
    )
    if not m:
        raise ConfigError(key, f'"{value}" is not host:port')
    host, port = m.group(1), int(m.group(2))
    if not (0 if bind else 1) <= port <= 65535:
        raise ConfigError(key, f'"{value}": port {port} is out of range 1-65535')
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f'"{value}": "{host}" is not an IPv6 address') from None
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(key, f'"{value}": "{host}" is not an IPv4 address') from None
    return Address(host, port)


def parse_duration(value: object, key: str) -> float:
    """Seconds as a number, or a string with a unit: ``"250ms"``, ``"1.5s"``, ``"2m"``."""
    if isinstance(value, bool):
        raise ConfigError(key, "expected a duration, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if not m:
            raise ConfigError(key, f'"{value}" is not a duration (e.g. 5, "250ms", "1.5s", "2m")')
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(key, f"expected a duration, got {_type_name(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(key, f"duration must be a finite number >= 0, got {value!r}")
    return seconds


def parse_status_ranges(value: object, key: str) -> tuple[tuple[int, int], ...]:
    """``200``, ``"200-399"``, ``"200,204,300-399"`` or a list of those."""
    items: list[object]
    if isinstance(value, list):
        items = list(value)
    elif isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    else:
        items = [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ConfigError(key, f"expected status codes like 200 or \"200-399\", got {item!r}")
        text = str(item).strip()
        m = re.fullmatch(r"(\d{3})(?:\s*-\s*(\d{3}))?", text)
        if not m:
            raise ConfigError(key, f'"{text}" is not a status code or range like "200-399"')
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (100 <= lo <= hi <= 599):
            raise ConfigError(key, f'"{text}" is not a valid range of status codes 100-599')
        ranges.append((lo, hi))
    if not ranges:
        raise ConfigError(key, "at least one status code is required")
    return tuple(ranges)


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class Table:
    """Reads one table of raw config, remembering which keys were used.

    ``done()`` rejects the keys nobody asked for, so a typo is an error, not a
    silently ignored setting.
    """

    _MISSING: Any = object()

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a table, got {_type_name(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._used.add(name)
        if name not in self.data:
            if default is Table._MISSING:
                raise ConfigError(self.key(name), "is required")
            return default
        return self.data[name]

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw(name, default)
        if value is default and default is not Table._MISSING:
            return value
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"expected a string, got {_type_name(value)}")
        if choices and value not in choices:
            raise ConfigError(self.key(name), f'"{value}" is not one of: {", ".join(choices)}')
        return value

    def name(self, name: builtins.str, default: Any = _MISSING) -> Any:
        value = self.str(name, default)
        if value is default and default is not Table._MISSING:
            return value
        if not NAME_RE.fullmatch(value):
            raise ConfigError(
                self.key(name),
                f'"{value}" is not a valid name (letters, digits, "_", "-", "."; at most 63)',
            )
        return value

    def bool(self, name: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {_type_name(value)}")
        return value

    def int(self, name: builtins.str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        value = self.raw(name, default)
        if value is default and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"expected an integer, got {_type_name(value)}")
        if lo is not None and value < lo:
            raise ConfigError(self.key(name), f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(self.key(name), f"must be <= {hi}, got {value}")
        return value

    def number(self, name: builtins.str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None) -> Any:
        value = self.raw(name, default)
        if value is default and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(self.key(name), f"expected a number, got {_type_name(value)}")
        if lo is not None and value < lo:
            raise ConfigError(self.key(name), f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(self.key(name), f"must be <= {hi}, got {value}")
        return float(value)

    def duration(self, name: builtins.str, default: Any = _MISSING, positive: builtins.bool = True) -> Any:
        value = self.raw(name, default)
        if value is default and default is None:
            return None
        seconds = parse_duration(value, self.key(name))
        if positive and seconds <= 0:
            raise ConfigError(self.key(name), f"must be greater than 0, got {value!r}")
        return seconds

    def table(self, name: builtins.str) -> Table | None:
        value = self.raw(name, None)
        return None if value is None else Table(value, self.key(name))

    def tables(self, name: builtins.str) -> list[Table]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"expected a list of tables ([[{name}]]), got {_type_name(value)}")
        return [Table(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True, slots=True)
class Backend:
    address: Address
    weight: int = 1  # 0 = no new sessions
    name: str = ""  # defaults to the address
    max_inflight: int | None = None  # L7 requests at once (issue 4)
    max_connections: int | None = None  # L4 connections at once (issue 4)
    admin: str = "enabled"  # "enabled" | "draining" (no new sessions) | "disabled"

    @property
    def id(self) -> str:
        return self.name or str(self.address)


@dataclass(frozen=True, slots=True)
class PoolTimeouts:
    connect: float = 3.0  # backend TCP connect
    response: float = 30.0  # request fully sent -> first response byte
    idle: float = 60.0  # an idle pooled upstream connection is closed after this
    tcp_idle: float = 600.0  # L4: no bytes either way for this long closes the pair


@dataclass(frozen=True, slots=True)
class Affinity:
    mode: str  # "cookie" | "source_ip" | "header:NAME" | "cookie:NAME"
    cookie_name: str = "FULCRUM"
    key: bytes | None = None  # 32-byte AES-GCM key for mode "cookie"
    ttl: float = 86400.0  # lifetime of a sealed cookie
    idle_timeout: float = 1800.0  # learned entries expire after this idle time
    max_entries: int = 100_000


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str = "tcp"  # "tcp" | "http" | "grpc"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    path: str = "/"
    method: str = "GET"
    host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    expect_body: str | None = None
    initial_state: str = "up"  # state before the first result: "up" | "down"
    jitter: float = 0.1  # fraction of the interval added at random
    service: str = ""  # grpc: the service asked about (grpc.health.v1); "": the whole server


# Keys of [pools.health] that only an http check reads: with type = "grpc" one of them is a
# mistake (the path of a gRPC check is fixed by grpc.health.v1), not a setting to ignore.
HTTP_ONLY_HEALTH_KEYS = ("path", "method", "host", "expect_status", "expect_body")
# A gRPC service name is a protocol buffers full name; this bound keeps the request small.
MAX_GRPC_SERVICE = 200


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive_failures: int = 5
    eject_on_5xx: bool = False
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class PoolTls:
    """TLS to the backends of a pool (re-encryption): L7 upstreams, L4 sessions, health checks."""

    ca: str | None = None  # PEM bundle to verify backends against; None: the system store
    verify: bool = True  # verify the backend's certificate and name; false = encrypt only
    server_name: str | None = None  # SNI sent and name verified; None: the backend's host
    cert: str | None = None  # client certificate (PEM) for backends that require mTLS
    key: str | None = None  # its private key


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    backends: tuple[Backend, ...] = ()
    algorithm: str = "round_robin"
    hash_key: str = "source_ip"  # consistent_hash key
    maglev_table_size: int = 65537
    latency_decay: float = 10.0  # least_latency: peak-EWMA decay time in seconds
    timeouts: PoolTimeouts = field(default_factory=PoolTimeouts)
    max_idle_per_backend: int = 128  # pooled idle upstream connections per backend (above usual concurrency)
    affinity: Affinity | None = None
    health: HealthCheck | None = None
    outlier: Outlier | None = None
    slow_start: float = 0.0
    retries: int = 2
    retry_on: tuple[int, ...] = ()  # 502/503/504 retried for idempotent methods
    retry_budget_percent: float = 20.0
    retry_buffer_bytes: int = 64 * 1024  # request bodies up to this are buffered for retry
    queue_timeout: float = 5.0
    max_queue: int = 10_000
    # Without [pools.outlier]: how long a backend this node cannot connect to sits out here.
    connect_ejection: float = 2.0
    tls: PoolTls | None = None  # [pools.tls] with enabled = true
    # "v1" | "v2": a PROXY protocol header first on every backend connection (HAProxy's
    # send-proxy / send-proxy-v2), health checks included; None: none.
    send_proxy: str | None = None
    # "http1": HTTP/1.1 keep-alive connections, one request at a time each; "h2": HTTP/2
    # (cleartext with prior knowledge, or over [pools.tls] with ALPN "h2"), requests multiplexed
    # over a few connections (gRPC).
    protocol: str = "http1"


SEND_PROXY_VERSIONS = ("v1", "v2")
POOL_PROTOCOLS = ("http1", "h2")
# connect_ejection's upper bound: a backend back after a restart must not sit out longer
# than an operator would wait for it; [pools.outlier] and health checks cover longer outages.
CONNECT_EJECTION_MAX = 300.0


def parse_pool(t: Table) -> Pool:
    """One ``[[pools]]`` table (or an API/apply pool spec) into a ``Pool``."""
    name = t.name("name")
    algorithm = t.str("algorithm", "round_robin", choices=ALGORITHMS)
    hash_key = t.str("hash_key", "source_ip")
    if not HASH_KEY_RE.fullmatch(hash_key):
        raise ConfigError(
            t.key("hash_key"),
            f'"{hash_key}" is not one of source_ip, path, header:NAME, cookie:NAME, query:NAME',
        )
    table_size = t.int("maglev_table_size", 65537, lo=7, hi=1_000_003)
    if not _is_prime(table_size):
        raise ConfigError(t.key("maglev_table_size"), f"must be a prime number, got {table_size}")
    backends: list[Backend] = []
    seen: dict[str, str] = {}
    for bt in t.tables("backends"):
        backend = Backend(
            address=parse_address(bt.raw("address"), bt.key("address")),
            weight=bt.int("weight", 1, lo=0, hi=1000),
            name=bt.name("name", ""),
            max_inflight=bt.int("max_inflight", None, lo=1),
            max_connections=bt.int("max_connections", None, lo=1),
            admin=bt.str("admin", "enabled", choices=ADMIN_STATES),
        )
        bt.done()
        if backend.id in seen:
            raise ConfigError(bt.path, f'backend "{backend.id}" appears twice (also {seen[backend.id]})')
        seen[backend.id] = bt.path
        backends.append(backend)
    tt = t.table("timeouts")
    timeouts = PoolTimeouts()
    if tt is not None:
        timeouts = PoolTimeouts(
            connect=tt.duration("connect", timeouts.connect),
            response=tt.duration("response", timeouts.response),
            idle=tt.duration("idle", timeouts.idle),
            tcp_idle=tt.duration("tcp_idle", timeouts.tcp_idle),
        )
        tt.done()
    pool = Pool(
        name=name,
        backends=tuple(backends),
        algorithm=algorithm,
        hash_key=hash_key,
        maglev_table_size=table_size,
        latency_decay=t.duration("latency_decay", 10.0),
        timeouts=timeouts,
        max_idle_per_backend=t.int("max_idle_per_backend", 128, lo=0, hi=10_000),
        affinity=_parse_affinity(t.table("affinity")),
        health=_parse_health(t.table("health")),
        outlier=_parse_outlier(t.table("outlier")),
        slow_start=t.duration("slow_start", 0.0, positive=False),
        retries=t.int("retries", 2, lo=0, hi=10),
        retry_on=_parse_retry_on(t),
        retry_budget_percent=t.number("retry_budget_percent", 20.0, lo=0, hi=100),
        retry_buffer_bytes=t.int("retry_buffer_bytes", 64 * 1024, lo=0, hi=64 * 1024 * 1024),
        queue_timeout=t.duration("queue_timeout", 5.0, positive=False),
        max_queue=t.int("max_queue", 10_000, lo=0),
        connect_ejection=t.duration("connect_ejection", 2.0, positive=False),
        tls=_parse_pool_tls(t.table("tls")),
        send_proxy=t.str("send_proxy", None, choices=SEND_PROXY_VERSIONS),
        protocol=t.str("protocol", "http1", choices=POOL_PROTOCOLS),
    )
    if pool.protocol == "h2" and pool.send_proxy is not None:
        raise ConfigError(t.key("send_proxy"), 'is not supported with protocol = "h2" (HTTP/2 connections are '
                          "shared by many clients: a PROXY header can name only one)")
    if pool.connect_ejection > CONNECT_EJECTION_MAX:
        raise ConfigError(
            t.key("connect_ejection"),
            f"must be at most {CONNECT_EJECTION_MAX:g}s, got {t.raw('connect_ejection')!r} "
            "(for longer outages use [pools.health] or [pools.outlier])",
        )
    if pool.health is not None and pool.health.type == "grpc":
        _check_grpc_health(pool, t)
    t.done()
    return pool


def _check_grpc_health(pool: Pool, t: Table) -> None:
    """What a grpc check cannot do, refused here rather than failing every probe: grpcio makes
    the check's connections itself, so nothing can be written before its HTTP/2 preface, and
    it always verifies the backend's certificate (its Python API has no switch to skip that)."""
    if pool.send_proxy is not None:
        raise ConfigError(
            t.key("send_proxy"),
            'cannot be used with [pools.health] type = "grpc": grpcio opens the check\'s connections '
            "itself and cannot send a PROXY header before HTTP/2 (use a tcp or http check here)",
        )
    if pool.tls is not None and not pool.tls.verify:
        raise ConfigError(
            f"{t.key('tls')}.verify",
            'false cannot be used with [pools.health] type = "grpc": grpcio always verifies the '
            "backend's certificate (give the backends' CA in ca instead, or use a tcp or http check)",
        )


def _parse_pool_tls(t: Table | None) -> PoolTls | None:
    if t is None:
        return None
    enabled = t.bool("enabled", True)
    server_name = t.str("server_name", None)
    if server_name is not None:
        server_name = server_name.lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", server_name) or ".." in server_name:
            raise ConfigError(t.key("server_name"), f'"{server_name}" is not a host name')
    tls = PoolTls(
        ca=_path(t, "ca"),
        verify=t.bool("verify", True),
        server_name=server_name,
        cert=_path(t, "cert"),
        key=_path(t, "key"),
    )
    t.done()
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        raise ConfigError(t.key(missing), "is required with " + ("cert" if missing == "key" else "key")
                          + " (a client certificate needs both)")
    if tls.ca is not None and not tls.verify:
        raise ConfigError(t.key("ca"), "has no use with verify = false (remove one of them)")
    return tls if enabled else None


def _path(t: Table, name: str) -> str | None:
    value: str | None = t.str(name, None)
    if value is not None and not value.strip():
        raise ConfigError(t.key(name), "must be a file path (PEM), got an empty string")
    return value


def _parse_retry_on(t: Table) -> tuple[int, ...]:
    value = t.raw("retry_on", [])
    if not isinstance(value, list):
        raise ConfigError(t.key("retry_on"), f"expected a list of status codes, got {_type_name(value)}")
    codes = []
    for i, code in enumerate(value):
        if code not in (502, 503, 504) or isinstance(code, bool):
            raise ConfigError(f"{t.key('retry_on')}[{i}]", f"{code!r} is not one of 502, 503, 504")
        codes.append(code)
    return tuple(codes)


def _parse_affinity(t: Table | None) -> Affinity | None:
    if t is None:
        return None
    mode = t.str("mode")
    if not AFFINITY_MODE_RE.fullmatch(mode):
        raise ConfigError(
            t.key("mode"), f'"{mode}" is not one of cookie, source_ip, header:NAME, cookie:NAME'
        )
    key: bytes | None = None
    raw_key = t.str("key", None)
    if raw_key is not None:
        try:
            key = bytes.fromhex(raw_key)
        except ValueError:
            raise ConfigError(t.key("key"), "must be 64 hex digits (a 32-byte key)") from None
        if len(key) != 32:
            raise ConfigError(t.key("key"), f"must be 64 hex digits (a 32-byte key), got {len(raw_key)}")
    cookie_name = t.str("cookie_name", "FULCRUM")
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", cookie_name):
        raise ConfigError(t.key("cookie_name"), f'"{cookie_name}" is not a valid cookie name')
    affinity = Affinity(
        mode=mode,
        cookie_name=cookie_name,
        key=key,
        ttl=t.duration("ttl", 86400.0),
        idle_timeout=t.duration("idle_timeout", 1800.0),
        max_entries=t.int("max_entries", 100_000, lo=1),
    )
    t.done()
    return affinity


def _parse_health(t: Table | None) -> HealthCheck | None:
    if t is None:
        return None
    kind = t.str("type", "tcp", choices=("tcp", "http", "grpc"))
    if kind == "grpc":
        for key in HTTP_ONLY_HEALTH_KEYS:
            if t.has(key):
                raise ConfigError(t.key(key), 'is for type = "http" checks; a grpc check asks grpc.health.v1 '
                                  "(choose the service with service = ...)")
    service = t.str("service", "")
    if t.has("service") and kind != "grpc":
        raise ConfigError(t.key("service"), f'is for type = "grpc" checks, not "{kind}"')
    if len(service) > MAX_GRPC_SERVICE or any(ord(c) < 0x20 or c == "\x7f" for c in service):
        raise ConfigError(t.key("service"), f"{service[:MAX_GRPC_SERVICE]!r} is not a gRPC service name "
                          f"(at most {MAX_GRPC_SERVICE} characters, no control characters)")
    interval = t.duration("interval", 2.0)
    timeout = t.duration("timeout", min(1.0, interval))
    path = t.str("path", "/")
    if not path.startswith("/") or any(c in path for c in " \r\n\0"):
        raise ConfigError(t.key("path"), f'"{path}" must start with "/" and have no spaces')
    method = t.str("method", "GET")
    if not re.fullmatch(r"[A-Z]+", method):
        raise ConfigError(t.key("method"), f'"{method}" is not an HTTP method')
    check = HealthCheck(
        type=kind,
        interval=interval,
        timeout=timeout,
        rise=t.int("rise", 2, lo=1, hi=100),
        fall=t.int("fall", 3, lo=1, hi=100),
        path=path,
        method=method,
        host=t.str("host", None),
        expect_status=parse_status_ranges(t.raw("expect_status", "200-399"), t.key("expect_status")),
        expect_body=t.str("expect_body", None),
        initial_state=t.str("initial_state", "up", choices=("up", "down")),
        jitter=t.number("jitter", 0.1, lo=0, hi=1),
        service=service,
    )
    t.done()
    return check


def _parse_outlier(t: Table | None) -> Outlier | None:
    if t is None:
        return None
    outlier = Outlier(
        consecutive_failures=t.int("consecutive_failures", 5, lo=1),
        eject_on_5xx=t.bool("eject_on_5xx", False),
        base_ejection_time=t.duration("base_ejection_time", 30.0),
        max_ejection_percent=t.int("max_ejection_percent", 50, lo=0, hi=100),
    )
    t.done()
    return outlier


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


# --------------------------------------------------------------------------- listeners


@dataclass(frozen=True, slots=True)
class SniRoute:
    """TLS passthrough: connections whose ClientHello names ``server_name`` go to ``pool``."""

    server_name: str  # exact, or "*.example.com" (any name under example.com)
    pool: str

    def matches(self, name: str) -> bool:
        if self.server_name.startswith("*."):
            return name.endswith(self.server_name[1:])
        return name == self.server_name


def choose_sni_pool(routes: tuple[SniRoute, ...], server_name: str | None) -> str | None:
    """The pool for a server name: an exact route, else the longest matching wildcard, else None."""
    if server_name is None:
        return None
    best: SniRoute | None = None
    for route in routes:
        if route.server_name == server_name:
            return route.pool
        if route.matches(server_name) and (best is None or len(route.server_name) > len(best.server_name)):
            best = route
    return best.pool if best is not None else None


@dataclass(frozen=True, slots=True)
class ListenerTimeouts:
    header: float = 10.0  # client must send a whole request head within this (slowloris)
    idle: float = 60.0  # keep-alive: time allowed between requests
    body: float = 60.0  # client body: longest pause between two reads


@dataclass(frozen=True, slots=True)
class Http2Settings:
    """``[listeners.http2]``: HTTP/2 towards clients (issue 14), with the limits that bound
    what one connection may cost. The defaults are those of HAProxy, nginx and Envoy, within
    a factor of two; each limit is named in its error and counted in /metrics when it bites."""

    # https: offer h2 in ALPN (before http/1.1). http: accept h2c with prior knowledge
    # (the connection preface), off unless asked: no browser does it, only gRPC and tools.
    enabled: bool
    max_concurrent_streams: int = 100  # RFC 9113 recommends >= 100; nginx, HAProxy: 128/100
    initial_window: int = 65535  # per stream, bytes the client may send before we read them
    max_frame_size: int = 16384  # the largest frame we accept (the RFC's minimum is the default)
    max_header_list_size: int = 64 * 1024  # decoded request header list; also the HPACK table cap
    # Resets of streams by the client allowed per second (a burst of this many, refilled at
    # this rate): above it, the connection is closed (CVE-2023-44487, "rapid reset").
    max_resets_per_second: int = 200
    # PING and SETTINGS frames (and empty DATA) per second allowed from one client, as above.
    max_control_frames_per_second: int = 200


HTTP2_WINDOW_MAX = 2**31 - 1
HTTP2_FRAME_MAX = 2**24 - 1


def _parse_http2(t: Table, protocol: str, max_header_bytes: int) -> Http2Settings | None:
    ht = t.table("http2")
    if ht is None:
        return Http2Settings(enabled=True, max_header_list_size=max_header_bytes) if protocol == "https" else None
    if protocol not in L7_PROTOCOLS:
        raise ConfigError(ht.path, 'needs protocol = "http" or "https"')
    settings = Http2Settings(
        enabled=ht.bool("enabled", True),
        max_concurrent_streams=ht.int("max_concurrent_streams", 100, lo=1, hi=10_000),
        initial_window=ht.int("initial_window", 65535, lo=65535, hi=HTTP2_WINDOW_MAX),
        max_frame_size=ht.int("max_frame_size", 16384, lo=16384, hi=HTTP2_FRAME_MAX),
        max_header_list_size=ht.int("max_header_list_size", max_header_bytes, lo=1024, hi=16 * 1024 * 1024),
        max_resets_per_second=ht.int("max_resets_per_second", 200, lo=1),
        max_control_frames_per_second=ht.int("max_control_frames_per_second", 200, lo=1),
    )
    ht.done()
    return settings if settings.enabled else None


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # requests per second per client IP
    burst: int


@dataclass(frozen=True, slots=True)
class AcceptProxy:
    """``[listeners.proxy_protocol]`` with ``accept = true``: every connection starts with a
    PROXY protocol header (v1 or v2, told apart by its first bytes) from a balancer in front.

    Only peers in ``trusted`` may send one: anyone who can write the header chooses the
    client address the node believes (X-Forwarded-For, affinity, rate limits), so a
    connection from anywhere else is closed unread (as HAProxy's ``accept-proxy`` with
    ``tcp-request connection reject if !{ src -f trusted }``)."""

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    protocol: str  # "http" | "tcp" | "https" | "tls"
    bind: Address
    pool: str
    routes: tuple[Route, ...] = ()
    timeouts: ListenerTimeouts = field(default_factory=ListenerTimeouts)
    max_header_bytes: int = 64 * 1024
    max_connections: int | None = None
    rate_limit: RateLimit | None = None
    backlog: int = 1024
    tls: ListenerTls | None = None  # protocol "https" and "tls" (issue 11)
    redirect_https: int | None = None  # http: answer every request with 308 to https on this port
    sni_routes: tuple[SniRoute, ...] = ()  # tcp: pick the pool by the ClientHello's server name
    non_tls: str = "default"  # tcp with sni_routes: first byte not TLS -> "default" pool | "close"
    proxy_protocol: AcceptProxy | None = None  # [listeners.proxy_protocol] accept = true
    access_log: AccessLog | None = None  # [listeners.access_log]; None: off (issue 12)
    request_id: bool = False  # http/https: keep a valid X-Request-Id, else make one; to backend and client
    http2: Http2Settings | None = None  # None: HTTP/1.1 only (https default: on; http: h2c when asked)

    @property
    def reads_client_hello(self) -> bool:
        """A tcp listener that peeks at the ClientHello before choosing a pool."""
        return bool(self.sni_routes) or self.non_tls == "close"


PROTOCOLS = ("http", "tcp", "https", "tls")
L7_PROTOCOLS = ("http", "https")


def parse_listener(t: Table) -> Listener:
    protocol = t.str("protocol", choices=PROTOCOLS)
    routes: list[Route] = []
    route_names: dict[str, str] = {}
    for j, rt in enumerate(t.tables("routes")):
        if protocol not in L7_PROTOCOLS:
            raise ConfigError(rt.path, 'routes need protocol = "http" or "https"')
        route = parse_route(rt, j)
        if route.name in route_names:
            raise ConfigError(rt.key("name"), f'"{route.name}" is already used by {route_names[route.name]} '
                              "(a route without a name is named after its place, from 0)")
        route_names[route.name] = rt.path
        routes.append(route)
    sni_routes: list[SniRoute] = []
    seen_names: dict[str, str] = {}
    for st in t.tables("sni_routes"):
        if protocol != "tcp":
            raise ConfigError(st.path, 'sni_routes need protocol = "tcp" (TLS passthrough)')
        server_name = st.str("server_name").lower().rstrip(".")
        if not re.fullmatch(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", server_name) or ".." in server_name:
            raise ConfigError(st.key("server_name"), f'"{server_name}" is not a host name or "*.domain"')
        if server_name in seen_names:
            raise ConfigError(st.key("server_name"), f'"{server_name}" is already routed by {seen_names[server_name]}')
        seen_names[server_name] = st.path
        sni_routes.append(SniRoute(server_name=server_name, pool=st.name("pool")))
        st.done()
    non_tls = t.str("non_tls", "default", choices=("default", "close"))
    if non_tls != "default" and protocol != "tcp":
        raise ConfigError(t.key("non_tls"), 'needs protocol = "tcp" (TLS passthrough)')
    tt = t.table("timeouts")
    timeouts = ListenerTimeouts()
    if tt is not None:
        timeouts = ListenerTimeouts(
            header=tt.duration("header", timeouts.header),
            idle=tt.duration("idle", timeouts.idle),
            body=tt.duration("body", timeouts.body),
        )
        tt.done()
    rl = t.table("rate_limit")
    rate_limit = None
    if rl is not None:
        rate_limit = RateLimit(rate=rl.number("rate", lo=0.001), burst=rl.int("burst", lo=1))
        rl.done()
    listener = Listener(
        name=t.name("name"),
        protocol=protocol,
        bind=parse_address(t.raw("bind"), t.key("bind"), bind=True),
        pool=t.name("pool"),
        routes=tuple(routes),
        timeouts=timeouts,
        max_header_bytes=t.int("max_header_bytes", 64 * 1024, lo=1024, hi=16 * 1024 * 1024),
        max_connections=t.int("max_connections", None, lo=1),
        rate_limit=rate_limit,
        backlog=t.int("backlog", 1024, lo=1, hi=65535),
        tls=_parse_listener_tls(t, protocol),
        redirect_https=_parse_redirect_https(t, protocol),
        sni_routes=tuple(sni_routes),
        non_tls=non_tls,
        proxy_protocol=_parse_accept_proxy(t.table("proxy_protocol")),
        access_log=_parse_access_log(t, protocol),
        request_id=_parse_request_id(t, protocol),
    )
    if protocol in L7_PROTOCOLS or t.table("http2") is not None:
        listener = replace(listener, http2=_parse_http2(t, protocol, listener.max_header_bytes))
    t.done()
    return listener


# --------------------------------------------------------------------------- routes (issue 15)

TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: methods, header and cookie names
ROUTE_PRIORITY_LIMIT = 1_000_000
SPLIT_COOKIE_PREFIX = "FULCRUM_SPLIT_"


def parse_route(rt: Table, index: int) -> Route:
    """One ``[[listeners.routes]]`` table (or a route of the store: the same keys); ``index``
    (its place in the listener) is its name when it has none, which also names the cookie of
    a sticky split (``FULCRUM_SPLIT_<name>``)."""
    name = rt.name("name", str(index))
    host = rt.str("host", None)
    if host is not None:
        host = host.lower()
        if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?", host):
            raise ConfigError(rt.key("host"), f'"{host}" is not a host name or "*.domain"')
    path = rt.str("path", None)
    if path is not None and not path.startswith("/"):
        raise ConfigError(rt.key("path"), f'"{path}" must start with "/"')
    path_prefix = rt.str("path_prefix", None)
    if path_prefix is not None and not path_prefix.startswith("/"):
        raise ConfigError(rt.key("path_prefix"), f'"{path_prefix}" must start with "/"')
    path_regex = rt.str("path_regex", None)
    methods = rt.raw("methods", None)
    if methods is not None:
        if not isinstance(methods, list) or not methods:
            raise ConfigError(rt.key("methods"), f'expected a non-empty list like ["GET", "HEAD"], got {_type_name(methods)}')
        for k, m in enumerate(methods):
            if not isinstance(m, str) or not TOKEN_RE.fullmatch(m):
                raise ConfigError(f"{rt.key('methods')}[{k}]", f"{m!r} is not an HTTP method like \"GET\"")
    pool = rt.name("pool", None)
    split_tables = rt.tables("split") if rt.has("split") else None
    sticky = rt.bool("sticky", False)
    given = [a for a in TERMINAL_ACTIONS if rt.has(a)]
    if not given:
        raise ConfigError(rt.key("pool"), "is required (or split, to share the requests between pools; "
                          "or redirect or fixed_response, for the node to answer itself)")
    if len(given) > 1:
        raise ConfigError(rt.key(given[1]), f"conflicts with {given[0]}: give one of {', '.join(TERMINAL_ACTIONS)}")
    split = None
    if split_tables is not None:
        split = _parse_split(rt, split_tables, sticky, name)
    elif sticky:
        raise ConfigError(rt.key("sticky"), "needs split (a route with one pool has no side to keep)")
    redirect = _parse_redirect(rt.table("redirect"))
    fixed = _parse_fixed_response(rt.table("fixed_response"))
    path_prefix_rewrite, host_rewrite = _parse_rewrite(rt.table("rewrite"), path_prefix)
    request_headers = _parse_header_edits(rt.table("request_headers"), REQUEST_HEADERS_RESERVED,
                                          "the node writes it, or it frames the request"
                                          " (for Host use rewrite.host)")
    response_headers = _parse_header_edits(rt.table("response_headers"), RESPONSE_HEADERS_RESERVED,
                                           "the node writes it, or it frames the response")
    if response_headers is not None and response_headers.add:
        raise ConfigError(rt.key("response_headers.add"), "is not supported for responses: use set or remove")
    mirror = _parse_mirror(rt.table("mirror"))
    if redirect is not None or fixed is not None:
        # These act on a request that goes to a backend: the node's own answer has none.
        answer = "redirect" if redirect is not None else "fixed_response"
        for key in ("request_headers", "response_headers", "rewrite", "mirror"):
            if rt.has(key):
                raise ConfigError(rt.key(key), f"conflicts with {answer}: the node answers itself, no backend "
                                  "gets the request")
    route = Route(
        name=name,
        # The table as given (JSON-able: TOML and JSON values), its name filled in: the store's body.
        spec={**rt.data, "name": name},
        pool=pool,
        host=host,
        path=path,
        path_prefix=path_prefix,
        path_regex=None if path_regex is None else _regex(path_regex, rt.key("path_regex")),
        methods=frozenset(methods or ()),
        headers=tuple(_parse_value_matches(rt, "headers", lower=True)),
        cookies=tuple(_parse_value_matches(rt, "cookies", lower=False)),
        query=tuple(_parse_value_matches(rt, "query", lower=False)),
        client_cidrs=_parse_cidrs(rt, "client_cidrs"),
        priority=rt.int("priority", 0, lo=-ROUTE_PRIORITY_LIMIT, hi=ROUTE_PRIORITY_LIMIT),
        split=split,
        redirect=redirect,
        fixed_response=fixed,
        request_headers=request_headers,
        response_headers=response_headers,
        rewrite_path_prefix=path_prefix_rewrite,
        rewrite_host=host_rewrite,
        mirror=mirror,
        allow_cidrs=_parse_cidrs(rt, "allow_cidrs"),
        deny_cidrs=_parse_cidrs(rt, "deny_cidrs"),
    )
    rt.done()
    return route


# Fields a route may not edit, with the reason in the error (lower-case names).
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection",
                      "te", "trailer", "upgrade"})
REQUEST_HEADERS_RESERVED = _FRAMING | frozenset({
    "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "via"})
RESPONSE_HEADERS_RESERVED = _FRAMING | frozenset({"via"})
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
FIXED_BODY_LIMIT = 64 * 1024
_HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
# A field value as RFC 9110 5.5 allows it: visible characters, spaces and tabs inside.
_FIELD_VALUE_RE = re.compile(r"[\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?|")
# A path to put into a request line or Location: visible ASCII, no space, no "?" or "#".
_PATH_RE = re.compile(r"/[\x21-\x22\x24-\x3e\x40-\x7e]*")


def _parse_redirect(t: Table | None) -> Redirect | None:
    if t is None:
        return None
    status = t.int("status", 302)
    if status not in REDIRECT_STATUSES:
        raise ConfigError(t.key("status"), f"{status} is not a redirect status: one of "
                          f"{', '.join(map(str, REDIRECT_STATUSES))}")
    host = t.str("host", None)
    if host is not None:
        host = host.lower()
        if not _HOST_NAME_RE.fullmatch(host):
            raise ConfigError(t.key("host"), f'"{host}" is not a host name (give the port as port = ...)')
    path = t.str("path", None)
    if path is not None and not _PATH_RE.fullmatch(path):
        raise ConfigError(t.key("path"), f'"{path}" is not a path: it starts with "/", has no spaces, '
                          '"?" or "#" (keep_query keeps the request\'s query)')
    redirect = Redirect(
        status=status,
        scheme=t.str("scheme", None, choices=("http", "https")),
        host=host,
        port=t.int("port", None, lo=1, hi=65535),
        path=path,
        keep_query=t.bool("keep_query", True),
    )
    t.done()
    if (redirect.scheme, redirect.host, redirect.port, redirect.path) == (None, None, None, None):
        raise ConfigError(t.path, "give at least one of scheme, host, port or path (a redirect to the same URL "
                          "would loop)")
    return redirect


def _parse_fixed_response(t: Table | None) -> FixedResponse | None:
    if t is None:
        return None
    status = t.int("status", lo=200, hi=599)
    body = t.str("body", "")
    encoded = body.encode()
    if len(encoded) > FIXED_BODY_LIMIT:
        raise ConfigError(t.key("body"), f"is {len(encoded)} bytes; at most {FIXED_BODY_LIMIT} (serve larger "
                          "content from a pool)")
    if encoded and status in (204, 304):
        raise ConfigError(t.key("body"), f"must be empty: a {status} response has no body")
    content_type = t.str("content_type", "text/plain; charset=utf-8")
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;[\x20-\x7e]*)?", content_type):
        raise ConfigError(t.key("content_type"), f'"{content_type}" is not a media type like "text/html; charset=utf-8"')
    t.done()
    return FixedResponse(status=status, body=encoded, content_type=content_type)


def _parse_rewrite(t: Table | None, path_prefix: str | None) -> tuple[str | None, str | None]:
    if t is None:
        return None, None
    prefix = t.str("path_prefix", None)
    if prefix is not None:
        if path_prefix is None:
            raise ConfigError(t.key("path_prefix"), "needs the route's path_prefix (the part of the path it replaces)")
        if not _PATH_RE.fullmatch(prefix):
            raise ConfigError(t.key("path_prefix"), f'"{prefix}" is not a path: it starts with "/", has no spaces, '
                              '"?" or "#"')
    host = t.str("host", None)
    if host is not None:
        name, _, port = host.lower().partition(":") if not host.startswith("[") else (host.lower(), "", "")
        if not _HOST_NAME_RE.fullmatch(name) or (port and not (port.isdigit() and 1 <= int(port) <= 65535)):
            raise ConfigError(t.key("host"), f'"{host}" is not a host or host:port')
        host = host.lower()
    t.done()
    if prefix is None and host is None:
        raise ConfigError(t.path, "give path_prefix, host or both")
    return prefix, host


def _parse_header_edits(t: Table | None, reserved: frozenset[str], why: str) -> HeaderEdits | None:
    if t is None:
        return None
    seen: dict[str, str] = {}  # lower-case name -> where it was given

    def name_ok(name: object, key: str, section: str) -> str:
        if not isinstance(name, str) or not TOKEN_RE.fullmatch(name):
            raise ConfigError(key, f"{name!r} is not a header name")
        lname = name.lower()
        if lname in reserved:
            raise ConfigError(key, f"{name} cannot be changed here: {why}")
        if lname in seen:
            raise ConfigError(key, f"{name} is already in {seen[lname]}: give each name once")
        seen[lname] = section
        return name

    def pairs(section: str) -> tuple[tuple[str, str], ...]:
        raw = t.raw(section, None)
        if raw is None:
            return ()
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(t.key(section), f'expected a table of name = "value", got {_type_name(raw)}')
        out = []
        for name, value in raw.items():
            key = f"{t.key(section)}.{name}"
            name_ok(name, key, section)
            if not isinstance(value, str):
                raise ConfigError(key, f"expected a string, got {_type_name(value)}")
            if not _FIELD_VALUE_RE.fullmatch(value):
                raise ConfigError(key, f"{value!r} is not a header value (no line breaks or control characters, "
                                  "no spaces at either end)")
            out.append((name, value))
        return tuple(out)

    set_ = pairs("set")
    add = pairs("add")
    raw_remove = t.raw("remove", None)
    remove: set[str] = set()
    if raw_remove is not None:
        if not isinstance(raw_remove, list) or not raw_remove:
            raise ConfigError(t.key("remove"), f'expected a non-empty list of names, got {_type_name(raw_remove)}')
        for i, name in enumerate(raw_remove):
            remove.add(name_ok(name, f"{t.key('remove')}[{i}]", "remove").lower())
    t.done()
    if not (set_ or add or remove):
        raise ConfigError(t.path, "give set, add or remove")
    return HeaderEdits(set=set_, add=add, remove=frozenset(remove))


def _parse_mirror(t: Table | None) -> Mirror | None:
    if t is None:
        return None
    percent = t.number("percent", 100.0, hi=100.0)
    if percent <= 0:
        raise ConfigError(t.key("percent"), f"must be greater than 0, got {percent:g} (remove mirror to stop it)")
    mirror = Mirror(
        pool=t.name("pool"),
        percent=percent,
        max_inflight=t.int("max_inflight", 16, lo=1, hi=100_000),
        max_body_bytes=t.int("max_body_bytes", 64 * 1024, lo=0, hi=64 * 1024 * 1024),
    )
    t.done()
    return mirror


def _regex(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return check_regex(pattern)
    except ValueError as exc:
        raise ConfigError(key, f'"{pattern}" {exc}') from None


def _parse_value_matches(rt: Table, name: str, lower: bool) -> list[ValueMatch]:
    """``headers``, ``cookies`` or ``query``: a list of {name, and one of exact, regex, present}."""
    out = []
    for vt in rt.tables(name):
        what = vt.str("name")
        if not what or (name != "query" and not TOKEN_RE.fullmatch(what)):
            raise ConfigError(vt.key("name"), f"{what!r} is not a valid {name[:-1] if name != 'query' else 'parameter'} name")
        given = [k for k in ("exact", "regex", "present") if vt.has(k)]
        if len(given) != 1:
            raise ConfigError(vt.path, "give exactly one of exact, regex or present"
                              + (f" (got {', '.join(given)})" if given else ""))
        exact = vt.str("exact", None)
        regex = vt.str("regex", None)
        present = vt.bool("present", True)
        vt.done()
        out.append(ValueMatch(
            name=what.lower() if lower else what,
            exact=exact,
            regex=None if regex is None else _regex(regex, vt.key("regex")),
            present=present,
        ))
    return out


def _parse_cidrs(rt: Table, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = rt.raw(name, None)
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(rt.key(name), f'expected a non-empty list of CIDRs like ["192.0.2.0/24"], got {_type_name(raw)}')
    networks = []
    for i, item in enumerate(raw):
        key = f"{rt.key(name)}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key, f'expected a CIDR like "192.0.2.0/24", got {_type_name(item)}')
        try:
            networks.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:
            raise ConfigError(key, f'"{item}" is not a CIDR like "192.0.2.0/24" or "2001:db8::/32" ({exc})') from None
    return tuple(networks)


def _parse_split(rt: Table, tables: list[Table], sticky: bool, name: str) -> Split:
    if not tables:
        raise ConfigError(rt.key("split"), 'expected at least one {pool = "...", weight = ...}')
    sides: list[SplitSide] = []
    for st in tables:
        side = SplitSide(pool=st.name("pool"), weight=st.int("weight", lo=1, hi=1_000_000))
        if any(s.pool == side.pool for s in sides):
            raise ConfigError(st.key("pool"), f'pool "{side.pool}" is already in this split')
        st.done()
        sides.append(side)
    return Split(tuple(sides), cookie=f"{SPLIT_COOKIE_PREFIX}{name}" if sticky else None)


def route_from_dict(data: object, path: str = "route") -> Route:
    """A stored route (its node.toml table as JSON, ``name`` included) with the file's validation."""
    t = Table(data, path)
    if not t.has("name"):
        raise ConfigError(t.key("name"), "is required (a route of the store is known by its listener and name)")
    return parse_route(t, 0)


def check_route_pools(route: Route, pool_names: Collection[str], key: str) -> None:
    """ConfigError naming the first key of ``route`` whose pool is not in ``pool_names``."""
    for field_key, pool in route.pool_refs():
        if pool not in pool_names:
            raise ConfigError(f"{key}.{field_key}", f'pool "{pool}" is not defined')


def listener_routes(listeners: Sequence[Listener]) -> list[tuple[str, Route]]:
    """Every route of ``listeners`` with its listener's name: what node.toml seeds a store with."""
    return [(li.name, route) for li in listeners for route in li.routes]


def missing_pools(route: Route, pool_names: Collection[str]) -> list[str]:
    """The pools ``route`` sends to that do not exist (its requests answer 503 "pool ... is not
    configured"). A missing mirror pool is not one: the requests are served, and the copies
    are counted as dropped (``fulcrum_mirror_dropped_total{reason="no_pool"}``)."""
    return [pool for key, pool in route.pool_refs() if key != "mirror.pool" and pool not in pool_names]


def _parse_accept_proxy(t: Table | None) -> AcceptProxy | None:
    """``[listeners.proxy_protocol]``: ``accept`` (required) and the ``trusted`` CIDRs."""
    if t is None:
        return None
    accept = t.bool("accept")
    raw = t.raw("trusted", None)
    t.done()
    if raw is None:
        if not accept:
            return None
        raise ConfigError(t.key("trusted"), 'is required with accept = true: the addresses of the balancers in '
                          'front, like ["192.0.2.10/32", "2001:db8::10/128"] (connections from anywhere else '
                          "are closed)")
    networks = _parse_cidrs(t, "trusted")  # checked even with accept = false: a mistake is one
    return AcceptProxy(networks) if accept else None


# --------------------------------------------------------------------------- access log (issue 12)

ACCESS_LOG_FORMATS = ("json", "combined")
STDOUT_PATHS = ("-", "stdout")


@dataclass(frozen=True, slots=True)
class AccessLog:
    """``[listeners.access_log]``: where and how a listener logs each request (L4: connection)."""

    path: str  # "-" for the process's stdout, else a file (opened in append mode)
    format: str = "json"  # "json" (one object per line) | "combined" (Apache/nginx combined, http only)
    buffer: int = 10_000  # entries waiting to be written; more are dropped and counted

    @property
    def to_stdout(self) -> bool:
        return self.path == "-"


def _parse_access_log(t: Table, protocol: str) -> AccessLog | None:
    at = t.table("access_log")
    if at is None:
        return None
    path = at.str("path")
    if path in STDOUT_PATHS:
        path = "-"
    elif not path.strip() or "\0" in path or path.endswith("/"):
        raise ConfigError(at.key("path"), f'"{path}" is not a file path (or "-" for stdout)')
    fmt = at.str("format", "json", choices=ACCESS_LOG_FORMATS)
    if fmt == "combined" and protocol not in L7_PROTOCOLS:
        raise ConfigError(at.key("format"), 'combined is for protocol = "http" or "https" listeners '
                          '(an L4 connection has no request line): use "json"')
    settings = AccessLog(path=path, format=fmt, buffer=at.int("buffer", 10_000, lo=1, hi=10_000_000))
    at.done()
    return settings


def _parse_request_id(t: Table, protocol: str) -> bool:
    value: bool = t.bool("request_id", False)
    if value and protocol not in L7_PROTOCOLS:
        raise ConfigError(t.key("request_id"), 'is an HTTP header: only for protocol = "http" or "https"')
    return value


# --------------------------------------------------------------------------- TLS (issue 11)

TLS_VERSIONS = ("1.2", "1.3")
CLIENT_AUTH = ("none", "optional", "required")


@dataclass(frozen=True, slots=True)
class CertificateFile:
    """One ``[[certificates]]`` entry: where node.toml says a certificate and its key are."""

    name: str
    cert: str  # PEM chain, leaf first
    key: str  # PEM private key


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """``[listeners.tls]``: what a TLS-terminating listener serves and accepts."""

    certificates: tuple[str, ...]  # names; the first is the default (no or unknown SNI)
    min_version: str = "1.2"  # "1.2" | "1.3"; the maximum is always 1.3
    ciphers: str | None = None  # OpenSSL cipher string for TLS 1.2, to tighten the default
    client_ca: str | None = None  # PEM bundle of CAs a client certificate must chain to
    client_auth: str = "none"  # "none" | "optional" | "required"
    handshake_timeout: float = 5.0  # a ClientHello and the whole handshake within this
    max_handshakes: int = 256  # handshakes in progress at once; more wait in accept order
    hsts: str | None = None  # Strict-Transport-Security value (https only)


def _parse_listener_tls(t: Table, protocol: str) -> ListenerTls | None:
    tt = t.table("tls")
    if protocol not in ("https", "tls"):
        if tt is not None:
            raise ConfigError(tt.path, f'needs protocol = "https" or "tls" (this listener is "{protocol}")')
        return None
    if tt is None:
        raise ConfigError(t.key("tls"), f'is required for protocol = "{protocol}" (at least certificates = ["NAME"])')
    names = tt.raw("certificates")
    if not isinstance(names, list) or not names:
        raise ConfigError(tt.key("certificates"), 'expected a non-empty list of certificate names, e.g. ["www"]')
    for i, n in enumerate(names):
        if not isinstance(n, str) or not NAME_RE.fullmatch(n):
            raise ConfigError(f"{tt.key('certificates')}[{i}]", f"{n!r} is not a certificate name")
    if len(set(names)) != len(names):
        raise ConfigError(tt.key("certificates"), "a certificate is named twice")
    ciphers = tt.str("ciphers", None)
    if ciphers is not None and (not ciphers.strip() or any(c in ciphers for c in " \t\r\n\0")):
        raise ConfigError(tt.key("ciphers"), f'"{ciphers}" is not an OpenSSL cipher string like "ECDHE+AESGCM"')
    client_auth = tt.str("client_auth", "none", choices=CLIENT_AUTH)
    client_ca = tt.str("client_ca", None)
    if client_auth != "none" and client_ca is None:
        raise ConfigError(tt.key("client_ca"), f'is required with client_auth = "{client_auth}"')
    if client_ca is not None and client_auth == "none":
        raise ConfigError(tt.key("client_auth"), 'set "optional" or "required" to use client_ca')
    hsts = tt.str("hsts", None)
    if hsts is not None:
        if protocol != "https":
            raise ConfigError(tt.key("hsts"), 'is an HTTP header: only for protocol = "https"')
        if not re.fullmatch(r"max-age=\d+(\s*;\s*(includeSubDomains|preload))*", hsts):
            raise ConfigError(tt.key("hsts"), f'"{hsts}" is not like "max-age=31536000; includeSubDomains"')
    settings = ListenerTls(
        certificates=tuple(names),
        min_version=tt.str("min_version", "1.2", choices=TLS_VERSIONS),
        ciphers=ciphers,
        client_ca=client_ca,
        client_auth=client_auth,
        handshake_timeout=tt.duration("handshake_timeout", 5.0),
        max_handshakes=tt.int("max_handshakes", 256, lo=1, hi=100_000),
        hsts=hsts,
    )
    tt.done()
    return settings


def _parse_redirect_https(t: Table, protocol: str) -> int | None:
    value = t.raw("redirect_https", None)
    if value is None or value is False:
        return None
    if protocol != "http":
        raise ConfigError(t.key("redirect_https"), 'is for protocol = "http" listeners')
    if value is True:
        return 443
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(t.key("redirect_https"), f"expected true or a port 1-65535, got {value!r}")
    return value


def parse_certificate_files(root: Table) -> tuple[CertificateFile, ...]:
    """``[[certificates]]``: names and file paths only (reading them is ``lbnode.config``'s)."""
    out = []
    for ct in root.tables("certificates"):
        out.append(CertificateFile(name=ct.name("name"), cert=ct.str("cert"), key=ct.str("key")))
        ct.done()
    _unique(out, "certificates", lambda c: c.name)
    return tuple(out)


# --------------------------------------------------------------------------- node


@dataclass(frozen=True, slots=True)
class NodeSettings:
    id: str
    admin: Address | None = None
    state_dir: str = "state"
    drain_timeout: float = 30.0
    # Client connections open at once on all listeners together (None: no node-wide cap).
    # Not counted: the admin endpoint and the control API, which must stay reachable in a flood.
    max_connections: int | None = None
    # Data-plane processes (issue 13): 1 = one process; N >= 2 = a supervisor and N worker
    # processes on the same listening sockets. node.toml's default is "auto", resolved at parse
    # time (``_parse_workers``). Only ``lbnode run`` starts workers: an LbNode run directly
    # (``lbnode demo``, in-process tests) is one process whatever this says.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Who may use the admin endpoint (``[admin]``); ``/healthz`` stays open to every client.

    File paths, read and checked by ``lbnode.admin.access.load_access`` (at ``lbnode check``
    and at start), so a secret never sits in node.toml itself."""

    token_file: str | None = None  # the bearer token every other request must carry
    cert: str | None = None  # TLS on the admin endpoint: certificate chain (PEM)
    key: str | None = None  # and its private key
    client_ca: str | None = None  # other requests need a client certificate this CA signed

    @property
    def open(self) -> bool:
        return self.token_file is None and self.cert is None


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """The gRPC control API of this node (mutual TLS unless ``insecure``)."""

    bind: Address
    ca: str | None = None  # PEM of the cluster CA: clients must present a certificate it signed
    cert: str | None = None  # this node's certificate (PEM)
    key: str | None = None  # and its private key
    insecure: bool = False  # plain text, no client certificates: for tests and labs only
    # Certificate common names given a role whatever their OU says (lbnode/control/roles.py).
    admins: frozenset[str] = frozenset()
    readers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Membership of an etcd-backed cluster; absent = standalone."""

    etcd: tuple[str, ...]  # endpoints, e.g. "http://127.0.0.1:2379"
    lease_ttl: float = 5.0  # node key and health observations vanish this long after the node dies
    health_checkers: int = 2  # nodes actively checking each backend (rendezvous hashing)
    prefix: str = "/fulcrum/v1"
    vips: tuple[VipSpec, ...] = ()  # [[cluster.vips]]: addresses held by one node at a time
    heartbeat: Address | None = None  # UDP address of this node's VIP claimer heartbeats (None: lease-only failover)
    # https:// endpoints: the CA that signed etcd's certificates, and this node's client
    # certificate and key (file paths; read and checked by lbnode.cluster.etcd.load_tls).
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None

    @property
    def etcd_tls(self) -> bool:
        return self.etcd[0].startswith("https://")


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeSettings
    listeners: tuple[Listener, ...]
    pools: tuple[Pool, ...]
    control: ControlSettings | None = None
    cluster: ClusterSettings | None = None
    admin: AdminSettings = AdminSettings()  # [admin]: token and TLS of [node] admin
    certificate_files: tuple[CertificateFile, ...] = ()  # [[certificates]] as written
    # Loaded from those files by lbnode.config (a store adds its own: the store wins a name)
    certificates: tuple[Certificate, ...] = ()

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)


# A cgroup v2 quota (``cpu.max``: "<quota> <period>" or "max <period>") caps the CPU time the
# node gets whatever the affinity mask says; a worker per core beyond it only adds switches.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 quota (rounded up)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 (or no quota file): the affinity mask alone
    return max(1, cores)


# The default of ``[node] workers`` (issue 13): a node uses the cores it is given. A node that
# must stay one process (one pid, one log on stdout, exact per-client rate limits) says 1.
DEFAULT_WORKERS = "auto"


def _parse_workers(nt: Table) -> int:
    """``[node] workers``: an integer >= 1, or "auto" (one per available core; the default)."""
    value = nt.raw("workers", DEFAULT_WORKERS)
    if value == "auto":
        return available_cores()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(nt.key("workers"), f'expected an integer >= 1 or "auto", got {_type_name(value)}')
    if value < 1:
        raise ConfigError(nt.key("workers"), f'must be >= 1 or "auto", got {value}')
    return value


def parse_config(data: object) -> Config:
    """A whole node.toml document (already decoded) into a ``Config``."""
    root = Table(data, "")
    nt = Table(root.raw("node"), "node")
    admin_raw = nt.raw("admin", None)
    node = NodeSettings(
        id=nt.name("id"),
        admin=None if admin_raw is None else parse_address(admin_raw, "node.admin", bind=True),
        state_dir=nt.str("state_dir", "state"),
        drain_timeout=nt.duration("drain_timeout", 30.0, positive=False),
        max_connections=nt.int("max_connections", None, lo=1),
        workers=_parse_workers(nt),
    )
    nt.done()
    pools = [parse_pool(pt) for pt in root.tables("pools")]
    listeners = [parse_listener(lt) for lt in root.tables("listeners")]
    control = _parse_control(root.table("control"))
    cluster = _parse_cluster(root.table("cluster"))
    admin = _parse_admin(root.table("admin"), node)
    certificate_files = parse_certificate_files(root)
    root.done()
    _unique(pools, "pools", lambda p: p.name)
    _unique(listeners, "listeners", lambda li: li.name)
    pool_names = {p.name for p in pools}
    # With a store (etcd, or the API's file store) pools may be created later through the
    # control API; until then the listener answers 503. Without one, a missing pool is a typo.
    pools_from_store = control is not None or cluster is not None
    binds: dict[tuple[str, int], int] = {}
    for i, li in enumerate(listeners):
        if li.pool not in pool_names and not pools_from_store:
            raise ConfigError(f"listeners[{i}].pool", f'pool "{li.pool}" is not defined')
        for j, route in enumerate(li.routes):
            if not pools_from_store:
                check_route_pools(route, pool_names, f"listeners[{i}].routes[{j}]")
        for j, sni in enumerate(li.sni_routes):
            if sni.pool not in pool_names and not pools_from_store:
                raise ConfigError(f"listeners[{i}].sni_routes[{j}].pool", f'pool "{sni.pool}" is not defined')
        if li.reads_client_hello:
            # The client's TLS goes to the backend as is: a second TLS layer around it cannot work.
            tls_pools = {p.name for p in pools if p.tls is not None}
            targets = [(f"listeners[{i}].pool", li.pool)] + [
                (f"listeners[{i}].sni_routes[{j}].pool", r.pool) for j, r in enumerate(li.sni_routes)]
            for key, name in targets:
                if name in tls_pools:
                    raise ConfigError(key, f'pool "{name}" has [pools.tls], but this listener passes the '
                                      "client's TLS through as is (remove [pools.tls] or use another pool)")
        bind_key = (li.bind.host, li.bind.port)
        if li.bind.port and bind_key in binds:
            raise ConfigError(
                f"listeners[{i}].bind", f"{li.bind} is already used by listeners[{binds[bind_key]}]"
            )
        binds[bind_key] = i
        if li.tls is not None and not pools_from_store:
            # With a store, certificates may come through the control API later; until then
            # handshakes for them fail (counted and logged). Without one, a missing name is a typo.
            cert_names = {c.name for c in certificate_files}
            for j, cname in enumerate(li.tls.certificates):
                if cname not in cert_names:
                    raise ConfigError(f"listeners[{i}].tls.certificates[{j}]",
                                      f'certificate "{cname}" is not defined in [[certificates]]')
    if node.admin is not None and node.admin.port and (node.admin.host, node.admin.port) in binds:
        raise ConfigError("node.admin", f"{node.admin} is already used by a listener")
    if control is not None and control.bind.port and (control.bind.host, control.bind.port) in binds:
        raise ConfigError("control.bind", f"{control.bind} is already used by a listener")
    return Config(node=node, listeners=tuple(listeners), pools=tuple(pools), control=control, cluster=cluster,
                  admin=admin, certificate_files=certificate_files)


def _parse_admin(t: Table | None, node: NodeSettings) -> AdminSettings:
    if t is None:
        return AdminSettings()
    admin = AdminSettings(
        token_file=t.str("token_file", None),
        cert=t.str("cert", None),
        key=t.str("key", None),
        client_ca=t.str("client_ca", None),
    )
    t.done()
    if node.admin is None:
        raise ConfigError("admin", "node.admin is not set, so there is no admin endpoint to protect: "
                          'set node.admin = "host:port" or remove [admin]')
    if (admin.cert is None) != (admin.key is None):
        missing = "key" if admin.key is None else "cert"
        raise ConfigError(t.key(missing), "is required: cert and key go together (TLS on the admin endpoint)")
    if admin.client_ca is not None and admin.cert is None:
        raise ConfigError(t.key("client_ca"), "client certificates need TLS: set admin.cert and admin.key too")
    return admin


def _parse_control(t: Table | None) -> ControlSettings | None:
    if t is None:
        return None
    control = ControlSettings(
        bind=parse_address(t.raw("bind"), t.key("bind"), bind=True),
        ca=t.str("ca", None),
        cert=t.str("cert", None),
        key=t.str("key", None),
        insecure=t.bool("insecure", False),
        admins=_names(t, "admins"),
        readers=_names(t, "readers"),
    )
    t.done()
    both = sorted(control.admins & control.readers)
    if both:
        raise ConfigError(t.key("readers"), f'"{both[0]}" is also in {t.key("admins")}: give each name one role')
    if control.insecure and (control.admins or control.readers):
        raise ConfigError(
            t.key("admins" if control.admins else "readers"),
            "roles come from client certificates, and insecure = true has none: remove the list or the insecure flag",
        )
    if not control.insecure:
        for name in ("ca", "cert", "key"):
            if getattr(control, name) is None:
                raise ConfigError(
                    t.key(name), 'is required for mutual TLS (or set insecure = true for plain text)'
                )
    return control


def _check_etcd_tls(t: Table, cluster: ClusterSettings) -> None:
    """One scheme for every endpoint; https:// needs etcd_ca, and a client certificate comes with its key."""
    schemes = {ep.split("://", 1)[0] for ep in cluster.etcd}
    if len(schemes) > 1:
        raise ConfigError(t.key("etcd"), "mixes http:// and https:// endpoints: give every endpoint the same scheme")
    if cluster.etcd_tls:
        if cluster.etcd_ca is None:
            raise ConfigError(t.key("etcd_ca"), "is required with https:// endpoints (the CA that signed etcd's certificates)")
        if (cluster.etcd_cert is None) != (cluster.etcd_key is None):
            missing = "etcd_key" if cluster.etcd_key is None else "etcd_cert"
            raise ConfigError(t.key(missing), "is required: etcd_cert and etcd_key go together (the client certificate and its key)")
        return
    for key in ("etcd_ca", "etcd_cert", "etcd_key"):
        if getattr(cluster, key) is not None:
            raise ConfigError(t.key(key), "is set but the etcd endpoints are http://: use https:// endpoints")


def _names(t: Table, key: str) -> frozenset[str]:
    """A list of certificate common names (``[control] admins = ["alice"]``)."""
    value = t.raw(key, [])
    if not isinstance(value, list):
        raise ConfigError(t.key(key), f'expected a list of certificate common names like ["alice"], got {_type_name(value)}')
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{t.key(key)}[{i}]", "expected a certificate common name (a non-empty string)")
    return frozenset(value)


def _parse_cluster(t: Table | None) -> ClusterSettings | None:
    if t is None:
        return None
    endpoints = t.raw("etcd")
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(t.key("etcd"), 'expected a list of endpoints like ["http://127.0.0.1:2379"]')
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, str) or not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+:\d{1,5}/?", ep):
            raise ConfigError(f"{t.key('etcd')}[{i}]", f'{ep!r} is not an endpoint like "http://127.0.0.1:2379"')
    prefix = t.str("prefix", "/fulcrum/v1")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(t.key("prefix"), f'"{prefix}" must start with "/" and not end with "/"')
    cluster = ClusterSettings(
        etcd=tuple(endpoints),
        lease_ttl=t.duration("lease_ttl", 5.0),
        health_checkers=t.int("health_checkers", 2, lo=1, hi=100),
        prefix=prefix,
        vips=parse_vips(t),
        heartbeat=_parse_heartbeat(t),
        etcd_ca=t.str("etcd_ca", None),
        etcd_cert=t.str("etcd_cert", None),
        etcd_key=t.str("etcd_key", None),
    )
    _check_etcd_tls(t, cluster)
    if cluster.lease_ttl < 1:
        raise ConfigError(t.key("lease_ttl"), f"must be at least 1s (etcd leases count whole seconds), got {cluster.lease_ttl:g}s")
    t.done()
    return cluster


def _parse_heartbeat(t: Table) -> Address | None:
    """``[cluster] heartbeat``: the IP:port this node's VIP claimer binds and publishes to its peers."""
    raw = t.raw("heartbeat", None)
    if raw is None:
        return None
    address = parse_address(raw, t.key("heartbeat"))
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise ConfigError(t.key("heartbeat"), f'"{raw}": use an IP address of this host (the other nodes send to it), '
                          "not a name") from None
    if ip.is_unspecified:
        raise ConfigError(t.key("heartbeat"), f'"{raw}": the other nodes send to this address: use this host\'s '
                          'own IP address on the LAN, like "192.0.2.11:7946", not a wildcard')
    return address


def _unique(items: list[T], section: str, name_of: Callable[[T], str]) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        n = name_of(item)
        if n in seen:
            raise ConfigError(f"{section}[{i}].name", f'"{n}" is already used by {section}[{seen[n]}]')
        seen[n] = i


# --------------------------------------------------------------------------- serialisation


def pool_to_dict(pool: Pool) -> dict[str, Any]:
    """A ``Pool`` as the table ``parse_pool`` reads (defaults left out): for stores and the API."""
    defaults = Pool(name=pool.name)
    out: dict[str, Any] = {"name": pool.name}
    for key in ("algorithm", "hash_key", "maglev_table_size", "latency_decay", "max_idle_per_backend",
                "slow_start", "retries", "retry_budget_percent", "retry_buffer_bytes", "queue_timeout",
                "max_queue", "connect_ejection", "send_proxy", "protocol"):
        value = getattr(pool, key)
        if value != getattr(defaults, key):
            out[key] = value
    if pool.retry_on:
        out["retry_on"] = list(pool.retry_on)
    if pool.timeouts != defaults.timeouts:
        out["timeouts"] = _changed(pool.timeouts, PoolTimeouts())
    if pool.affinity is not None:
        aff = _changed(pool.affinity, Affinity(mode=pool.affinity.mode))
        aff["mode"] = pool.affinity.mode
        if pool.affinity.key is not None:
            aff["key"] = pool.affinity.key.hex()
        out["affinity"] = aff
    if pool.health is not None:
        health = _changed(pool.health, HealthCheck())
        if "expect_status" in health:
            health["expect_status"] = ",".join(
                str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in pool.health.expect_status
            )
        out["health"] = health
    if pool.outlier is not None:
        out["outlier"] = _changed(pool.outlier, Outlier())
    if pool.tls is not None:
        out["tls"] = {"enabled": True} | _changed(pool.tls, PoolTls())
    backends = []
    for b in pool.backends:
        entry: dict[str, Any] = {"address": str(b.address)}
        if b.weight != 1:
            entry["weight"] = b.weight
        if b.name:
            entry["name"] = b.name
        for key in ("max_inflight", "max_connections"):
            if getattr(b, key) is not None:
                entry[key] = getattr(b, key)
        if b.admin != "enabled":
            entry["admin"] = b.admin
        backends.append(entry)
    out["backends"] = backends
    return out


def pool_from_dict(data: object, path: str = "pool") -> Pool:
    """The inverse of ``pool_to_dict``, with the same validation as the config file."""
    return parse_pool(Table(data, path))


def _changed(value: Any, default: Any) -> dict[str, Any]:
    out = {}
    for f in value.__dataclass_fields__:
        v = getattr(value, f)
        if v != getattr(default, f) and v is not None:
            out[f] = v
    return out


# ---------------------------------------------------------------------- [[cluster.vips]]


@dataclass(frozen=True, slots=True)
class VipSpec:
    """One configured VIP: ``address/prefixlen`` added on ``interface`` by whichever node holds it."""

    address: str  # "203.0.113.100" or "2001:db8::100" (compressed form): also the name of its etcd key
    prefixlen: int
    interface: str

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @property
    def arg(self) -> str:
        """``address/prefixlen@interface``, as ``from_arg`` reads it (the VIP guard's command line)."""
        return f"{self}@{self.interface}"

    @classmethod
    def from_arg(cls, arg: str) -> VipSpec:
        cidr, sep, interface = arg.partition("@")
        address, slash, prefixlen = cidr.partition("/")
        if not (sep and slash and interface and prefixlen.isdigit()):
            raise ValueError(f'"{arg}" is not like "192.0.2.100/24@eth0" or "2001:db8::100/64@eth0"')
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        return cls(address, int(prefixlen), interface)


def parse_vips(t: Table) -> tuple[VipSpec, ...]:
    """``[cluster] vip_interface`` and ``[[cluster.vips]]`` (``address``, optional ``interface``)."""
    default_interface = _interface(t, "vip_interface", "eth0")
    vips: list[VipSpec] = []
    seen: dict[str, int] = {}
    for i, vt in enumerate(t.tables("vips")):
        raw = vt.str("address")
        try:
            iface = ipaddress.ip_interface(raw)
        except ValueError:
            raise ConfigError(
                vt.key("address"), f'"{raw}" is not an address like "192.0.2.100/24" or "2001:db8::100/64"'
            ) from None
        if "/" not in raw:
            example = f"{raw}/64" if iface.version == 6 else f"{raw}/24"
            raise ConfigError(vt.key("address"), f'"{raw}" needs its prefix length, like "{example}"')
        ip = iface.ip
        kind = _not_a_vip(iface)
        if kind:
            raise ConfigError(vt.key("address"), f'"{raw}" cannot be a VIP ({kind}): use a unicast address of the LAN')
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            raise ConfigError(vt.key("address"), f'"{raw}" is an IPv4-mapped address: write "{ip.ipv4_mapped}/24"')
        address = str(iface.ip)
        if address in seen:
            raise ConfigError(vt.key("address"), f"{address} is already used by {t.key('vips')}[{seen[address]}]")
        seen[address] = i
        vips.append(VipSpec(address, iface.network.prefixlen, _interface(vt, "interface", default_interface)))
        vt.done()
    return tuple(vips)


def _not_a_vip(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    """Why ``iface`` cannot be claimed on a LAN and answered for (ARP/NA), or "" when it can.

    Loopback and link-local addresses never leave the host or the link (an IPv6 link-local one
    would need its interface as part of it); multicast and unspecified ones are not a host's; an
    IPv4 network or broadcast address of its own prefix (shorter than /31) is every host's.
    """
    ip = iface.ip
    for kind, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified)):
        if flag:
            return kind
    if ip.version == 4 and iface.network.prefixlen < 31:
        if ip == iface.network.broadcast_address:
            return f"the broadcast address of {iface.network}"
        if ip == iface.network.network_address:
            return f"the network address of {iface.network}"
    if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    return ""


def _interface(t: Table, name: str, default: str) -> str:
    value: str = t.str(name, default)
    if not value or len(value) > 15 or "/" in value or any(c.isspace() for c in value):
        raise ConfigError(t.key(name), f'"{value}" is not a network interface name (at most 15 characters)')
    return value
