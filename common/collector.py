"""Pausing Python's cyclic garbage collector around short, latency-bound work."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (as it was after it).

    For work that must not wait for a full collection, which walks every object of the process
    (100 to 150 ms in a scheduler or monitor holding thousands of jobs): a herd's deadline tick,
    the fires of one instant going out. What becomes garbage meanwhile is collected after; the
    caller keeps the block bounded (one instant's batches, one publish). Nested blocks are fine:
    the collector is back on once the block that paused it ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
