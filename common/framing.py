"""Many messages in one write: each signed message marshalled into its AMQP frames ahead of
time (``FramedMessage``), all of them queued for the connection's writer at once, and their
publisher confirms awaited together (``ConfirmInstants``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

# Confirms that arrive within this long of one another (the callbacks of one broker ack that
# confirms many messages) share one instant.
_SAME_CONFIRM = timedelta(microseconds=200)


class ConfirmInstants:
    """When each of ``count`` messages of a batch was confirmed (or failed), by its index;
    ``all_done`` is set once every one has."""

    def __init__(self, count: int) -> None:
        self.at: dict[int, datetime] = {}
        self.all_done = asyncio.Event()
        self._left = count
        self._last: datetime | None = None
        if not count:
            self.all_done.set()

    def note(self, index: int, _future: asyncio.Future[Any]) -> None:
        """Message ``index`` was settled now (a done-callback of its confirmation)."""
        now = datetime.now(UTC)
        if self._last is None or now - self._last > _SAME_CONFIRM:
            self._last = now
        self.at[index] = self._last
        self._left -= 1
        if not self._left:
            self.all_done.set()


@dataclass(frozen=True, slots=True)
class FramedMessage:
    """A signed message marshalled into its AMQP frames for one channel (``payload``): sending it
    is one write. ``channel_number`` 0 means it is not framed for any channel yet."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    channel_number: int
    payload: bytes

    def for_channel(self, number: int) -> bytes:
        """This message's frames on channel ``number``: as framed when it is the same channel,
        framed anew otherwise (the channel was replaced after a reconnect)."""
        if number == self.channel_number:
            return self.payload
        return _marshal(self.exchange, self.routing_key, self.body, self.properties, number)


def frame_message(
    exchange: str,
    body: bytes,
    routing_key: str,
    headers: Mapping[str, Any],
    message_id: str,
    sent_at: datetime,
    channel_number: int,
) -> FramedMessage:
    """A persistent JSON message with ``headers``, marshalled for ``channel_number`` (unless 0)."""
    properties = Basic.Properties(
        headers=dict(headers),
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        timestamp=sent_at,
    )
    payload = _marshal(exchange, routing_key, body, properties, channel_number) if channel_number else b""
    return FramedMessage(exchange, routing_key, body, properties, channel_number, payload)


def _marshal(
    exchange: str, routing_key: str, body: bytes, properties: Basic.Properties, number: int
) -> bytes:
    """The frames of one mandatory publish on channel ``number``: method, header, and body
    frames small enough for any frame size a broker may negotiate."""
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    frames.extend(ContentBody(body[i : i + _BODY_FRAME]) for i in range(0, len(body), _BODY_FRAME))
    return b"".join(pamqp_frame.marshal(frame, number) for frame in frames)


# Body frames of at most this size: under the smallest frame_max a broker may negotiate (4 KiB
# is AMQP's minimum) less the frame's 8 bytes of overhead.
_BODY_FRAME = 4096 - 8


async def publish_together(
    channel: aiormq.Channel, messages: Sequence[FramedMessage]
) -> tuple[list[asyncio.Future[Any]], list[int]]:
    """Publish ``messages``, each mandatory, on a confirming ``channel``, all their frames in
    one write; returns each one's confirmation future (an unroutable message's fails with a
    delivery error) and delivery tag, in order. The caller forgets their message ids once they
    are settled (``forget_message_ids``).

    This is aiormq's own ``basic_publish`` (7.x) for many messages at once: under the channel's
    lock, each takes the next delivery tag, its confirmation is registered under that tag and
    its message id (so that a returned message fails it), and the frames are queued for the
    connection's writer as one payload. Every message needs a message id."""
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    async with channel.lock:
        payloads: list[bytes] = []
        confirmations: list[asyncio.Future[Any]] = []
        tags: list[int] = []
        number = channel.number
        for message in messages:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmation = channel.create_future()
            channel.confirmations[tag] = confirmation
            channel.message_id_delivery_tag[cast(str, message.properties.message_id)] = tag
            payloads.append(message.for_channel(number))
            confirmations.append(confirmation)
            tags.append(tag)
        await channel.write_queue.put(ChannelFrame(payload=b"".join(payloads), should_close=False))
    return confirmations, tags


def forget_message_ids(
    channel: aiormq.Channel, messages: Sequence[FramedMessage], tags: Sequence[int]
) -> None:
    """Drop the message-id entries ``publish_together`` made (a later publish may own one)."""
    known = channel.message_id_delivery_tag
    for message, tag in zip(messages, tags, strict=True):
        message_id = cast(str, message.properties.message_id)
        if known.get(message_id) == tag:
            del known[message_id]
