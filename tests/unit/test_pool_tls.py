"""``[pools.tls]`` in the model: defaults, and the round trip through the store/API form."""

from __future__ import annotations

import json

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


def test_an_h2_pool_refuses_any_alpn_answer_but_h2_and_http1_pools_offer_none() -> None:
    from lbnode.tls.upstream import alpn_refusal, backend_tls

    h2 = backend_tls(PoolTls(verify=False), ("h2",))
    assert alpn_refusal(h2, "h2") is None
    assert alpn_refusal(h2, "http/1.1") == (
        'TLS: the backend does not speak h2 (ALPN: it selected "http/1.1"); the pool\'s protocol needs it')
    assert alpn_refusal(h2, None) == (
        "TLS: the backend does not speak h2 (ALPN: it selected no protocol); the pool's protocol needs it")
    http1 = backend_tls(PoolTls(verify=False))
    assert http1 is not h2 and alpn_refusal(http1, None) is None and alpn_refusal(http1, "h2") is None


def test_an_h2_pool_over_tls_round_trips_through_the_store_and_the_api_message() -> None:
    spec = {"name": "g", "protocol": "h2", "backends": [{"address": "192.0.2.5:8443"}],
            "tls": {"enabled": True, "ca": "/etc/ca.pem", "server_name": "api.internal"},
            "health": {"type": "grpc", "service": "demo.Echo"}}
    pool = pool_from_dict(spec)
    assert pool.protocol == "h2" and pool.tls == PoolTls(ca="/etc/ca.pem", server_name="api.internal")
    assert pool_to_dict(pool)["protocol"] == "h2"
    assert pool_from_dict(pool_to_dict(pool)) == pool
    message = pool_message(pool)
    assert json.loads(message.spec_json)["protocol"] == "h2"
    assert pool_from_dict(pool_dict(message)) == pool
    assert "protocol" not in pool_to_dict(pool_from_dict({"name": "p"}))  # http1, the default, left out
