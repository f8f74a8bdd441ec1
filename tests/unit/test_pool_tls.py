"""``[pools.tls]`` in the model: defaults, and the round trip through the store/API form."""

from __future__ import annotations

from lbnode.api.pools import pool_dict, pool_message
from lbnode.model import PoolTls, Table, parse_pool, pool_from_dict, pool_to_dict


def test_defaults_verify_against_the_system_store() -> None:
    pool = parse_pool(Table({"name": "p", "tls": {"enabled": True}}, "pools[0]"))
    assert pool.tls == PoolTls(ca=None, verify=True, server_name=None, cert=None, key=None)
    assert parse_pool(Table({"name": "p"}, "pools[0]")).tls is None


def test_round_trip_through_the_store_and_the_api_message() -> None:
    spec = {"name": "p", "backends": [{"address": "192.0.2.5:8443"}],
            "tls": {"enabled": True, "ca": "/etc/ca.pem", "server_name": "API.internal.",
                    "cert": "/etc/c.pem", "key": "/etc/c.key"}}
    pool = pool_from_dict(spec)
    assert pool.tls == PoolTls(ca="/etc/ca.pem", server_name="api.internal", cert="/etc/c.pem", key="/etc/c.key")
    assert pool_from_dict(pool_to_dict(pool)) == pool
    assert pool_from_dict(pool_dict(pool_message(pool))) == pool
    plain = pool_from_dict({"name": "q", "tls": {"enabled": True, "verify": False}})
    assert pool_to_dict(plain)["tls"] == {"enabled": True, "verify": False}
    assert pool_from_dict(pool_to_dict(plain)) == plain
