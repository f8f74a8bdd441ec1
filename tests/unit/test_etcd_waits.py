"""quiet_grpc_waits: the threads blocked in gRPC calls of a node wake once a second, not ten times."""

from __future__ import annotations

import pytest
from grpc import _common

from lbnode.cluster.etcd import GRPC_WAIT_POLL, quiet_grpc_waits


def test_the_wait_of_threads_blocked_in_grpc_calls_is_lengthened(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC's own value (a private setting: an upgrade that drops or renames it fails here,
    # instead of a node going back to ten wake-ups a second per watch unnoticed).
    monkeypatch.setattr(_common, "MAXIMUM_WAIT_TIMEOUT", 0.1)
    assert quiet_grpc_waits()
    assert _common.MAXIMUM_WAIT_TIMEOUT == GRPC_WAIT_POLL == 1.0


def test_a_grpc_without_the_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_common, "MAXIMUM_WAIT_TIMEOUT")
    assert not quiet_grpc_waits()
    assert not hasattr(_common, "MAXIMUM_WAIT_TIMEOUT")
