"""Python's cyclic garbage collector: paused around short, latency-bound work, and kept off the
objects a long-running process builds once at its start."""

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


# Young objects allowed before a collection of the youngest generation (Python's default: 700).
# A busy process allocates far more than that in objects that live for one run or one batch:
# each collection would walk them and promote them to the older generations, which are then
# walked again. 10,000 of them are a few megabytes at most.
YOUNG_OBJECTS_BEFORE_COLLECTING = 10_000


def freeze_startup_heap() -> None:
    """Leave what the process built to start (its modules, settings, jobs, connections) out of
    every later collection, and collect the young generation less often.

    Collected once now, then frozen (``gc.freeze``): a full collection walks every tracked
    object, and a worker running 2,000 runs a second had one a second, 60 ms each, mostly over
    objects that live as long as the process. What it creates afterwards is collected as usual,
    after ``YOUNG_OBJECTS_BEFORE_COLLECTING`` new objects instead of 700; a frozen object is
    still freed once nothing refers to it. Call it once, when the process is ready."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS_BEFORE_COLLECTING, middle, old)
