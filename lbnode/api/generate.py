"""Regenerates the gRPC stubs in ``lbnode/api/`` from ``proto/``: ``python -m lbnode.api.generate``.

Owns the one protoc invocation (and the import rewrite that makes the stubs a
package of ``lbnode.api``), so the freshness test and developers produce the
same bytes. Needs grpcio-tools (a test/build dependency); never runs in a node.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
API_DIR = REPO / "lbnode" / "api"
PROTOS = ("fulcrum/v1/control.proto",)

# protoc writes ``from fulcrum.v1 import control_pb2``: the proto package as a
# top-level Python package. The stubs live under lbnode.api instead, so that
# no top-level "fulcrum" module is claimed and imports need no sys.path tricks.
_IMPORT_RE = re.compile(r"^from fulcrum(\.\S*)? import ", re.MULTILINE)


def generate(out_dir: Path = API_DIR) -> list[Path]:
    """Writes the stubs for ``PROTOS`` under ``out_dir``; returns the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    written: list[Path] = []
    for proto in PROTOS:
        package_dir = out_dir / Path(proto).parent
        for parent in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = out_dir / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        stem = Path(proto).stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"):
            path = package_dir / name
            text = _IMPORT_RE.sub(lambda m: f"from lbnode.api.fulcrum{m.group(1) or ''} import ", path.read_text())
            path.write_text(text)
            written.append(path)
    return written


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
