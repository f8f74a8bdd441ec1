"""Each worker's share of the node's limits (lbnode/workers/shares.py): ceil(limit / N) of a
count, 1/N of a rate; one worker keeps the configuration as it is."""

from __future__ import annotations

from lbnode.model import parse_config
from lbnode.workers.shares import worker_config

NODE = {
    "node": {"id": "n1", "max_connections": 9},
    "pools": [{
        "name": "p", "max_queue": 5,
        "backends": [
            {"address": "127.0.0.1:9001", "max_inflight": 3, "max_connections": 1},
            {"address": "127.0.0.1:9002"},
        ],
    }],
    "listeners": [{
        "name": "web", "protocol": "http", "bind": "127.0.0.1:0", "pool": "p", "max_connections": 10,
        "rate_limit": {"rate": 10, "burst": 5},
    }],
}


def test_one_worker_enforces_the_configuration_as_written() -> None:
    config = parse_config(NODE)
    assert worker_config(config, 1) is config


def test_two_workers_share_every_limit() -> None:
    share = worker_config(parse_config(NODE), 2)
    limited, free = share.pools[0].backends
    assert (limited.max_inflight, limited.max_connections) == (2, 1)  # ceil(3/2), and never below 1
    assert (free.max_inflight, free.max_connections) == (None, None)
    assert share.pools[0].max_queue == 3
    assert share.node.max_connections == 5
    listener = share.listeners[0]
    assert listener.max_connections == 5
    assert listener.rate_limit is not None
    assert (listener.rate_limit.rate, listener.rate_limit.burst) == (5.0, 3)


def test_the_sum_of_the_shares_exceeds_a_limit_by_at_most_n_minus_1() -> None:
    for workers in range(1, 9):
        for limit in range(1, 40):
            config = parse_config({**NODE, "pools": [{"name": "p", "backends": [
                {"address": "127.0.0.1:9001", "max_inflight": limit}]}]})
            total = workers * worker_config(config, workers).pools[0].backends[0].max_inflight
            assert limit <= total <= limit + workers - 1
