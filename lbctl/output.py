"""What lbctl prints: aligned tables for people, JSON for scripts.

Owns formatting only; never decides what to fetch or change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf.message import Message


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None) -> None:
    """Columns padded to the widest cell; an empty table still prints its header."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def emit_json(value: Any, out: TextIO | None = None, *, compact: bool = False) -> None:
    out = out or sys.stdout
    if compact:
        print(json.dumps(value, sort_keys=False, separators=(",", ":")), file=out, flush=True)
    else:
        print(json.dumps(value, indent=2), file=out)


def message_dict(msg: Message) -> dict[str, Any]:
    """A message as a plain dict with every field (ints stay numbers, enums are names, times RFC 3339)."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        if fd.has_presence and not fd.is_repeated and not msg.HasField(fd.name):
            continue  # unset optional field or oneof member
        value = getattr(msg, fd.name)
        out[fd.name] = _value(fd, value)
    return out


def _value(fd: Any, value: Any) -> Any:
    if fd.is_repeated:
        return [_scalar(fd, v) for v in value]
    return _scalar(fd, value)


def _scalar(fd: Any, value: Any) -> Any:
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            return value.ToJsonString()
        return message_dict(value)
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[value].name
    return value
