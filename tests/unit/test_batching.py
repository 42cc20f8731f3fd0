"""common.batching: calls made while a flush runs share the next flush."""

from __future__ import annotations

import asyncio

import pytest

from common.batching import Batcher


async def test_concurrent_submissions_are_flushed_together_in_order() -> None:
    flushed: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        await gate.wait()
        return [item * 10 for item in items]

    batcher: Batcher[int, int] = Batcher(flush)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # the first flush starts with item 1 alone
    rest = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 10
    assert [await task for task in rest] == [20, 30, 40]
    assert flushed == [[1], [2, 3, 4]]


async def test_a_failed_flush_fails_its_callers_and_the_next_starts_afresh() -> None:
    calls = 0

    async def flush(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the store is down")
        return items

    batcher: Batcher[str, str] = Batcher(flush)
    failed = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
    assert [type(result) for result in failed] == [RuntimeError, RuntimeError]
    assert await batcher.submit("c") == "c"


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    batcher: Batcher[int, int] = Batcher(flush, limit=10)
    waiting = [asyncio.create_task(batcher.submit(n)) for n in range(3)]
    await asyncio.sleep(0)
    waiting[1].cancel()
    gate.set()
    assert await waiting[0] == 0 and await waiting[2] == 2
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]


async def test_a_flush_takes_at_most_its_limit() -> None:
    sizes: list[int] = []

    async def flush(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        return items

    batcher: Batcher[int, int] = Batcher(flush, limit=4)
    assert await asyncio.gather(*(batcher.submit(n) for n in range(10))) == list(range(10))
    assert max(sizes) <= 4 and sum(sizes) == 10
