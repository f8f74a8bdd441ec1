"""What a reload changes (lbnode/reloadplan.py): pure, two configurations in, a plan out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lbnode.config import load_config_text
from lbnode.model import Config
from lbnode.reloadplan import ReloadRefused, plan_reload, socket_key
from tests.conftest import listener_toml, node_toml, pool_toml


def config(*listeners: str, node_id: str = "t1", extra: str = "") -> Config:
    return load_config_text(node_toml(pool_toml("a", ["127.0.0.1:9001"]), pool_toml("b", ["127.0.0.1:9002"]),
                                      *listeners, extra, node_id=node_id))


WEB = listener_toml("web", "http", "a", bind="127.0.0.1:8080")
TCP = listener_toml("tcp", "tcp", "a", bind="127.0.0.1:8081")


def test_unchanged_listeners_are_kept() -> None:
    plan = plan_reload(config(WEB, TCP), config(WEB, TCP))
    assert plan.kept == ("web", "tcp") and not plan.added and not plan.changed and not plan.removed
    assert plan.summary() == "listeners unchanged"


def test_added_changed_and_removed() -> None:
    new_web = listener_toml("web", "http", "b", bind="127.0.0.1:8080")
    extra = listener_toml("extra", "http", "b", bind="127.0.0.1:8082")
    plan = plan_reload(config(WEB, TCP), config(new_web, extra))
    assert [li.name for li in plan.added] == ["extra"]
    assert [(name, li.pool) for name, li in plan.changed] == [("web", "b")]
    assert plan.removed == ("tcp",)
    assert plan.summary() == "listeners added extra; changed web; removed tcp"


def test_a_renamed_listener_keeps_its_socket() -> None:
    renamed = listener_toml("www", "http", "a", bind="127.0.0.1:8080")
    plan = plan_reload(config(WEB), config(renamed))
    assert [(name, li.name) for name, li in plan.changed] == [("web", "www")]
    assert not plan.added and not plan.removed


def test_a_listener_moved_to_another_port_is_a_new_socket() -> None:
    moved = listener_toml("web", "http", "a", bind="127.0.0.1:9090")
    plan = plan_reload(config(WEB), config(moved))
    assert [li.name for li in plan.added] == ["web"] and plan.removed == ("web",)


def test_port_zero_listeners_match_by_name() -> None:
    assert socket_key("web", load_config_text(node_toml(pool_toml("a", ["127.0.0.1:1"]),
                                                        listener_toml("web", "http", "a"))).listeners[0].bind) \
        == "127.0.0.1:0/web"


@pytest.mark.parametrize(("change", "key"), [
    ({"node_id": "t2"}, "node.id"),
    ({"extra": '[control]\nbind = "127.0.0.1:0"\ninsecure = true\n'}, "[control]"),
])
def test_what_needs_a_restart_is_refused_naming_the_key(change: dict[str, str], key: str) -> None:
    with pytest.raises(ReloadRefused) as refused:
        plan_reload(config(WEB), config(WEB, **change))
    assert str(refused.value).startswith(f"{key} changed: a running node cannot take that without a restart")


def test_the_number_of_workers_is_chosen_at_start() -> None:
    """One process or a supervisor and N workers, and N: a reload cannot change the layout
    (a reload with the same workers >= 2 is planned like any other)."""
    one = config(WEB)
    two = replace(one, node=replace(one.node, workers=2))
    for old, new in ((one, two), (two, replace(one, node=replace(one.node, workers=3)))):
        with pytest.raises(ReloadRefused, match=r"^node\.workers changed: a running node cannot take that"):
            plan_reload(old, new)
    assert plan_reload(two, two).kept == ("web",)


def test_an_access_log_change_is_refused() -> None:
    logged = listener_toml("web", "http", "a", bind="127.0.0.1:8080",
                           extra='[listeners.access_log]\npath = "-"\n')
    with pytest.raises(ReloadRefused, match=r"^listeners\[0\]\.access_log changed"):
        plan_reload(config(WEB), config(logged))
