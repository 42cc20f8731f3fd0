"""Which events share an ``event.batch``, and its body: every event in exactly one message, in
order, one signer and one pool per message, and never a message over the bounds."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from common.bounds import MAX_MESSAGE_BYTES
from common.event_batches import batch_body, batch_size, pack
from common.messages import MAX_BATCH_EVENTS, MONITORED_ADAPTER, EventBatch, WorkerHeartbeat

NOW = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)

Item = tuple[int, tuple[str, str] | None, bytes]  # (order, (signer, pool) or alone, body)
items = st.lists(
    st.tuples(
        st.sampled_from([("event", "default"), ("event", "gpu"), ("other", "default"), None]),
        st.integers(1, 300),
    ),
    max_size=200,
).map(lambda drawn: [(i, key, b"x" * size) for i, (key, size) in enumerate(drawn)])


def _key(item: Item) -> tuple[str, str] | None:
    return item[1]


def _body(item: Item) -> bytes:
    return item[2]


@given(items, st.integers(1, 20), st.integers(0, 2000))
def test_every_event_goes_in_exactly_one_message_in_order_and_within_bounds(
    drawn: list[Item], most: int, limit: int
) -> None:
    groups = pack(drawn, _key, _body, most=most, limit=limit)
    assert sorted((i for group in groups for i in group), key=lambda i: i[0]) == drawn
    assert [group[0][0] for group in groups] == sorted(group[0][0] for group in groups)
    for group in groups:
        assert [i[0] for i in group] == sorted(i[0] for i in group)
        assert len({i[1] for i in group}) == 1
        assert len(group) <= most
        if len(group) > 1:
            key = group[0][1]
            assert key is not None, "an event of no pool goes alone"
            assert batch_size(key[1], [i[2] for i in group]) <= limit


def test_events_of_one_signer_and_pool_fill_as_few_messages_as_the_bounds_allow() -> None:
    drawn: list[Item] = [(i, ("event", "default"), b"x" * 100) for i in range(1200)]
    assert [len(g) for g in pack(drawn, _key, _body)] == [MAX_BATCH_EVENTS] * 2 + [200]
    big: list[Item] = [(i, ("event", "default"), b"x" * (MAX_MESSAGE_BYTES // 3)) for i in range(5)]
    assert [len(g) for g in pack(big, _key, _body)] == [2, 2, 1]


def test_a_batch_body_is_the_batch_of_its_events_byte_for_byte() -> None:
    beats = [WorkerHeartbeat(worker=f"wé{i}", pool="gpu", at=NOW, concurrency=4, running=i) for i in range(3)]
    bodies = [b.to_bytes() for b in beats]
    body = batch_body("gpu", bodies)
    assert len(body) == batch_size("gpu", bodies)
    batch = EventBatch(pool="gpu", events=beats)  # type: ignore[arg-type]
    assert MONITORED_ADAPTER.validate_json(body, strict=True) == batch
    assert body == batch.to_bytes()
