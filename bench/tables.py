"""Markdown tables and number formats for the report.

Pure: no I/O. Every section renders through these, so the report reads alike.
"""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown table. ``align`` holds one of ``l``/``r`` per column (default: first
    column left, the rest right). Cells are stringified; ``|`` in cells is escaped."""
    n = len(headers)
    align = (align or "l" + "r" * (n - 1)).ljust(n, "r")

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    body = [[cell(h) for h in headers]] + [[cell(v) for v in r] + [""] * (n - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in body) for i in range(n)]
    widths = [max(w, 3) for w in widths]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
            for w, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([line(body[0]), sep] + [line(r) for r in body[1:]])


DASH = "—"


def fmt_num(v: float | None, digits: int = 1, thousands: bool = False) -> str:
    if v is None:
        return DASH
    return f"{v:,.{digits}f}" if thousands else f"{v:.{digits}f}"


def fmt_ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return DASH
    return f"{a / b:.{digits}f}x"


def fail_text(reason: str) -> str:
    return "failed: " + reason
