"""The deadline timers' pure parts: the heap of (deadline, job) and the collector pause."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest

from common.collector import collector_paused
from monitor.deadlines import DeadlineHeap

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_collector_is_paused_inside_and_as_it_was_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # nested: the outer block still ends it
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failed tick")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # paused by someone else before: left to them
    finally:
        gc.enable()


def test_a_herd_pops_in_bounded_batches_earliest_first() -> None:
    heap = DeadlineHeap()
    for i in range(2500):
        heap.arm(f"job-{i:04d}", T0 + timedelta(seconds=i % 3))
    heap.arm("later", T0 + timedelta(hours=1))
    popped: list[tuple[str, datetime]] = []
    while due := heap.pop_due(T0 + timedelta(seconds=2), 1000):
        assert len(due) <= 1000
        popped.extend(due)
    assert len(popped) == 2500
    assert [at for _job, at in popped] == sorted(at for _job, at in popped)
    assert len(heap) == 1 and heap.next_at() == T0 + timedelta(hours=1)
