"""``[[listeners.routes]]`` matching (issue 15): validation that names the key, the regex
safety check, the compiled table's order (priority, then file order), each condition, and the
weighted split."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnode.model import ConfigError, Route, parse_config
from lbnode.routing import (
    MAX_PATTERN_LENGTH,
    RequestFacts,
    RouteTable,
    check_regex,
    choose_pool,
    host_matches,
    literal_prefix,
    route_matches,
)

POOLS = ("dflt", "a", "b", "c", "v1", "v2")


def routes(*tables: dict[str, Any]) -> tuple[Route, ...]:
    return parse_config({
        "node": {"id": "n1"},
        "pools": [{"name": n, "backends": [{"address": "127.0.0.1:9000"}]} for n in POOLS],
        "listeners": [{"name": "web", "protocol": "http", "bind": "127.0.0.1:8080", "pool": "dflt",
                       "routes": list(tables)}],
    }).listeners[0].routes


def refused(table: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        routes(table)
    return err.value


def req(path: str = "/", host: str | None = "h.example", method: bytes = b"GET", query: str = "",
        headers: list[tuple[bytes, bytes]] | None = None, ip: str = "192.0.2.7") -> RequestFacts:
    return RequestFacts(method, host, path, query, headers or [], ip)


def pool_of(table: RouteTable, facts: RequestFacts) -> str:
    route = table.match(facts)
    return "dflt" if route is None else choose_pool(route, facts, random.Random(1))[0]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(("table", "key", "reason"), [
    ({"path": "x", "pool": "a"}, "routes[0].path", 'must start with "/"'),
    ({"path_regex": "/(a+)+", "pool": "a"}, "routes[0].path_regex", "repeats a repetition"),
    ({"path_regex": "/(", "pool": "a"}, "routes[0].path_regex", "is not a valid regular expression"),
    ({"methods": [], "pool": "a"}, "routes[0].methods", "expected a non-empty list"),
    ({"methods": ["GET", "G T"], "pool": "a"}, "routes[0].methods[1]", "is not an HTTP method"),
    ({"headers": [{"name": "X-Env"}], "pool": "a"}, "routes[0].headers[0]", "give exactly one of exact, regex or present"),
    ({"headers": [{"name": "X-Env", "exact": "1", "present": True}], "pool": "a"}, "routes[0].headers[0]",
     "give exactly one of exact, regex or present (got exact, present)"),
    ({"headers": [{"name": "X Env", "exact": "1"}], "pool": "a"}, "routes[0].headers[0].name", "is not a valid header name"),
    ({"headers": [{"name": "X-Env", "exat": "1"}], "pool": "a"}, "routes[0].headers[0]", "give exactly one"),
    ({"headers": [{"name": "ua", "regex": "(x|xy)*"}], "pool": "a"}, "routes[0].headers[0].regex", "repeats an alternation"),
    ({"cookies": [{"name": "beta", "present": "yes"}], "pool": "a"}, "routes[0].cookies[0].present", "expected true or false"),
    ({"query": [{"name": "v", "regex": "(?=a)a"}], "pool": "a"}, "routes[0].query[0].regex", "lookahead"),
    ({"client_cidrs": ["192.0.2.0/33"], "pool": "a"}, "routes[0].client_cidrs[0]", "is not a CIDR"),
    ({"client_cidrs": "192.0.2.0/24", "pool": "a"}, "routes[0].client_cidrs", "expected a non-empty list"),
    ({"priority": "high", "pool": "a"}, "routes[0].priority", "expected an integer"),
    ({"path": "/"}, "routes[0].pool", "is required (or split"),
    ({"pool": "a", "split": [{"pool": "b", "weight": 1}]}, "routes[0].split", "conflicts with pool"),
    ({"split": []}, "routes[0].split", "expected at least one"),
    ({"split": [{"pool": "v1", "weight": 0}]}, "routes[0].split[0].weight", "must be >= 1"),
    ({"split": [{"pool": "v1", "weight": 1.5}]}, "routes[0].split[0].weight", "expected an integer"),
    ({"split": [{"pool": "v1", "weight": 1}, {"pool": "v1", "weight": 2}]}, "routes[0].split[1].pool", "already in this split"),
    ({"split": [{"pool": "v1", "weight": 1}, {"pool": "v9", "weight": 2}]}, "routes[0].split[1].pool",
     'pool "v9" is not defined'),
    ({"pool": "a", "sticky": True}, "routes[0].sticky", "needs split"),
    ({"pool": "nope"}, "routes[0].pool", 'pool "nope" is not defined'),
    ({"pool": "a", "paths": "/x"}, "routes[0].paths", "unknown key"),
    # actions
    ({"pool": "a", "redirect": {"scheme": "https"}}, "routes[0].redirect", "conflicts with pool"),
    ({"split": [{"pool": "a", "weight": 1}], "fixed_response": {"status": 200}}, "routes[0].fixed_response",
     "conflicts with split"),
    ({"redirect": {"scheme": "https"}, "fixed_response": {"status": 200}}, "routes[0].fixed_response",
     "conflicts with redirect"),
    ({"redirect": {}}, "routes[0].redirect", "give at least one of scheme, host, port or path"),
    ({"redirect": {"status": 200, "scheme": "https"}}, "routes[0].redirect.status", "is not a redirect status"),
    ({"redirect": {"scheme": "ftp"}}, "routes[0].redirect.scheme", "is not one of: http, https"),
    ({"redirect": {"host": "a b"}}, "routes[0].redirect.host", "is not a host name"),
    ({"redirect": {"port": 0}}, "routes[0].redirect.port", "must be >= 1"),
    ({"redirect": {"path": "/a?b"}}, "routes[0].redirect.path", "is not a path"),
    ({"redirect": {"path": "/x"}, "mirror": {"pool": "a"}}, "routes[0].mirror", "conflicts with redirect"),
    ({"fixed_response": {"status": 200}, "request_headers": {"set": {"X": "1"}}}, "routes[0].request_headers",
     "conflicts with fixed_response"),
    ({"fixed_response": {"body": "x"}}, "routes[0].fixed_response.status", "is required"),
    ({"fixed_response": {"status": 101}}, "routes[0].fixed_response.status", "must be >= 200"),
    ({"fixed_response": {"status": 204, "body": "x"}}, "routes[0].fixed_response.body", "must be empty"),
    ({"fixed_response": {"status": 200, "body": "x" * 70000}}, "routes[0].fixed_response.body", "at most 65536"),
    ({"fixed_response": {"status": 200, "content_type": "text"}}, "routes[0].fixed_response.content_type",
     "is not a media type"),
    ({"pool": "a", "request_headers": {"set": {"Host": "x"}}}, "routes[0].request_headers.set.Host",
     "use rewrite.host"),
    ({"pool": "a", "request_headers": {"remove": ["X-Forwarded-For"]}}, "routes[0].request_headers.remove[0]",
     "cannot be changed here"),
    ({"pool": "a", "request_headers": {"set": {"X-A": "1"}, "remove": ["x-a"]}},
     "routes[0].request_headers.remove[0]", "is already in set"),
    ({"pool": "a", "request_headers": {"set": {"X-A": "1\r\nX-B: 2"}}}, "routes[0].request_headers.set.X-A",
     "is not a header value"),
    ({"pool": "a", "request_headers": {"add": {"X A": "1"}}}, "routes[0].request_headers.add.X A",
     "is not a header name"),
    ({"pool": "a", "request_headers": {}}, "routes[0].request_headers", "give set, add or remove"),
    ({"pool": "a", "response_headers": {"set": {"Content-Length": "1"}}},
     "routes[0].response_headers.set.Content-Length", "cannot be changed here"),
    ({"pool": "a", "response_headers": {"add": {"X-A": "1"}}}, "routes[0].response_headers.add", "use set or remove"),
    ({"pool": "a", "rewrite": {"path_prefix": "/v2/"}}, "routes[0].rewrite.path_prefix", "needs the route's path_prefix"),
    ({"pool": "a", "rewrite": {"host": "a b"}}, "routes[0].rewrite.host", "is not a host or host:port"),
    ({"pool": "a", "rewrite": {}}, "routes[0].rewrite", "give path_prefix, host or both"),
    ({"pool": "a", "mirror": {"pool": "nope"}}, "routes[0].mirror.pool", 'pool "nope" is not defined'),
    ({"pool": "a", "mirror": {}}, "routes[0].mirror.pool", "is required"),
    ({"pool": "a", "mirror": {"pool": "b", "percent": 0}}, "routes[0].mirror.percent", "must be greater than 0"),
    ({"pool": "a", "mirror": {"pool": "b", "percent": 101}}, "routes[0].mirror.percent", "must be <= 100"),
    ({"pool": "a", "mirror": {"pool": "b", "max_inflight": 0}}, "routes[0].mirror.max_inflight", "must be >= 1"),
    ({"pool": "a", "allow_cidrs": ["198.51.100.0/33"]}, "routes[0].allow_cidrs[0]", "is not a CIDR"),
    ({"pool": "a", "deny_cidrs": []}, "routes[0].deny_cidrs", "expected a non-empty list"),
])
def test_bad_route_names_the_key_and_the_reason(table: dict[str, Any], key: str, reason: str) -> None:
    err = refused(table)
    assert err.key == f"listeners[0].{key}"
    assert reason in err.reason


@pytest.mark.parametrize("pattern", [
    "(a+)+", "(a*)*b", "(?:a|a)*", "(a|ab)*c", "(\\w+\\s?)*$", "(a?){20}a{20}", "(.*a){12}", r"(a)\1",
    "(?P<x>a)(?(x)b|c)", "(?<=/)a", "(?!x)y", "(a{1,5}){2}",
])
def test_patterns_that_can_backtrack_without_bound_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_regex(pattern)


@pytest.mark.parametrize("pattern", [
    "/api/v[0-9]+/.*", "/users/[^/]+/orders/[0-9]{1,12}", "(get|post)+", "Mozilla/.*(Firefox|Chrome)/[0-9.]+",
    "/(?:static|assets)/.*\\.(css|js)", "[a-z]+(-[a-z]+)?",
])
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    check_regex(pattern)


def test_pattern_length_is_bounded() -> None:
    check_regex("a" * MAX_PATTERN_LENGTH)
    with pytest.raises(ValueError, match="longer than 1000"):
        check_regex("a" * (MAX_PATTERN_LENGTH + 1))


def test_an_accepted_pattern_stays_fast_on_a_hostile_input() -> None:
    compiled = check_regex("/api/v[0-9]+/.*x")
    started = time.perf_counter()
    assert compiled.fullmatch("/api/v1/" + "a" * 60_000) is None
    assert time.perf_counter() - started < 0.5


# ------------------------------------------------------------------ matching


def test_priority_then_file_order() -> None:
    table = RouteTable(routes(
        {"path_prefix": "/", "pool": "a"},
        {"path_prefix": "/", "pool": "b", "priority": 5},
        {"path_prefix": "/", "pool": "c", "priority": 5},
        {"host": "h.example", "path_prefix": "/", "pool": "v1", "priority": 1},
    ))
    assert pool_of(table, req()) == "b"  # the higher priority, the first of the two
    assert pool_of(table, req(host="other.example")) == "b"
    table = RouteTable(routes(
        {"path_prefix": "/", "pool": "a"},
        {"host": "h.example", "path_prefix": "/", "pool": "b"},
    ))
    assert pool_of(table, req()) == "a"  # same priority: the file's order, host or not


def test_host_grouping_keeps_the_order_of_a_linear_scan() -> None:
    rng = random.Random(7)
    hosts = ["a.example", "b.example", "x.a.example", None]
    specs = []
    for _ in range(300):
        host = rng.choice(["a.example", "b.example", "*.example", "*.a.example", None])
        spec: dict[str, Any] = {"pool": rng.choice(["a", "b", "c"]), "priority": rng.randint(-2, 2),
                                "path_prefix": rng.choice(["/", "/x", "/y/z"])}
        if host is not None:
            spec["host"] = host
        specs.append(spec)
    table = RouteTable(routes(*specs))
    for host in hosts:
        for path in ["/", "/x1", "/y/z/w", "/q"]:
            facts = req(path, host=host)
            # The reference: every route tried in (priority, file order), with its host condition.
            expected = None
            for i in sorted(range(len(table.routes)), key=lambda i: (-table.routes[i].priority, i)):
                r = table.routes[i]
                host_ok = r.host is None or (host is not None and (
                    host == r.host or (r.host.startswith("*.") and host.endswith(r.host[1:]))))
                if host_ok and (r.path_prefix is None or path.startswith(r.path_prefix)):
                    expected = r
                    break
            assert table.match(facts) is expected, (host, path)


def test_wildcard_matches_sub_domains_only() -> None:
    table = RouteTable(routes({"host": "*.example.org", "pool": "a"}))
    assert pool_of(table, req(host="shop.example.org")) == "a"
    assert pool_of(table, req(host="a.b.example.org")) == "a"
    assert pool_of(table, req(host="example.org")) == "dflt"
    assert pool_of(table, req(host="badexample.org")) == "dflt"
    assert pool_of(table, req(host=None)) == "dflt"


def test_path_exact_prefix_and_regex() -> None:
    table = RouteTable(routes(
        {"path": "/login", "pool": "a"},
        {"path_regex": "/users/[0-9]+", "pool": "b"},
        {"path_prefix": "/static/", "pool": "c"},
    ))
    assert pool_of(table, req("/login")) == "a"
    assert pool_of(table, req("/login/x")) == "dflt"
    assert pool_of(table, req("/users/42", query="x=1")) == "b"
    assert pool_of(table, req("/users/42/orders")) == "dflt"  # a full match, not a search
    assert pool_of(table, req("/static/app.js")) == "c"


def test_methods() -> None:
    table = RouteTable(routes({"methods": ["GET", "HEAD"], "pool": "a"}))
    assert pool_of(table, req(method=b"HEAD")) == "a"
    assert pool_of(table, req(method=b"POST")) == "dflt"
    assert pool_of(table, req(method=b"get")) == "dflt"  # methods are case-sensitive (RFC 9110)


def test_headers_exact_present_absent_regex_case_insensitive_names() -> None:
    table = RouteTable(routes(
        {"headers": [{"name": "X-Env", "exact": "canary"}], "pool": "a"},
        {"headers": [{"name": "x-debug", "present": True}, {"name": "X-Off", "present": False}], "pool": "b"},
        {"headers": [{"name": "User-Agent", "regex": "curl/[0-9.]+"}], "pool": "c"},
    ))
    assert pool_of(table, req(headers=[(b"x-ENV", b"canary")])) == "a"
    assert pool_of(table, req(headers=[(b"X-Env", b"canary2")])) == "dflt"
    assert pool_of(table, req(headers=[(b"X-Debug", b"")])) == "b"
    assert pool_of(table, req(headers=[(b"X-Debug", b"1"), (b"x-off", b"1")])) == "dflt"
    assert pool_of(table, req(headers=[(b"User-Agent", b"curl/8.5.0")])) == "c"
    assert pool_of(table, req(headers=[(b"User-Agent", b"curl/8.5.0 extra")])) == "dflt"


def test_cookies_and_query() -> None:
    table = RouteTable(routes(
        {"cookies": [{"name": "beta", "exact": "1"}], "pool": "a"},
        {"query": [{"name": "v", "exact": "2"}], "pool": "b"},
        {"query": [{"name": "debug", "present": True}], "pool": "c"},
    ))
    assert pool_of(table, req(headers=[(b"Cookie", b"x=y; beta=1")])) == "a"
    assert pool_of(table, req(headers=[(b"Cookie", b"beta=10")])) == "dflt"
    assert pool_of(table, req(headers=[(b"Cookie", b"Beta=1")])) == "dflt"  # cookie names are case-sensitive
    assert pool_of(table, req(query="a=1&v=2")) == "b"
    assert pool_of(table, req(query="v=%32")) == "b"  # percent-decoded
    assert pool_of(table, req(query="v=3")) == "dflt"
    assert pool_of(table, req(query="debug")) == "c"


def test_cookies_and_query_are_parsed_only_when_a_candidate_needs_them() -> None:
    table = RouteTable(routes(
        {"host": "other.example", "cookies": [{"name": "beta", "exact": "1"}], "pool": "a"},
        {"path": "/x", "query": [{"name": "v", "exact": "2"}], "pool": "b"},
    ))
    facts = req("/y", headers=[(b"Cookie", b"beta=1")], query="v=2")
    assert table.match(facts) is None
    assert facts._cookies is None and facts._params is None and facts._headers is None


def test_client_cidrs() -> None:
    table = RouteTable(routes({"client_cidrs": ["198.51.100.0/24", "2001:db8::/32"], "pool": "a"}))
    assert pool_of(table, req(ip="198.51.100.9")) == "a"
    assert pool_of(table, req(ip="2001:db8::1")) == "a"
    assert pool_of(table, req(ip="::ffff:198.51.100.9")) == "a"  # an IPv4 client of a dual-stack listener
    assert pool_of(table, req(ip="203.0.113.9")) == "dflt"


def test_all_conditions_of_a_route_must_hold() -> None:
    table = RouteTable(routes({
        "host": "h.example", "path_prefix": "/api/", "methods": ["POST"],
        "headers": [{"name": "X-Env", "exact": "canary"}], "client_cidrs": ["192.0.2.0/24"], "pool": "a",
    }))
    good: dict[str, Any] = {"path": "/api/x", "method": b"POST", "headers": [(b"X-Env", b"canary")]}
    assert pool_of(table, req(**good)) == "a"
    for change in ({"path": "/x"}, {"method": b"GET"}, {"headers": []}, {"ip": "203.0.113.1"}, {"host": "g.example"}):
        assert pool_of(table, req(**(good | change))) == "dflt", change


# ------------------------------------------------------------------ split


def test_split_95_5_over_10000_draws() -> None:
    (route,) = routes({"split": [{"pool": "v1", "weight": 95}, {"pool": "v2", "weight": 5}]})
    rng = random.Random(15)
    facts = req()
    counts = {"v1": 0, "v2": 0}
    for _ in range(10_000):
        pool, cookie = choose_pool(route, facts, rng)
        assert cookie is None
        counts[pool] += 1
    assert abs(counts["v2"] / 10_000 - 0.05) <= 0.02
    assert abs(counts["v1"] / 10_000 - 0.95) <= 0.02


def test_sticky_split_keeps_a_valid_cookie_and_redraws_an_unknown_one() -> None:
    _, route = routes(
        {"path": "/x", "pool": "a"},
        {"split": [{"pool": "v1", "weight": 1}, {"pool": "v2", "weight": 1}], "sticky": True},
    )
    assert route.split is not None and route.split.cookie == "FULCRUM_SPLIT_1"
    rng = random.Random(3)
    for _ in range(20):
        assert choose_pool(route, req(headers=[(b"Cookie", b"FULCRUM_SPLIT_1=v2")]), rng) == ("v2", None)
    pool, cookie = choose_pool(route, req(headers=[(b"Cookie", b"FULCRUM_SPLIT_1=a")]), rng)
    assert pool in ("v1", "v2") and cookie == pool  # "a" is not a side of this split
    pool, cookie = choose_pool(route, req(), rng)
    assert cookie == pool


def test_a_request_tries_only_its_host_routes_and_the_host_less_ones() -> None:
    specs: list[dict[str, Any]] = [
        {"host": f"h{i}.example", "path_regex": f"/app{i}/[a-z]+", "pool": "a"} for i in range(1000)
    ]
    specs += [{"host": "*.example", "path": "/wild", "pool": "b"}, {"path": "/any", "pool": "c"}]
    table = RouteTable(routes(*specs))
    assert [r.host for r in table.candidates("h500.example")] == ["h500.example", "*.example", None]
    assert [r.host for r in table.candidates("elsewhere.test")] == [None]
    assert pool_of(table, req("/app500/x", host="h500.example")) == "a"
    assert pool_of(table, req("/app501/x", host="h500.example")) == "dflt"
    assert pool_of(table, req("/wild", host="h3.example")) == "b"


# ------------------------------------------------------------------ the compiled table = a linear scan

HOSTS = ["a.example", "b.example", "x.a.example", "*.example", "*.a.example"]
PATHS = ["/", "/a", "/ab", "/a/b", "/b", "/b/c/d", "/abc"]


def _linear(table: RouteTable, facts: RequestFacts) -> Route | None:
    """Every route, in (priority, file order), every condition checked: what the index must equal."""
    for i in sorted(range(len(table.routes)), key=lambda i: (-table.routes[i].priority, i)):
        route = table.routes[i]
        if host_matches(route, facts.host) and route_matches(route, facts):
            return route
    return None


route_specs = st.fixed_dictionaries(
    {"pool": st.sampled_from(["a", "b", "c"])},
    optional={
        "host": st.sampled_from(HOSTS),
        "path": st.sampled_from(PATHS),
        "path_prefix": st.sampled_from(PATHS),
        "path_regex": st.sampled_from(["/a.*", "/ab?", "/a/[a-z]+", "(?i)/A.*", "/(a|b)/.*", ".*c", "/b/c/d"]),
        "priority": st.integers(-2, 2),
        "methods": st.just(["POST"]),
        "headers": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["X-T", "X-U"]),
                                                   "exact": st.sampled_from(["1", "2"])}), max_size=2),
    },
)
requests = st.tuples(
    st.sampled_from(["a.example", "b.example", "x.a.example", "y.x.a.example", "other.test", None]),
    st.sampled_from([*PATHS, "/a/bc", "/abcd", "/c", "/b/c/dd", "/A/x"]),
    st.lists(st.tuples(st.sampled_from([b"x-t", b"X-U", b"x-v"]), st.sampled_from([b"1", b"2", b" 1 "])), max_size=3),
    st.sampled_from([b"GET", b"POST"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(route_specs, min_size=1, max_size=30), st.lists(requests, min_size=1, max_size=20))
def test_the_compiled_table_chooses_what_a_linear_scan_chooses(specs: list[dict[str, Any]], reqs: list[Any]) -> None:
    table = RouteTable(routes(*specs))
    for host, path, headers, method in reqs:
        facts = req(path, host=host, headers=headers, method=method)
        assert table.match(facts) is _linear(table, req(path, host=host, headers=headers, method=method))


def test_literal_prefix_of_a_regex() -> None:
    assert literal_prefix(check_regex("/api/v[0-9]+/.*")) == "/api/v"
    assert literal_prefix(check_regex("/ab?")) == "/a"
    assert literal_prefix(check_regex("(?i)/api")) == ""
    assert literal_prefix(check_regex("/a|/b")) == "/"  # re's parser takes the common start out
    assert literal_prefix(check_regex("a|/b")) == ""


def test_a_request_tries_only_the_routes_its_path_or_header_selects() -> None:
    specs: list[dict[str, Any]] = [{"path_prefix": f"/app{i}/", "pool": "a"} for i in range(300)]
    specs += [{"path_regex": f"/svc{i}/[a-z]+", "pool": "b"} for i in range(300)]
    specs += [{"headers": [{"name": "X-Tenant", "exact": f"t{i}"}], "pool": "c"} for i in range(300)]
    table = RouteTable(routes(*specs))
    tried: list[Route] = []
    facts = req("/svc299/x", headers=[(b"X-Tenant", b"t5")])
    lists: list[Any] = []
    for group in table._groups(facts.host):
        group.collect(facts, lists)
    tried = [e[2] for lst in lists for e in lst]
    assert len(tried) == 2  # the regex route of /svc299/ and the header route of t5
    assert pool_of(table, facts) == "b"  # /svc299/'s route (599th) comes before t5's (605th)
    assert pool_of(table, req("/svc300/x", headers=[(b"X-Tenant", b"t5")])) == "c"
    assert pool_of(table, req("/app7/x")) == "a"
