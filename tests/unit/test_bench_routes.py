"""The routes bench section's configs: 1,000 routes of every indexed kind that the benchmark's
request does not meet, but the one before last; the same pool either way."""

from __future__ import annotations

from bench.configs import SMALL_PATH
from bench.routes import MANY, MANY_ROUTES, ONE_ROUTE, _linear, _tables, route_runs
from lbnode.routing import RequestFacts


def test_the_benchmark_request_takes_the_route_before_last_of_1000() -> None:
    tables = _tables()
    facts = RequestFacts(b"GET", "127.0.0.1", SMALL_PATH, "", [(b"Host", b"127.0.0.1:8080")], "127.0.0.1")
    many = tables[MANY]
    assert len(many.routes) == MANY
    route = many.match(facts)
    assert route is not None and many.position(route) == MANY - 2
    assert _linear(many, facts) is route
    kinds = {("host" if r.host else "path_prefix" if r.path_prefix else "regex" if r.path_regex else "header")
             for r in many.routes}
    assert kinds == {"host", "path_prefix", "regex", "header"}
    (one,) = tables[1].routes
    assert tables[1].match(facts) is one and one.pool == route.pool == "web"


def test_runs_alternate_one_and_many_routes() -> None:
    assert [v for _, v in route_runs()] == [ONE_ROUTE, MANY_ROUTES, MANY_ROUTES, ONE_ROUTE]
