"""lbctl apply's plan for routes and certificates: the file read and validated like node.toml,
the diff against the store, what --prune touches, and the order of the writes. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbctl.apply import (
    Desired,
    FullPlan,
    PoolsFileError,
    check_route_targets,
    load_apply_file,
    make_plan,
    plan_certificates,
    plan_routes,
)
from lbnode.model import ConfigError, Pool, route_from_dict
from tests.tlsgen import make_ca, make_leaf


def route(name: str, **table: object):  # type: ignore[no-untyped-def]
    return route_from_dict({"name": name, "pool": "web", **table})


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return str(path)


def test_the_file_holds_pools_routes_and_certificates_read_relative_to_it(tmp_path: Path) -> None:
    issued = make_leaf(make_ca("Plan CA"), ["www.example.com"])
    issued.write(tmp_path, "www")
    desired = load_apply_file(write(tmp_path, """
[[pools]]
name = "web"
[[routes]]
listener = "front"
name = "api"
path_prefix = "/api/"
pool = "web"
[[certificates]]
name = "www"
cert = "www.crt"
key = "www.key"
"""))
    assert [p.name for p in desired.pools or []] == ["web"]
    assert [(li, r.name, dict(r.spec)) for li, r in desired.routes or []] == [
        ("front", "api", {"name": "api", "path_prefix": "/api/", "pool": "web"})]
    assert [c.name for c in desired.certificates or []] == ["www"]
    only_routes = load_apply_file(write(tmp_path, 'routes = []\n'))
    assert only_routes == Desired(None, [], None)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[routes]]\nlistener = "front"\nname = "r"\npath_regex = "(a|ab)*"\npool = "web"\n', r"routes\[0\]\.path_regex: "),
        ('[[routes]]\nname = "r"\npool = "web"\n', r"routes\[0\]\.listener: is required"),
        ('[[routes]]\nlistener = "front"\npool = "web"\n', r"routes\[0\]\.name: is required"),
        ('[[routes]]\nlistener = "front"\nname = "r"\npool = "web"\n[[routes]]\nlistener = "front"\nname = "r"\n'
         'pool = "api"\n', r'routes\[1\]\.name: route "r" of listener "front" is already defined by routes\[0\]'),
        ('[[certificates]]\nname = "www"\ncert = "none.crt"\nkey = "none.key"\n',
         r"certificates\[0\]\.cert: cannot read .*none\.crt"),
        ('[[rutes]]\nname = "x"\n', r"rutes: unknown key"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(PoolsFileError, match=rf"site\.toml: {error}"):
        load_apply_file(write(tmp_path, text))


def test_routes_are_compared_by_their_tables_and_pruned_only_when_asked() -> None:
    current = {("front", "same"): (route("same", path="/s"), 4), ("front", "old"): (route("old", path="/o"), 5),
               ("front", "moved"): (route("moved", path="/m"), 6)}
    desired = [("front", route("same", path="/s")), ("front", route("moved", path="/m2", priority=3)),
               ("front", route("new", path="/n"))]
    steps = {s.key: s for s in plan_routes(desired, current, prune=False)}
    assert steps["front", "same"].action == "unchanged"
    assert steps["front", "old"].action == "keep" and steps["front", "old"].revision == 5
    assert steps["front", "moved"].action == "update" and steps["front", "moved"].revision == 6
    assert steps["front", "moved"].changes == ('path: "/m" -> "/m2"', "priority: (none) -> 3")
    assert steps["front", "new"].action == "create" and steps["front", "new"].label == "route front/new"
    pruned = {s.key: s.action for s in plan_routes(desired, current, prune=True)}
    assert pruned["front", "old"] == "delete"
    # a file without [[routes]] leaves the store's routes alone, even with --prune
    assert plan_routes(None, current, prune=True) == ()


def test_writes_never_leave_a_route_naming_a_missing_pool() -> None:
    pools = make_plan([Pool("new")], {"gone": (Pool("gone"), 2)}, 9, prune=True)
    routes = plan_routes([("front", route("r", pool="new"))], {("front", "x"): (route("x", pool="gone"), 3)}, prune=True)
    order = [(w.kind, w.action) for w in FullPlan(pools, routes).writes]
    assert order == [("pool", "create"), ("route", "create"), ("route", "delete"), ("pool", "delete")]


def test_a_route_of_the_file_naming_a_pool_that_will_not_exist_is_refused_before_any_write() -> None:
    desired = Desired([Pool("web")], [("front", route("a")), ("front", route("b", pool="old"))])
    plan = make_plan([Pool("web")], {"old": (Pool("old"), 3)}, 9, prune=True)  # old is pruned
    with pytest.raises(ConfigError, match=r'^routes\[1\]\.pool: pool "old" is not defined'):
        check_route_targets(desired, plan, {"old"})
    check_route_targets(desired, make_plan([Pool("web")], {"old": (Pool("old"), 3)}, 9, prune=False), {"old"})


def test_a_certificate_is_unchanged_when_its_leaf_and_chain_are(tmp_path: Path) -> None:
    issued = make_leaf(make_ca("Plan CA"), ["www.example.com"])
    issued.write(tmp_path, "www")
    desired = load_apply_file(write(tmp_path, '[[certificates]]\nname = "www"\ncert = "www.crt"\nkey = "www.key"\n'))
    assert desired.certificates is not None
    mine = desired.certificates[0]
    same = plan_certificates(desired.certificates, {"www": (mine.fingerprint, mine.chain_pem, 7)}, prune=False)
    assert [(s.action, s.revision) for s in same] == [("unchanged", 7)]
    other = plan_certificates(desired.certificates, {"www": ("ab" * 32, b"", 7), "old": ("cd" * 32, b"", 8)},
                              prune=True)
    assert [(s.key, s.action) for s in other] == [(("old",), "delete"), (("www",), "update")]
    assert other[1].changes == (f"sha256 {'ab' * 32} -> {mine.fingerprint}",)
