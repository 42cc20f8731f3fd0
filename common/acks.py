"""Settling the deliveries of a consuming channel together: what is settled while one write is
under way goes out in the next, as one ``multiple`` ack for the oldest outstanding deliveries it
completes, and one frame each for the rest (acks of later deliveries, nacks).

A consumer whose deliveries end out of order (concurrent runs) cannot ack them with
``multiple`` blindly: that would settle a delivery still being worked on. ``ChannelAcks`` knows
which deliveries of its channel are outstanding, so a ``multiple`` ack only ever covers settled
ones; a delivery held for a long time keeps the others from being covered, not from being acked.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.commands import Basic

from common.batching import Batcher
from common.connection import CONNECT_ERRORS
from common.consuming import Delivery, consume_deliveries

log = logging.getLogger("cronfleet.bus")

# (delivery tag, ack, requeue): what to do with one delivery.
_Settlement = tuple[int, bool, bool]


class Outstanding:
    """The deliveries of one channel not yet covered by a multiple ack, and the frames that
    settle some of them (pure: no I/O)."""

    def __init__(self) -> None:
        # Delivered and not yet covered by a multiple ack, in tag order; ``_settled`` holds those
        # among them already acked alone or nacked.
        self._tags: deque[int] = deque()
        self._settled: set[int] = set()

    def __len__(self) -> int:
        return len(self._tags)

    def delivered(self, tag: int) -> None:
        """Note delivery ``tag`` as outstanding (call it as deliveries arrive)."""
        if not self._tags or tag > self._tags[-1]:
            self._tags.append(tag)
        else:
            self._tags.insert(bisect.bisect_left(self._tags, tag), tag)

    def frames(self, settlements: Iterable[_Settlement]) -> list[Any]:
        """The frames that settle ``settlements`` (each delivered, each settled once): nacks
        first, then one multiple ack up to the newest of them with no unsettled delivery before
        it, then the other acks one by one."""
        frames: list[Any] = []
        acks: set[int] = set()
        for tag, ack, requeue in settlements:
            if ack:
                acks.add(tag)
            else:
                frames.append(Basic.Nack(delivery_tag=tag, multiple=False, requeue=requeue))
                self._settled.add(tag)
        covered_to: int | None = None
        while self._tags:
            head = self._tags[0]
            if head in acks:
                covered_to = head
            elif head in self._settled:
                self._settled.discard(head)
            else:
                break
            self._tags.popleft()
        if covered_to is not None:
            frames.append(Basic.Ack(delivery_tag=covered_to, multiple=True))
        for tag in sorted(acks):
            if covered_to is None or tag > covered_to:
                frames.append(Basic.Ack(delivery_tag=tag, multiple=False))
                self._settled.add(tag)
        return frames


class ChannelAcks:
    """The settlements of one channel's deliveries, written together (see the module)."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.outstanding = Outstanding()
        self._batches: Batcher[_Settlement, bool] = Batcher(self._write, limit=10_000)

    async def settle(self, tag: int, *, ack: bool = True, requeue: bool = False) -> bool:
        """Ack (or nack, requeued or not) delivery ``tag`` once; returns once it is written, True,
        or False when the channel is gone (the broker then requeues it by itself)."""
        return await self._batches.submit((tag, ack, requeue))

    async def _write(self, settlements: list[_Settlement]) -> list[bool]:
        frames = self.outstanding.frames(settlements)
        channel = self.channel
        try:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            written = channel.create_future()
            await channel.write_queue.put(
                ChannelFrame.marshall(channel_number=channel.number, frames=frames, drain_future=written)
            )
            await written
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # The channel closed under the write and cancelled its futures: not ours to stop.
            return self._unsettled(settlements, ConnectionError("the channel closed"))
        except Exception as exc:  # whatever the closing channel failed the write with
            return self._unsettled(settlements, exc)
        return [True] * len(settlements)

    @staticmethod
    def _unsettled(settlements: list[_Settlement], exc: BaseException) -> list[bool]:
        """Say that ``settlements`` were not written; the broker requeues them by itself."""
        log.warning(
            "could not settle %d deliveries (%s); the broker will redeliver them",
            len(settlements),
            str(exc) or type(exc).__name__,
            exc_info=None if isinstance(exc, CONNECT_ERRORS) else exc,
        )
        return [False] * len(settlements)


class AckedDelivery(Delivery):
    """A ``Delivery`` settled, once, through its channel's ``ChannelAcks``."""

    __slots__ = ("_acks",)

    def __init__(self, raw: DeliveredMessage, acks: ChannelAcks) -> None:
        super().__init__(raw)
        self._acks = acks
        acks.outstanding.delivered(self.tag)

    @property
    def processed(self) -> bool:
        """Whether it was settled (acked or nacked) already."""
        return self.settled

    async def settle(self, *, ack: bool = True, requeue: bool = False) -> bool:
        """Ack it (or nack it, requeued or dead-lettered by the broker); False when its channel is
        gone (the broker then requeues it). A second call does nothing and returns True."""
        if self.settled:
            return True
        self.settled = True
        return await self._acks.settle(self.tag, ack=ack, requeue=requeue)


async def consume_acked(
    connection: AbstractRobustConnection,
    declare: Callable[[AbstractChannel], Awaitable[AbstractQueue]],
    prefetch: int,
    on_delivery: Callable[[AckedDelivery], object],
    ready: asyncio.Event,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """``common.consuming.consume_deliveries``, handing each delivery over as an ``AckedDelivery`` whose
    settlement is written together with the others of its channel; ``on_stop`` as there."""
    by_channel: dict[int, ChannelAcks] = {}

    def deliver(delivery: Delivery) -> None:
        channel = cast(aiormq.Channel, delivery.raw.channel)
        acks = by_channel.get(id(channel))
        if acks is None or acks.channel is not channel:
            for key, known in list(by_channel.items()):
                if known.channel.is_closed:
                    del by_channel[key]
            acks = by_channel[id(channel)] = ChannelAcks(channel)
        on_delivery(AckedDelivery(delivery.raw, acks))

    await consume_deliveries(connection, declare, prefetch, deliver, ready, on_stop)
