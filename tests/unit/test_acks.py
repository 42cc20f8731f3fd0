"""common.acks.Outstanding: a multiple ack never covers a delivery that is still unsettled."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pamqp.commands import Basic

from common.acks import Outstanding


def described(frames: list[Any]) -> list[tuple[str, int, bool]]:
    return [(type(frame).__name__, frame.delivery_tag, frame.multiple) for frame in frames]


def delivered(*tags: int) -> Outstanding:
    outstanding = Outstanding()
    for tag in tags:
        outstanding.delivered(tag)
    return outstanding


def test_acks_of_the_oldest_deliveries_are_one_multiple_ack() -> None:
    outstanding = delivered(1, 2, 3, 4)
    assert described(outstanding.frames([(2, True, False), (1, True, False), (3, True, False)])) == [
        ("Ack", 3, True)
    ]
    assert len(outstanding) == 1


def test_a_delivery_still_running_keeps_later_acks_single() -> None:
    outstanding = delivered(1, 2, 3)
    assert described(outstanding.frames([(2, True, False), (3, True, False)])) == [
        ("Ack", 2, False),
        ("Ack", 3, False),
    ]
    # Once the first ends, one multiple ack at it covers it; the others were acked already.
    assert described(outstanding.frames([(1, True, False)])) == [("Ack", 1, True)]
    assert len(outstanding) == 0


def test_a_nack_goes_first_and_alone_and_a_later_multiple_ack_may_pass_it() -> None:
    outstanding = delivered(1, 2, 3)
    assert described(outstanding.frames([(1, False, True), (3, True, False)])) == [
        ("Nack", 1, False),
        ("Ack", 3, False),
    ]
    assert described(outstanding.frames([(2, True, False)])) == [("Ack", 2, True)]
    assert len(outstanding) == 0


@given(st.permutations(list(range(1, 13))), st.lists(st.integers(1, 4), min_size=1, max_size=12))
def test_every_delivery_is_settled_once_and_never_while_unsettled(order: list[int], sizes: list[int]) -> None:
    """Settle twelve deliveries in any order, in batches of any size: each is covered exactly once
    (by an ack of its own or the first multiple ack at or above it), and never before its turn."""
    outstanding = delivered(*range(1, 13))
    covered: dict[int, int] = {}
    settled: set[int] = set()
    left = list(order)
    batch = 0
    while left:
        size = sizes[batch % len(sizes)]
        now, left = left[:size], left[size:]
        settled.update(now)
        for frame in outstanding.frames([(tag, tag % 5 != 0, False) for tag in now]):
            is_nack = isinstance(frame, Basic.Nack)
            if frame.multiple:
                targets = [tag for tag in range(1, frame.delivery_tag + 1) if tag not in covered]
            else:
                targets = [frame.delivery_tag]
            for tag in targets:
                assert tag in settled, f"delivery {tag} covered before it was settled"
                assert tag not in covered, f"delivery {tag} settled twice"
                covered[tag] = batch
                assert is_nack == (tag % 5 == 0), f"delivery {tag} acked or nacked against its wish"
        batch += 1
    assert sorted(covered) == list(range(1, 13))
    assert len(outstanding) == 0
