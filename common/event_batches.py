"""Events sent together: which events share one ``event.batch`` message, and its body.

Events go in one batch only when they are of one pool and one key signs them all (run events and
worker heartbeats, signed with an event key), never more than ``MAX_BATCH_EVENTS`` of them, and
never in a body over ``MAX_MESSAGE_BYTES``. Any other event, and an event alone, is sent as
itself, under its own topic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import orjson

from common.bounds import MAX_MESSAGE_BYTES
from common.messages import MAX_BATCH_EVENTS

T = TypeVar("T")

_TAIL = b"]}"


def _head(pool: str) -> bytes:
    return b'{"v":1,"type":"event.batch","pool":' + orjson.dumps(pool) + b',"events":['


def batch_body(pool: str, bodies: Sequence[bytes]) -> bytes:
    """The body of an ``event.batch`` of ``pool`` carrying ``bodies`` (each an event's exact
    body), in order: compact JSON as cronfleet writes every body, each event's bytes as they are."""
    return _head(pool) + b",".join(bodies) + _TAIL


def batch_size(pool: str, bodies: Sequence[bytes]) -> int:
    """The length of ``batch_body(pool, bodies)``, without building it."""
    return len(_head(pool)) + len(_TAIL) + sum(len(body) for body in bodies) + max(0, len(bodies) - 1)


def pack(
    items: Sequence[T],
    batch_key: Callable[[T], tuple[Hashable, str] | None],
    body: Callable[[T], bytes],
    *,
    most: int = MAX_BATCH_EVENTS,
    limit: int = MAX_MESSAGE_BYTES,
) -> list[list[T]]:
    """``items`` in groups that may each go as one message. ``batch_key`` gives an item's
    ``(signer, pool)``, or None for an item that must go alone; a group shares one key, holds at
    most ``most`` items and a batch body of at most ``limit`` bytes (an item too large to share
    a message goes alone). Every item is in exactly one group; items keep their order within a
    group, and groups are in the order of their first item."""
    groups: list[list[T]] = []
    open_groups: dict[tuple[Hashable, str], tuple[list[T], int]] = {}
    for item in items:
        key = batch_key(item)
        if key is None:
            groups.append([item])
            continue
        size = len(body(item))
        found = open_groups.get(key)
        if found is not None:
            group, used = found
            if len(group) < most and used + 1 + size <= limit:
                group.append(item)
                open_groups[key] = (group, used + 1 + size)
                continue
        group = [item]
        groups.append(group)
        open_groups[key] = (group, len(_head(key[1])) + len(_TAIL) + size)
    return groups
