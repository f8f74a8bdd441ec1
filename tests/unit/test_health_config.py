"""``[pools.health]`` in the model: grpc checks, their round trip through the store/API form, and
the pairings the API refuses exactly as the config file does."""

from __future__ import annotations

import pytest

from lbnode.api.pools import pool_dict, pool_message
from lbnode.model import ConfigError, HealthCheck, pool_from_dict, pool_to_dict


def test_grpc_check_with_a_service_round_trips_through_the_store_and_the_api_message() -> None:
    pool = pool_from_dict({"name": "p", "backends": [{"address": "127.0.0.1:50051"}],
                           "health": {"type": "grpc", "service": "shop.Cart", "interval": "500ms"}})
    assert pool.health == HealthCheck(type="grpc", service="shop.Cart", interval=0.5, timeout=0.5)
    assert pool_to_dict(pool)["health"] == {"type": "grpc", "service": "shop.Cart", "interval": 0.5, "timeout": 0.5}
    assert pool_from_dict(pool_to_dict(pool)) == pool
    assert pool_from_dict(pool_dict(pool_message(pool))) == pool
    whole_server = pool_from_dict({"name": "q", "health": {"type": "grpc"}})
    assert whole_server.health is not None and whole_server.health.service == ""
    assert "service" not in pool_to_dict(whole_server)["health"]


@pytest.mark.parametrize(
    ("spec", "key", "reason"),
    [
        ({"health": {"type": "tcp", "service": "x"}}, "pool.health.service", 'is for type = "grpc" checks, not "tcp"'),
        ({"health": {"type": "grpc", "expect_status": 200}}, "pool.health.expect_status", 'is for type = "http" checks'),
        ({"health": {"type": "grpc", "service": "a\nb"}}, "pool.health.service", "is not a gRPC service name"),
        ({"health": {"type": "grpc"}, "send_proxy": "v1"}, "pool.send_proxy", "cannot send a PROXY header"),
        ({"health": {"type": "grpc"}, "tls": {"verify": False}}, "pool.tls.verify", "grpcio always verifies"),
    ],
)
def test_what_a_grpc_check_cannot_do_is_refused_naming_the_key(spec: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pool_from_dict({"name": "p", **spec})
    assert caught.value.key == key and reason in caught.value.reason, str(caught.value)


def test_grpc_check_over_tls_that_verifies_is_accepted() -> None:
    pool = pool_from_dict({"name": "p", "health": {"type": "grpc"}, "tls": {"ca": "/etc/ca.pem"}})
    assert pool.health is not None and pool.health.type == "grpc" and pool.tls is not None
