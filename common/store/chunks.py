"""Cutting work into statements of bounded size: no statement grows with the data.

PostgreSQL takes at most 32,767 bind parameters per statement and stock SQLite 32,766; an ``IN``
list or a multi-row INSERT built from all the rows at hand passes in tests and fails in
production. Every such statement goes through ``chunks`` with one of the sizes below.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Items of an ``IN (...)`` list per statement.
IN_LIST_CHUNK = 1000
# Bind parameters of a multi-row INSERT per statement (rows = this // columns).
INSERT_PARAMETERS_CHUNK = 4000
# Rows deleted per transaction by a purge: short transactions, never a long lock.
PURGE_BATCH = 1000


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size`` (none for an empty sequence)."""
    if size < 1:
        raise ValueError("a chunk holds at least one item")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rows_per_insert(columns: int) -> int:
    """How many rows of ``columns`` values one multi-row INSERT may carry."""
    return max(1, INSERT_PARAMETERS_CHUNK // max(1, columns))
