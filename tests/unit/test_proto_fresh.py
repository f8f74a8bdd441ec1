"""The committed gRPC stubs in lbnode/api/ are what proto/ generates (run ``python -m lbnode.api.generate``)."""

from __future__ import annotations

import re
from pathlib import Path

# grpcio-tools is a test dependency (`make venv` installs it): without it this test fails, never skips.
import grpc_tools  # noqa: F401

from lbnode.api.generate import API_DIR, PROTOS, generate

# Lines that only record which grpcio-tools/protobuf made the stubs: a newer
# generator alone is not a stale stub (the runtime checks those versions itself).
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|    \d+,)$", re.MULTILINE
)


def _normalised(text: str) -> str:
    return _VERSION_LINES.sub("<version>", text)


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "nothing generated"
    stale = []
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = API_DIR / relative
        if not committed.exists() or _normalised(committed.read_text()) != _normalised(path.read_text()):
            stale.append(str(relative))
    assert not stale, f"stale stubs {stale} for {list(PROTOS)}: run `python -m lbnode.api.generate` and commit"


def test_stub_packages_are_importable() -> None:
    from lbnode.api.fulcrum.v1 import control_pb2, control_pb2_grpc

    assert control_pb2.DESCRIPTOR.package == "fulcrum.v1"
    assert {"Pools", "Backends", "Cluster"} <= set(control_pb2.DESCRIPTOR.services_by_name)
    assert hasattr(control_pb2_grpc, "add_PoolsServicer_to_server")
