"""``[[listeners.sni_routes]]`` and ``non_tls``: validation that names the key, and the choice of pool."""

from __future__ import annotations

from typing import Any

import pytest

from lbnode.model import ConfigError, SniRoute, choose_sni_pool, parse_config


def config(listener: dict[str, Any]) -> Any:
    return parse_config({
        "node": {"id": "n1"},
        "pools": [{"name": n, "backends": [{"address": "127.0.0.1:9000"}]} for n in ("dflt", "a", "w", "ww")],
        "listeners": [{"name": "edge", "protocol": "tcp", "bind": "127.0.0.1:8443", "pool": "dflt"} | listener],
    })


def test_routes_parsed_lower_case_without_trailing_dot() -> None:
    li = config({"sni_routes": [{"server_name": "A.Example.com.", "pool": "a"}], "non_tls": "close"}).listeners[0]
    assert li.sni_routes == (SniRoute("a.example.com", "a"),)
    assert li.non_tls == "close" and li.reads_client_hello


def test_passthrough_to_a_pool_with_tls_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({
            "node": {"id": "n1"},
            "pools": [{"name": "dflt"}, {"name": "a", "tls": {"enabled": True}}],
            "listeners": [{"name": "edge", "protocol": "tcp", "bind": "127.0.0.1:8443", "pool": "dflt",
                           "sni_routes": [{"server_name": "a.com", "pool": "a"}]}],
        })
    assert err.value.key == "listeners[0].sni_routes[0].pool"
    assert "has [pools.tls], but this listener passes the client's TLS through as is" in err.value.reason


def test_plain_tcp_listener_does_not_read_the_hello() -> None:
    assert not config({}).listeners[0].reads_client_hello


ROUTES = (SniRoute("*.example.com", "w"), SniRoute("*.deep.example.com", "ww"), SniRoute("a.example.com", "a"))


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("a.example.com", "a"),  # exact beats the wildcard listed before it
        ("b.example.com", "w"),
        ("x.y.example.com", "w"),  # a wildcard covers any depth, like http routes' host
        ("x.deep.example.com", "ww"),  # the longest matching wildcard wins
        ("example.com", None),  # "*.example.com" needs at least one label in front
        ("notexample.com", None),
        (None, None),  # no SNI: the listener's pool
    ],
)
def test_choice_of_pool(name: str | None, pool: str | None) -> None:
    assert choose_sni_pool(ROUTES, name) == pool


@pytest.mark.parametrize(
    ("listener", "key", "reason"),
    [
        ({"sni_routes": [{"server_name": "a b", "pool": "a"}]}, "listeners[0].sni_routes[0].server_name",
         'is not a host name or "*.domain"'),
        ({"sni_routes": [{"server_name": "a.*.com", "pool": "a"}]}, "listeners[0].sni_routes[0].server_name",
         'is not a host name or "*.domain"'),
        ({"sni_routes": [{"server_name": "a.com", "pool": "a"}, {"server_name": "A.com", "pool": "w"}]},
         "listeners[0].sni_routes[1].server_name", "is already routed by listeners[0].sni_routes[0]"),
        ({"sni_routes": [{"server_name": "a.com", "pool": "nope"}]}, "listeners[0].sni_routes[0].pool",
         'pool "nope" is not defined'),
        ({"sni_routes": [{"server_name": "a.com"}]}, "listeners[0].sni_routes[0].pool", "is required"),
        ({"sni_routes": [{"server_name": "a.com", "pool": "a", "port": 1}]}, "listeners[0].sni_routes[0].port",
         "unknown key"),
        ({"non_tls": "drop"}, "listeners[0].non_tls", "is not one of: default, close"),
        ({"protocol": "http", "sni_routes": [{"server_name": "a.com", "pool": "a"}]}, "listeners[0].sni_routes[0]",
         'sni_routes need protocol = "tcp"'),
        ({"protocol": "http", "non_tls": "close"}, "listeners[0].non_tls", 'needs protocol = "tcp"'),
    ],
)
def test_bad_sni_config_names_the_key(listener: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(listener)
    assert err.value.key == key and reason in err.value.reason, str(err.value)
