"""L7 routes: the conditions a request must meet to go to a pool, the table that finds the
first matching route without trying every route, and the weighted split between pools.

Pure: no I/O, no clock; randomness only from an injected ``random.Random``. Validation of
node.toml lives in lbnode.model, which builds these objects; the regex safety check is here
so that every producer of a Route refuses the same patterns.
"""

from __future__ import annotations

import heapq
import importlib
import ipaddress
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

# re's own parser (re._parser since 3.11; sre_parse before, now deprecated): the parsed tree
# is what the safety check walks. No stubs exist for it, hence Any.
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

# A pattern longer than this is refused: routes are written by people, and a longer one is
# more likely generated from data (a list of names belongs in several routes, or a map).
MAX_PATTERN_LENGTH = 1000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_regex(pattern: str) -> re.Pattern[str]:
    """The compiled pattern, or ValueError saying why it is refused.

    Python's ``re`` backtracks: a pattern such as ``(a+)+$`` takes exponential time on a
    non-matching input, and request paths, headers and cookies come from anyone. The check is
    conservative (it refuses some harmless patterns too) and static, on re's parsed pattern:
    no backreferences or conditionals, no lookarounds, no repetition inside a repetition, and
    inside a repetition an alternation only if every alternative starts with its own literal
    character (``(a|a)*``, ``(a|ab)*`` are refused; ``(get|post)*`` is not)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = re.compile(pattern)
        tree = _parser.parse(pattern)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    _check_items(list(tree), repeated=False)
    return compiled


def _check_items(items: list[Any], repeated: bool) -> None:
    for op, arg in items:
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise ValueError("uses a backreference, which can take exponential time")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise ValueError("uses a lookahead or lookbehind, which can take exponential time")
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            lo, hi, body = arg
            if repeated:
                raise ValueError("repeats a repetition (like (a+)+), which can take exponential time")
            _check_items(list(body), repeated=hi > 1)
        elif op == _c.SUBPATTERN:
            _check_items(list(arg[-1]), repeated)
        elif op == _c.ATOMIC_GROUP:
            _check_items(list(arg), repeated)
        elif op == _c.BRANCH:
            alternatives = arg[1]
            if repeated:
                firsts = [alt[0] if len(alt) else None for alt in alternatives]
                literals = [f[1] for f in firsts if f is not None and f[0] == _c.LITERAL]
                if len(literals) != len(alternatives) or len(set(literals)) != len(literals):
                    raise ValueError(
                        "repeats an alternation whose alternatives may match the same text "
                        "(like (a|ab)*), which can take exponential time"
                    )
            for alt in alternatives:
                _check_items(list(alt), repeated)


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """One condition on a header, cookie or query parameter: ``present`` (True: there,
    False: absent), else ``exact`` or ``regex`` (a full match) on its value."""

    name: str  # headers: lower-case; cookies and query parameters: as written (case matters)
    exact: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool = True

    def holds(self, values: Sequence[str]) -> bool:
        """``values``: every value the request has under this name (none when absent)."""
        if not self.present:
            return not values
        if self.exact is not None:
            return self.exact in values
        if self.regex is not None:
            return any(self.regex.fullmatch(v) is not None for v in values)
        return bool(values)


@dataclass(frozen=True, slots=True)
class SplitSide:
    pool: str
    weight: int  # > 0


@dataclass(frozen=True, slots=True)
class Split:
    """``split``: requests go to one of several pools in proportion to their weights. With
    ``cookie`` (``sticky = true``) a client keeps the side it was first given."""

    sides: tuple[SplitSide, ...]
    cookie: str | None = None

    def draw(self, rng: random.Random) -> str:
        total = sum(s.weight for s in self.sides)
        n = rng.randrange(total)
        for side in self.sides:
            n -= side.weight
            if n < 0:
                return side.pool
        return self.sides[-1].pool  # not reached: n < total

    def has(self, pool: str) -> bool:
        return any(s.pool == pool for s in self.sides)


@dataclass(frozen=True, slots=True)
class Redirect:
    """``redirect``: the node answers with ``status`` and a Location made of the request's
    URL with the parts given here replaced. ``port`` None: the request's port, unless the
    scheme or host changes (then the new scheme's default port)."""

    status: int = 302
    scheme: str | None = None  # "http" | "https"
    host: str | None = None  # lower-case, without a port
    port: int | None = None
    path: str | None = None
    keep_query: bool = True


@dataclass(frozen=True, slots=True)
class FixedResponse:
    """``fixed_response``: the node answers with this status and body itself."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """``request_headers`` / ``response_headers``: fields removed (every field of each name),
    set (any field of that name replaced by this one) and added (kept beside any others)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()  # lower-case names

    @property
    def dropped(self) -> frozenset[str]:
        """Lower-case names whose fields the client or backend sent are not passed on."""
        return self.remove | frozenset(n.lower() for n, _ in self.set)


@dataclass(frozen=True, slots=True)
class Mirror:
    """``mirror``: a sampled share of the requests is copied to ``pool``, the answer dropped."""

    pool: str
    percent: float = 100.0  # of the route's requests, 0 < percent <= 100
    max_inflight: int = 16  # copies under way at once for this route; more are dropped (counted)
    max_body_bytes: int = 64 * 1024  # a request with a larger (or streamed) body is not copied


# The actions that decide what answers a request: exactly one per route.
TERMINAL_ACTIONS = ("pool", "split", "redirect", "fixed_response")


@dataclass(frozen=True, slots=True)
class Route:
    """``[[listeners.routes]]``: every condition given must hold; ``pool`` or ``split`` says
    where the request goes, or ``redirect`` / ``fixed_response`` has the node answer itself.
    Among matching routes the highest ``priority`` wins, then the route whose ``name`` comes
    first in natural order (``route_order``). ``allow_cidrs`` / ``deny_cidrs`` then refuse
    (403) the clients this route does not serve; the other actions change the request sent
    and the response relayed.

    ``spec`` is the table the route was parsed from, with its name filled in: what a store
    keeps and the control API shows, so a key the parser accepts travels without code of its
    own. Left out of comparisons: the parsed fields say what the route does."""

    name: str = ""  # unique in its listener; node.toml routes without one: their place, "0", "1"...
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    pool: str | None = None  # None when ``split`` is given
    host: str | None = None  # exact, or "*.example.com" (any sub-domain); lower-case
    path: str | None = None
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None  # a full match on the path, query excluded
    methods: frozenset[str] = frozenset()  # empty: any
    headers: tuple[ValueMatch, ...] = ()
    cookies: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    client_cidrs: tuple[Network, ...] = ()
    priority: int = 0
    split: Split | None = None
    redirect: Redirect | None = None
    fixed_response: FixedResponse | None = None
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    rewrite_path_prefix: str | None = None  # replaces ``path_prefix`` in the path sent
    rewrite_host: str | None = None  # the Host sent to the backend (X-Forwarded-Host keeps the client's)
    mirror: Mirror | None = None
    allow_cidrs: tuple[Network, ...] = ()  # given: clients outside them get 403
    deny_cidrs: tuple[Network, ...] = ()  # clients inside them get 403 (before allow_cidrs)

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(pool for _, pool in self.pool_refs())

    def pool_refs(self) -> list[tuple[str, str]]:
        """(key under the route, pool name) of every pool the route names: ``pool``,
        ``split[k].pool``, ``mirror.pool``; what a missing pool's error and ``lbctl routes
        list`` point at."""
        refs: list[tuple[str, str]] = []
        if self.pool is not None:
            refs.append(("pool", self.pool))
        if self.split is not None:
            refs += [(f"split[{k}].pool", side.pool) for k, side in enumerate(self.split.sides)]
        if self.mirror is not None:
            refs.append(("mirror.pool", self.mirror.pool))
        return refs

    @property
    def acts(self) -> bool:
        """Anything for the proxy to do besides sending the request to the route's pool."""
        return (self.redirect is not None or self.fixed_response is not None or self.request_headers is not None
                or self.response_headers is not None or self.rewrite_path_prefix is not None
                or self.rewrite_host is not None or self.mirror is not None or bool(self.allow_cidrs)
                or bool(self.deny_cidrs))

    @property
    def answers_itself(self) -> bool:
        """The node answers (redirect, fixed_response): nothing goes to a backend."""
        return self.redirect is not None or self.fixed_response is not None


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """``name`` split into text and numbers, so that "route-2" sorts before "route-10"."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def route_order(routes: Iterable[Route]) -> list[Route]:
    """The order routes of one listener are tried in: highest ``priority`` first, then by name
    in natural order (digits compared as numbers). Routes without a name keep the order given."""
    return sorted(routes, key=lambda r: (-r.priority, natural_key(r.name)))


class RequestFacts:
    """What routes look at in one request. Header names are lower-cased, and the cookies and
    query parsed, only when a route asks, and then once."""

    __slots__ = ("method", "host", "path", "query", "client_ip", "_raw_headers", "_headers", "_cookies",
                 "_params", "_address")

    def __init__(
        self, method: bytes, host: str | None, path: str, query: str,
        headers: Sequence[tuple[bytes, bytes]], client_ip: str,
    ) -> None:
        self.method = method.decode("latin-1")
        self.host = host  # lower-case, without the port
        self.path = path
        self.query = query
        self.client_ip = client_ip
        self._raw_headers = headers
        self._headers: dict[str, list[str]] | None = None
        self._cookies: dict[str, list[str]] | None = None
        self._params: dict[str, list[str]] | None = None
        self._address: ipaddress.IPv4Address | ipaddress.IPv6Address | None | bool = False

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._raw_headers

    def header(self, lname: str) -> list[str]:
        if self._headers is None:
            self._headers = {}
            for n, v in self._raw_headers:
                self._headers.setdefault(n.decode("latin-1").lower(), []).append(v.decode("latin-1").strip())
        return self._headers.get(lname, [])

    def cookie(self, name: str) -> list[str]:
        if self._cookies is None:
            self._cookies = parse_cookies(self.header("cookie"))
        return self._cookies.get(name, [])

    def param(self, name: str) -> list[str]:
        if self._params is None:
            self._params = {}
            for k, v in parse_qsl(self.query, keep_blank_values=True):
                self._params.setdefault(k, []).append(v)
        return self._params.get(name, [])

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if self._address is False:
            try:
                address = ipaddress.ip_address(self.client_ip.split("%", 1)[0])
            except ValueError:
                address = None
            # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: IPv4 CIDRs still apply.
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            self._address = address
        assert not isinstance(self._address, bool)
        return self._address


def parse_cookies(fields: Iterable[str]) -> dict[str, list[str]]:
    """Cookie header fields into name -> values, in the order sent (RFC 6265 5.4)."""
    out: dict[str, list[str]] = {}
    for line in fields:
        for pair in line.split(";"):
            name, eq, value = pair.strip().partition("=")
            if eq and name:
                out.setdefault(name, []).append(value.strip().strip('"'))
    return out


def route_matches(route: Route, req: RequestFacts) -> bool:
    """Every condition of ``route`` but its host (the table chose the route by host)."""
    if route.methods and req.method not in route.methods:
        return False
    if route.path is not None and req.path != route.path:
        return False
    if route.path_prefix is not None and not req.path.startswith(route.path_prefix):
        return False
    if route.client_cidrs:
        address = req.address()
        if address is None or not any(address in net for net in route.client_cidrs):
            return False
    if route.path_regex is not None and route.path_regex.fullmatch(req.path) is None:
        return False
    for cond in route.headers:
        if not cond.holds(req.header(cond.name)):
            return False
    for cond in route.cookies:
        if not cond.holds(req.cookie(cond.name)):
            return False
    for cond in route.query:
        if not cond.holds(req.param(cond.name)):
            return False
    return True


# (-priority, position in route_order, route): sorts in the order routes are tried.
_Entry = tuple[int, int, Route]


def host_matches(route: Route, host: str | None) -> bool:
    """The route's host condition alone (the table applies it by lookup; tests compare)."""
    if route.host is None:
        return True
    if host is None:
        return False
    if route.host.startswith("*."):
        return host.endswith(route.host[1:])
    return host == route.host


def literal_prefix(pattern: re.Pattern[str]) -> str:
    """The literal text every full match of ``pattern`` starts with ("" if none is known):
    the pattern's leading literal characters, without IGNORECASE."""
    if pattern.flags & re.IGNORECASE:
        return ""
    out = []
    for op, arg in _parser.parse(pattern.pattern):
        if op != _c.LITERAL:
            break
        out.append(chr(arg))
    return "".join(out)


class _Group:
    """The routes of one host key (an exact host, a wildcard's domain, or none), indexed by
    what else selects them: an exact ``path``; else a path prefix (``path_prefix``, or the
    literal start of ``path_regex``, the longer); else the first ``exact`` header
    condition; else nothing (tried for every request of this host key)."""

    __slots__ = ("all", "exact_path", "prefixes", "lengths", "by_header", "others")

    def __init__(self) -> None:
        self.all: list[_Entry] = []
        self.exact_path: dict[str, list[_Entry]] = {}
        self.prefixes: dict[str, list[_Entry]] = {}
        self.lengths: tuple[int, ...] = ()
        self.by_header: dict[bytes, dict[str, list[_Entry]]] = {}  # lower-case name -> value -> routes
        self.others: list[_Entry] = []

    def add(self, entry: _Entry) -> None:
        route = entry[2]
        self.all.append(entry)
        if route.path is not None:
            self.exact_path.setdefault(route.path, []).append(entry)
            return
        prefix = route.path_prefix or ""
        if route.path_regex is not None:
            start = literal_prefix(route.path_regex)
            if len(start) > len(prefix):
                prefix = start
        if prefix:
            self.prefixes.setdefault(prefix, []).append(entry)
            return
        for cond in route.headers:
            if cond.exact is not None and cond.present:
                self.by_header.setdefault(cond.name.encode("latin-1"), {}).setdefault(cond.exact, []).append(entry)
                return
        self.others.append(entry)

    def seal(self) -> None:
        lists = [self.all, self.others, *self.exact_path.values(), *self.prefixes.values()]
        lists += [lst for values in self.by_header.values() for lst in values.values()]
        for lst in lists:
            lst.sort(key=_order)
        self.lengths = tuple(sorted({len(p) for p in self.prefixes}))

    def collect(self, req: RequestFacts, into: list[list[_Entry]]) -> None:
        """Append the lists of routes whose indexed condition holds for ``req``."""
        path = req.path
        if self.exact_path:
            found = self.exact_path.get(path)
            if found:
                into.append(found)
        if self.lengths:
            prefixes = self.prefixes
            n = len(path)
            for length in self.lengths:
                if length > n:
                    break
                found = prefixes.get(path[:length])
                if found:
                    into.append(found)
        if self.by_header:
            # The raw fields, not req.header(): that lower-cases and decodes every field,
            # which a request that meets no header route would pay for nothing.
            by_header = self.by_header
            for name, value in req.raw_headers:
                values = by_header.get(name.lower())
                if values is not None:
                    found = values.get(value.decode("latin-1").strip())
                    if found:
                        # (The same field twice adds its list twice: its routes are then
                        # merged in twice, and a route tried twice gives the same answer.)
                        into.append(found)
        if self.others:
            into.append(self.others)


def _order(e: _Entry) -> tuple[int, int]:
    return e[0], e[1]


class RouteTable:
    """A listener's routes, compiled: routes naming an exact host are found by a dict lookup,
    wildcards by the request host's parent domains, host-less routes under any host; within
    each, by exact path (a dict), path prefix (a dict per distinct prefix length, so a lookup
    per length, not per route; ``path_regex`` counts by its literal start) or an exact header
    value. Only those candidates are tried, in ``route_order``: the answer is the one a
    linear scan of every route would give (tests/unit/test_routes.py checks it). Immutable once
    built: a change of routes builds a new table (the snapshot swaps it whole)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(route_order(routes))
        self._positions = {id(r): i for i, r in enumerate(self.routes)}
        self._exact: dict[str, _Group] = {}
        self._wildcard: dict[str, _Group] = {}  # "example.com" for "*.example.com"
        self._any: _Group | None = None
        for i, route in enumerate(self.routes):
            entry = (-route.priority, i, route)
            if route.host is None:
                if self._any is None:
                    self._any = _Group()
                group = self._any
            elif route.host.startswith("*."):
                group = self._wildcard.setdefault(route.host[2:], _Group())
            else:
                group = self._exact.setdefault(route.host, _Group())
            group.add(entry)
        for g in [*self._exact.values(), *self._wildcard.values(), *([self._any] if self._any else [])]:
            g.seal()

    def __bool__(self) -> bool:
        return bool(self.routes)

    def position(self, route: Route) -> int:
        """The route's place in the listener (``routes[n]`` in errors, logs and metrics)."""
        return self._positions[id(route)]

    def same(self, routes: Sequence[Route]) -> bool:
        """Would ``RouteTable(routes)`` be this table? (A snapshot keeps a table that is.)"""
        return len(routes) == len(self.routes) and route_order(routes) == list(self.routes)

    def _groups(self, host: str | None) -> list[_Group]:
        groups: list[_Group] = []
        if host is not None:
            exact = self._exact.get(host)
            if exact is not None:
                groups.append(exact)
            if self._wildcard:
                dot = host.find(".")
                while dot >= 0:
                    wild = self._wildcard.get(host[dot + 1:])
                    if wild is not None:
                        groups.append(wild)
                    dot = host.find(".", dot + 1)
        if self._any is not None:
            groups.append(self._any)
        return groups

    def candidates(self, host: str | None) -> Iterator[Route]:
        """Routes whose host condition holds for ``host``, in the order they are tried."""
        lists = [g.all for g in self._groups(host)]
        return (e[2] for e in heapq.merge(*lists, key=_order))

    def match(self, req: RequestFacts) -> Route | None:
        """The route that takes this request, or None (the listener's own pool)."""
        lists: list[list[_Entry]] = []
        for group in self._groups(req.host):
            group.collect(req, lists)
        if not lists:
            return None
        if len(lists) == 1:
            for _, _, route in lists[0]:
                if route_matches(route, req):
                    return route
            return None
        for _, _, route in heapq.merge(*lists, key=_order):
            if route_matches(route, req):
                return route
        return None


def client_allowed(route: Route, req: RequestFacts) -> bool:
    """``deny_cidrs`` and ``allow_cidrs`` of the route that took the request: False means 403.
    A client in ``deny_cidrs`` is refused even if ``allow_cidrs`` holds it too; an address
    that cannot be parsed is in no network."""
    if not route.deny_cidrs and not route.allow_cidrs:
        return True
    address = req.address()
    if route.deny_cidrs and address is not None and any(address in net for net in route.deny_cidrs):
        return False
    if route.allow_cidrs:
        return address is not None and any(address in net for net in route.allow_cidrs)
    return True


def choose_pool(route: Route, req: RequestFacts, rng: random.Random) -> tuple[str, str | None]:
    """The pool for a request the route took, and the split cookie value to set (or None).

    A sticky split keeps the side named by the client's cookie if it is still one of the
    split's pools; otherwise (and without sticky) the side is drawn by weight."""
    split = route.split
    if split is None:
        assert route.pool is not None
        return route.pool, None
    if split.cookie is None:
        return split.draw(rng), None
    for value in req.cookie(split.cookie):
        if split.has(value):
            return value, None
    pool = split.draw(rng)
    return pool, pool
