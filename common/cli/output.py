"""Printing listings: an aligned table for people, ``--json`` for programs."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

import orjson


def emit(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], as_json: bool, out: TextIO | None = None
) -> None:
    """Print ``rows`` as a JSON array (every field) or as a table of ``columns``, to ``out`` or
    else to sys.stdout as it is at the call (redirected, for one, by the tests)."""
    out = sys.stdout if out is None else out
    if as_json:
        out.write(orjson.dumps(list(rows), option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return
    if not rows:
        out.write("(none)\n")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for line in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
