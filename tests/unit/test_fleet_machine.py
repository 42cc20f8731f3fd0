"""The fleet's decisions (monitor/fleet.py): each component's rules, and properties of any
sequence of looks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.messages import JOB_NAME_PATTERN
from monitor.fleet import (
    NAME_WIDTH,
    ComponentRecord,
    DeadLettersSeen,
    Decision,
    FleetPolicy,
    Kind,
    PoolSeen,
    SchedulerSeen,
    WorkerSeen,
    component_key,
    decide,
)
from monitor.health import State

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = FleetPolicy(
    heartbeat_timeout=timedelta(seconds=15),
    dead_letters_quiet=timedelta(minutes=5),
    forget_after=timedelta(hours=1),
)


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def moves(decision: Decision) -> list[tuple[State, State]]:
    return [(flip.from_state, flip.to_state) for flip in decision.flips]


# Names


@pytest.mark.parametrize(
    ("kind", "name", "key"),
    [
        (Kind.SCHEDULER, "", "@scheduler"),
        (Kind.DEAD_LETTERS, "", "@dead-letters"),
        (Kind.POOL, "default", "@pool:default"),
        (Kind.WORKER, "worker@host:12", "@worker:worker@host:12"),
    ],
)
def test_components_have_reserved_names(kind: Kind, name: str, key: str) -> None:
    assert component_key(kind, name) == key


@given(st.sampled_from(list(Kind)), st.text(min_size=1, max_size=200))
def test_no_component_name_is_a_job_name_and_each_fits_the_flips_column(kind: Kind, name: str) -> None:
    import re

    key = component_key(kind, name)
    assert len(key) <= NAME_WIDTH
    assert re.match(JOB_NAME_PATTERN, key) is None


def test_long_names_stay_apart() -> None:
    a, b = "w" * 100 + "a", "w" * 100 + "b"
    assert component_key(Kind.WORKER, a) != component_key(Kind.WORKER, b)


# The scheduler


def test_no_scheduler_ever_is_down_once_the_timeout_passed_since_the_watch_began() -> None:
    first = decide(Kind.SCHEDULER, None, SchedulerSeen(None, needed=True), POLICY, s(0))
    assert first.record is not None and first.record.state is State.NEW and not first.flips
    quiet = decide(Kind.SCHEDULER, first.record, SchedulerSeen(None, True), POLICY, s(15))
    assert not quiet.flips
    down = decide(Kind.SCHEDULER, quiet.record, SchedulerSeen(None, True), POLICY, s(16))
    assert moves(down) == [(State.NEW, State.DOWN)] and down.flips[0].alarm
    assert "no scheduler heartbeat yet" in down.flips[0].reason


def test_a_scheduler_heartbeat_makes_it_up_and_its_silence_down_and_the_next_heartbeat_recovers() -> None:
    up = decide(Kind.SCHEDULER, None, SchedulerSeen(s(0), True), POLICY, s(1))
    assert moves(up) == [(State.NEW, State.UP)]
    still = decide(Kind.SCHEDULER, up.record, SchedulerSeen(s(0), True), POLICY, s(15))
    assert not still.flips
    down = decide(Kind.SCHEDULER, still.record, SchedulerSeen(s(0), True), POLICY, s(16))
    assert moves(down) == [(State.UP, State.DOWN)]
    back = decide(Kind.SCHEDULER, down.record, SchedulerSeen(s(20), True), POLICY, s(21))
    assert moves(back) == [(State.DOWN, State.UP)] and back.flips[0].recovered_from is State.DOWN


def test_a_stored_heartbeat_newer_than_this_monitors_counts() -> None:
    # Another monitor saw a newer heartbeat and stored it: this one's older memory changes nothing.
    record = ComponentRecord(State.UP, since=s(0), seen_at=s(10))
    same = decide(Kind.SCHEDULER, record, SchedulerSeen(s(1), True), POLICY, s(20))
    assert not same.flips and same.record is not None and same.record.seen_at == s(10)


def test_no_scheduler_is_needed_without_an_enabled_job() -> None:
    record = ComponentRecord(State.NEW, since=s(0))
    none = decide(Kind.SCHEDULER, record, SchedulerSeen(None, needed=False), POLICY, s(100))
    assert not none.flips
    down = ComponentRecord(State.DOWN, since=s(0))
    back = decide(Kind.SCHEDULER, down, SchedulerSeen(None, needed=False), POLICY, s(100))
    assert moves(back) == [(State.DOWN, State.UP)]


# A pool


def test_a_pool_with_waiting_triggers_and_no_consumer_is_down_after_the_timeout() -> None:
    first = decide(Kind.POOL, None, PoolSeen(waiting=3, consumers=0), POLICY, s(0))
    assert first.record is not None and first.record.state is State.NEW and not first.flips
    waiting = decide(Kind.POOL, first.record, PoolSeen(3, 0), POLICY, s(15))
    assert not waiting.flips
    down = decide(Kind.POOL, waiting.record, PoolSeen(4, 0), POLICY, s(16))
    assert moves(down) == [(State.NEW, State.DOWN)]
    assert "4 trigger(s) waiting and no worker" in down.flips[0].reason
    back = decide(Kind.POOL, down.record, PoolSeen(4, 1), POLICY, s(17))
    assert moves(back) == [(State.DOWN, State.UP)] and back.flips[0].recovered_from is State.DOWN


@pytest.mark.parametrize("seen", [PoolSeen(0, 0), PoolSeen(5, 2), PoolSeen(0, 1)])
def test_a_pool_with_a_consumer_or_nothing_waiting_is_up(seen: PoolSeen) -> None:
    up = decide(Kind.POOL, None, seen, POLICY, s(0))
    assert moves(up) == [(State.NEW, State.UP)]
    later = decide(Kind.POOL, up.record, seen, POLICY, s(1000))
    assert not later.flips and later.record is not None and later.record.state is State.UP


def test_a_pool_is_down_only_after_waiting_without_consumer_for_the_whole_timeout() -> None:
    up = decide(Kind.POOL, None, PoolSeen(0, 1), POLICY, s(0)).record
    stalled = decide(Kind.POOL, up, PoolSeen(2, 0), POLICY, s(10)).record
    fine = decide(Kind.POOL, stalled, PoolSeen(0, 0), POLICY, s(20)).record
    again = decide(Kind.POOL, fine, PoolSeen(2, 0), POLICY, s(30))
    assert not again.flips  # fine at 20: the 15 s start again there
    assert moves(decide(Kind.POOL, again.record, PoolSeen(2, 0), POLICY, s(36))) == [(State.UP, State.DOWN)]


# A worker


def test_a_worker_is_up_from_its_first_heartbeat() -> None:
    up = decide(Kind.WORKER, None, WorkerSeen(s(0), running=1), POLICY, s(1))
    assert moves(up) == [(State.NEW, State.UP)]
    assert up.record is not None and up.record.count == 1


def test_a_heartbeat_too_old_to_matter_never_lists_a_worker() -> None:
    assert decide(Kind.WORKER, None, WorkerSeen(s(0), 0), POLICY, s(100)) == Decision(None)


def test_a_silent_worker_holding_runs_goes_down_and_its_runs_are_lost() -> None:
    up = decide(Kind.WORKER, None, WorkerSeen(s(0), 1), POLICY, s(0)).record
    assert not decide(Kind.WORKER, up, WorkerSeen(s(0), 1, held=1), POLICY, s(15)).flips
    down = decide(Kind.WORKER, up, WorkerSeen(s(0), 1, held=1), POLICY, s(16))
    assert moves(down) == [(State.UP, State.DOWN)] and down.lose_runs and down.flips[0].alarm
    assert "1 run(s) of it marked lost" in down.flips[0].reason
    # Down it stays, runs are not lost again, until its next heartbeat...
    still = decide(Kind.WORKER, down.record, WorkerSeen(s(0), 1), POLICY, s(100))
    assert not still.flips and not still.lose_runs and still.record == down.record
    back = decide(Kind.WORKER, still.record, WorkerSeen(s(101), 0), POLICY, s(101))
    assert moves(back) == [(State.DOWN, State.UP)] and back.flips[0].recovered_from is State.DOWN


def test_a_silent_worker_holding_no_run_left_cleanly_and_is_forgotten_without_a_flip() -> None:
    up = decide(Kind.WORKER, None, WorkerSeen(s(0), 1), POLICY, s(0)).record
    # Its last heartbeat counted a run it then finished (a SIGTERM drain): nothing is lost.
    assert decide(Kind.WORKER, up, WorkerSeen(s(0), 1, held=0), POLICY, s(16)) == Decision(None)


def test_a_down_worker_is_forgotten_after_forget_after() -> None:
    down = ComponentRecord(State.DOWN, since=s(0), seen_at=s(-20), count=1)
    assert decide(Kind.WORKER, down, WorkerSeen(s(-20), 1), POLICY, s(3600)).record == down
    assert decide(Kind.WORKER, down, WorkerSeen(s(-20), 1), POLICY, s(3601)) == Decision(None)


# The dead-letter queue


def test_the_first_look_at_the_dead_letters_is_the_baseline() -> None:
    first = decide(Kind.DEAD_LETTERS, None, DeadLettersSeen(7), POLICY, s(0))
    assert moves(first) == [(State.NEW, State.UP)] and first.record is not None and first.record.count == 7


def test_dead_letters_growing_alarm_until_they_stop_growing_for_the_quiet_period() -> None:
    base = decide(Kind.DEAD_LETTERS, None, DeadLettersSeen(0), POLICY, s(0)).record
    grew = decide(Kind.DEAD_LETTERS, base, DeadLettersSeen(2), POLICY, s(1))
    assert moves(grew) == [(State.UP, State.DOWN)] and grew.flips[0].alarm
    assert "grew from 0 to 2" in grew.flips[0].reason
    more = decide(Kind.DEAD_LETTERS, grew.record, DeadLettersSeen(3), POLICY, s(200))
    assert not more.flips
    quiet = decide(Kind.DEAD_LETTERS, more.record, DeadLettersSeen(3), POLICY, s(499))
    assert not quiet.flips
    back = decide(Kind.DEAD_LETTERS, quiet.record, DeadLettersSeen(3), POLICY, s(500))
    assert moves(back) == [(State.DOWN, State.UP)] and back.flips[0].recovered_from is State.DOWN


def test_dead_letters_emptied_end_the_alarm_at_once() -> None:
    down = ComponentRecord(State.DOWN, since=s(0), seen_at=s(0), count=4)
    assert moves(decide(Kind.DEAD_LETTERS, down, DeadLettersSeen(0), POLICY, s(1))) == [
        (State.DOWN, State.UP)
    ]


def test_an_observation_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        decide(Kind.POOL, None, DeadLettersSeen(1), POLICY, s(0))


# Properties of any sequence of looks

LOOKS = {
    Kind.SCHEDULER: st.builds(
        SchedulerSeen, st.none() | st.integers(0, 600).map(lambda n: s(n)), st.booleans()
    ),
    Kind.POOL: st.builds(PoolSeen, st.integers(0, 5), st.integers(0, 2)),
    Kind.WORKER: st.builds(
        WorkerSeen, st.integers(0, 600).map(lambda n: s(n)), st.integers(0, 2), st.integers(0, 2)
    ),
    Kind.DEAD_LETTERS: st.builds(DeadLettersSeen, st.integers(0, 5)),
}


@st.composite
def sequences(draw: st.DrawFn) -> tuple[Kind, list[tuple[int, object]]]:
    kind = draw(st.sampled_from(list(Kind)))
    steps = draw(st.lists(st.tuples(st.integers(0, 60), LOOKS[kind]), max_size=25))
    return kind, steps


@given(sequences())
def test_any_sequence_of_looks_flips_consistently(case: tuple[Kind, list[tuple[int, object]]]) -> None:
    kind, steps = case
    record: ComponentRecord | None = None
    now = T0
    for gap, seen in steps:
        now += timedelta(seconds=gap)
        decision = decide(kind, record, seen, POLICY, now)  # type: ignore[arg-type]
        for flip in decision.flips:
            # Each flip leaves the state it was in, for another, at the look's instant.
            assert record is None or flip.from_state is record.state
            assert flip.from_state is not flip.to_state and flip.at == now
            assert flip.to_state in (State.UP, State.DOWN)
            assert (flip.recovered_from is State.DOWN) == (
                flip.from_state is State.DOWN and flip.to_state is State.UP
            )
        assert len(decision.flips) <= 1
        if decision.lose_runs:
            # Only a worker's runs, only runs it holds: as it goes down, or once it is down or
            # not listed (runs recorded after it was judged gone).
            assert kind is Kind.WORKER and isinstance(seen, WorkerSeen) and seen.held > 0
            going_down = bool(decision.flips) and decision.flips[0].to_state is State.DOWN
            assert going_down or record is None or record.state is State.DOWN
        if decision.record is not None and decision.flips:
            assert decision.record.state is decision.flips[-1].to_state and decision.record.since == now
        record = decision.record


def test_the_thresholds_come_from_the_settings() -> None:
    from common.settings import Settings
    from monitor.fleet_watch import fleet_policy

    policy = fleet_policy(Settings(heartbeat_seconds=5, fleet_missed_heartbeats=3))
    assert policy == FleetPolicy(timedelta(seconds=15), timedelta(minutes=5), timedelta(hours=1))
    with pytest.raises(ValueError):
        Settings(fleet_missed_heartbeats=1)  # a single late heartbeat would declare a worker gone


def test_a_run_recorded_after_its_worker_went_down_or_was_forgotten_is_lost_without_a_flip() -> None:
    up = decide(Kind.WORKER, None, WorkerSeen(s(0), 1), POLICY, s(0)).record
    down = decide(Kind.WORKER, up, WorkerSeen(s(0), 1, held=1), POLICY, s(16)).record
    late = decide(Kind.WORKER, down, WorkerSeen(s(0), 1, held=1, held_since=s(10)), POLICY, s(30))
    assert late == Decision(down, lose_runs=True)
    # A run that started a moment ago: the worker may be back from a cut, its first heartbeat on
    # its way. It is not lost yet.
    fresh = decide(Kind.WORKER, down, WorkerSeen(s(0), 1, held=1, held_since=s(29)), POLICY, s(30))
    assert fresh == Decision(down)

    # Never listed (forgotten, or never heard), silent, holding runs: they are lost too.
    def unlisted(held_since: datetime) -> Decision:
        return decide(Kind.WORKER, None, WorkerSeen(s(0), 0, held=2, held_since=held_since), POLICY, s(100))

    assert unlisted(s(1)) == Decision(None, lose_runs=True)
    assert unlisted(s(99)) == Decision(None)
