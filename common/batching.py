"""Many concurrent calls, one store transaction: what callers submit while a flush runs goes into
the next flush. Under load a flush carries many items; when idle, each item is flushed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Hands the items submitted concurrently to ``flush`` together, in order of submission.

    ``flush`` gets a list of items and returns one result per item, in the same order. Whatever
    it raises is raised to every caller of that flush (each may submit again: the next flush
    starts afresh). A caller cancelled while waiting leaves its item in the flush.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[Sequence[R]]], limit: int = 500) -> None:
        self._flush = flush
        self._limit = limit
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """``item``'s result, once the flush that carried it has ended."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._flush_all())
        return await future

    async def _flush_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._limit], self._pending[self._limit :]
            try:
                results = await self._flush([item for item, _future in batch])
            except asyncio.CancelledError:
                for _item, future in batch:
                    future.cancel()
                for _item, future in self._pending:
                    future.cancel()
                self._pending = []
                raise
            except Exception as exc:
                for _item, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_item, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
