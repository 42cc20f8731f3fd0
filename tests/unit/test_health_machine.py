"""The health machine: every (state, input) pair, the reasons, and properties of any sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.jobs import JobSpec
from common.messages import HeartbeatKind, JobHeartbeat, RunFinished, RunStarted, RunStatus
from monitor.health import (
    ALARM_STATES,
    DEFAULT_POLICY,
    Flip,
    HealthInput,
    HealthPolicy,
    HealthRecord,
    HeartbeatInput,
    Paused,
    Resumed,
    RunFinishedInput,
    RunStartedInput,
    ScheduleChanged,
    State,
    Tick,
    advance,
    health_input,
    initial_record,
    next_deadline,
)

# Hourly at :00, 5 minutes of grace, a 10 minute timeout.
SPEC = JobSpec(name="j", schedule="0 * * * *", grace_seconds=300, timeout_seconds=600)
CREATED = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
DUE = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
EARLY = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def at(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 3, 2, hour, minute, second, tzinfo=UTC)


def run(
    record: HealthRecord,
    steps: Sequence[tuple[HealthInput, datetime]],
    spec: JobSpec = SPEC,
    policy: HealthPolicy = DEFAULT_POLICY,
) -> tuple[HealthRecord, list[Flip]]:
    """Apply ``steps`` in order, checking the flips chain up, and return the record and all flips."""
    flips: list[Flip] = []
    for event, now in steps:
        before = record
        record, new = advance(record, event, spec, now, policy)
        assert_consistent(before, record, new, spec, now, policy)
        flips += new
    return record, flips


def assert_consistent(
    before: HealthRecord,
    after: HealthRecord,
    flips: list[Flip],
    spec: JobSpec,
    now: datetime,
    policy: HealthPolicy,
) -> None:
    """What every call of ``advance`` promises, whatever the input."""
    state, since = before.state, before.since
    for flip in flips:
        assert flip.from_state is state and flip.to_state is not state
        assert since <= flip.at <= max(now, before.since)
        assert flip.reason and "\n" not in flip.reason
        assert flip.recovered_from is None or flip.to_state is State.UP
        state, since = flip.to_state, flip.at
    assert (after.state, after.since) == (state, since)
    assert after.deadline_at == next_deadline(after, spec)
    assert after.deadline_at is None or after.deadline_at > after.since
    # What the record's fields may say together.
    in_progress = after.run_id is not None
    assert in_progress == (after.run_started_at is not None)
    if after.state in (State.RUNNING, State.STUCK):
        assert in_progress
    if in_progress:
        assert after.state in (State.RUNNING, State.STUCK, State.FAILING, State.PAUSED)
    if after.state is State.FAILING:
        assert after.consecutive_failures >= policy.failures_before_failing
    if after.state in (State.UP, State.RUNNING):
        assert after.consecutive_failures < policy.failures_before_failing
    if after.state in ALARM_STATES:
        assert after.open_alarm is after.state
    if after.state in (State.NEW, State.UP, State.PAUSED, State.LATE):
        assert after.open_alarm is None
    assert (after.due_at is None) == (after.state is State.PAUSED)


def path(flips: list[Flip]) -> str:
    return ">".join(flip.to_state.value for flip in flips)


# Records in every state, reached through the machine itself. Each comes with the last finish
# it saw (to be delivered again) and the instant its table inputs arrive at (nothing is due then).
R0_START, R0_END = at(9, 40), at(9, 45)
R0_OK = RunFinishedInput("r0", RunStatus.SUCCEEDED, R0_END, R0_START)
R0_FAILED = RunFinishedInput("r0", RunStatus.FAILED, R0_END, R0_START, exit_code=2)


def _new() -> HealthRecord:
    return initial_record(SPEC, CREATED)


def _after_r0(finish: RunFinishedInput) -> HealthRecord:
    record, _ = run(_new(), [(RunStartedInput("r0", R0_START), R0_START), (finish, R0_END)])
    return record


def _then(record: HealthRecord, *steps: tuple[HealthInput, datetime]) -> HealthRecord:
    return run(record, steps)[0]


FIXTURES: dict[str, Callable[[], tuple[HealthRecord, RunFinishedInput | None]]] = {
    "new": lambda: (_new(), None),
    "up": lambda: (_after_r0(R0_OK), R0_OK),
    "late": lambda: (_then(_after_r0(R0_OK), (Tick(), DUE)), R0_OK),
    "down": lambda: (_then(_after_r0(R0_OK), (Tick(), at(10, 5))), R0_OK),
    "failing": lambda: (_after_r0(R0_FAILED), R0_FAILED),
    "failing+run": lambda: (
        _then(_after_r0(R0_FAILED), (RunStartedInput("r1", at(9, 50)), at(9, 50))),
        R0_FAILED,
    ),
    "running": lambda: (_then(_after_r0(R0_OK), (RunStartedInput("r1", at(10, 0, 1)), at(10, 0, 1))), R0_OK),
    "stuck": lambda: (
        _then(
            _after_r0(R0_OK),
            (RunStartedInput("r1", at(10, 0, 1)), at(10, 0, 1)),
            (Tick(), at(10, 15, 1)),
        ),
        R0_OK,
    ),
    "paused": lambda: (_then(_after_r0(R0_OK), (Paused(), at(9, 50))), R0_OK),
    "paused+run": lambda: (
        _then(_after_r0(R0_OK), (RunStartedInput("r1", at(9, 48)), at(9, 48)), (Paused(), at(9, 50))),
        R0_OK,
    ),
}


def test_fixtures_are_in_the_state_they_are_named_after() -> None:
    for name, build in FIXTURES.items():
        record, _ = build()
        assert record.state.value == name.split("+")[0], name


def quiet_now(record: HealthRecord) -> datetime:
    """An instant after everything the record knows, before its next deadline."""
    latest = max(record.since, record.last_run_at or record.since)
    return latest + timedelta(seconds=1)


def _finish(
    outcome: RunStatus, exit_code: int | None = None
) -> Callable[[HealthRecord, datetime], HealthInput]:
    """The run in progress ends with ``outcome``; without one, a run whose start was missed."""

    def build(record: HealthRecord, now: datetime) -> HealthInput:
        if record.run_id is not None and record.run_started_at is not None:
            return RunFinishedInput(record.run_id, outcome, now, record.run_started_at, exit_code)
        return RunFinishedInput("r9", outcome, now, now, exit_code)

    return build


INPUTS: dict[str, Callable[[HealthRecord, datetime], HealthInput]] = {
    "start": lambda r, now: RunStartedInput("r9", now),
    "older start": lambda r, now: RunStartedInput("r-old", EARLY),
    "succeeds": _finish(RunStatus.SUCCEEDED),
    "fails": _finish(RunStatus.FAILED, exit_code=2),
    "times out": _finish(RunStatus.TIMED_OUT),
    "expires": _finish(RunStatus.EXPIRED),
    "is lost": _finish(RunStatus.LOST),
    "is skipped": _finish(RunStatus.SKIPPED),
    "older run fails": lambda r, now: RunFinishedInput("r-old", RunStatus.FAILED, now, EARLY),
    "hb start": lambda r, now: HeartbeatInput("h9", HeartbeatKind.START, now),
    "hb success": lambda r, now: HeartbeatInput("h9", HeartbeatKind.SUCCESS, now),
    "hb fail": lambda r, now: HeartbeatInput("h9", HeartbeatKind.FAIL, now, exit_code=1),
    "hb success, exit 3": lambda r, now: HeartbeatInput("h9", HeartbeatKind.SUCCESS, now, exit_code=3),
    "tick": lambda r, now: Tick(),
    "paused": lambda r, now: Paused(),
    "resumed": lambda r, now: Resumed(),
    "schedule changed": lambda r, now: ScheduleChanged(),
}
COLUMNS = list(INPUTS)

# The flips each input gives in each state, one row per state and one column per input (in the
# order of INPUTS: strt = start, oldf = an older run fails, hb3 = success heartbeat with exit code 3...).
# N new, U up, R running, L late, D down, F failing, S stuck, P paused; '-': no flip.
_ROWS = """
            strt old  ok   fail t/o  exp  lost skip oldf hbs  hbok hbf  hb3  tick paus resu schd
new         R    R>S  U    F    F    F    F    -    F    R    U    F    F    -    P    -    -
up          R    -    -    F    F    F    F    -    -    R    -    F    F    -    P    -    -
late        R    -    U    F    F    F    F    -    -    R    U    F    F    -    P    -    -
down        R    -    U    F    F    F    F    -    -    R    U    F    F    -    P    -    -
failing     -    -    U    -    -    -    -    -    -    -    U    -    -    -    P    -    -
failing+run -    -    U    -    -    -    -    -    -    -    U    -    -    -    P    -    -
running     -    -    U    F    F    F    F    U    -    -    U    F    F    -    P    -    -
stuck       F    -    U    F    F    F    F    U    -    F    U    F    F    -    P    -    -
paused      -    -    -    -    -    -    -    -    -    -    -    -    -    -    -    U    -
paused+run  -    -    -    -    -    -    -    -    -    -    -    -    -    -    -    R    -
"""
_LETTERS = {state.value[0].upper(): state.value for state in State}
EXPECTED = {
    row.split()[0]: dict(
        zip(
            COLUMNS,
            (">".join(_LETTERS.get(c, c) for c in cell.split(">")) for cell in row.split()[1:]),
            strict=True,
        )
    )
    for row in _ROWS.strip().splitlines()[1:]
}


def test_the_table_covers_every_state_and_input() -> None:
    assert set(EXPECTED) == set(FIXTURES)
    assert {f.split("+")[0] for f in FIXTURES} == {s.value for s in State}


@pytest.mark.parametrize("kind", COLUMNS)
@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_every_state_and_input(fixture: str, kind: str) -> None:
    record, _ = FIXTURES[fixture]()
    now = quiet_now(record)
    event = INPUTS[kind](record, now)
    after, flips = run(record, [(event, now)])
    assert (path(flips) or "-") == EXPECTED[fixture][kind]
    if not flips:
        assert after.state is record.state and after.since == record.since


@pytest.mark.parametrize("fixture", [f for f, (_, last) in ((f, b()) for f, b in FIXTURES.items()) if last])
def test_a_finish_delivered_again_changes_nothing(fixture: str) -> None:
    record, last = FIXTURES[fixture]()
    assert last is not None
    after, flips = run(record, [(last, quiet_now(record))])
    assert flips == []
    assert after.consecutive_failures == record.consecutive_failures


# Ticks: at the next deadline, and a day later (the monitor was down): one flip per real
# transition, each at its own instant.
DEADLINE_FLIPS = {
    "new": ("late", "late>down"),
    "up": ("late", "late>down"),
    "late": ("down", "down"),
    "down": ("-", "-"),
    "failing": ("down", "down"),
    "failing+run": ("stuck", "stuck"),
    "running": ("stuck", "stuck"),
    "stuck": ("-", "-"),
    "paused": ("-", "-"),
    "paused+run": ("-", "-"),
}


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_ticks_at_the_deadline_and_long_after(fixture: str) -> None:
    record, _ = FIXTURES[fixture]()
    deadline = record.deadline_at
    at_deadline, much_later = DEADLINE_FLIPS[fixture]
    if deadline is not None:
        before, flips = run(record, [(Tick(), deadline - timedelta(microseconds=1))])
        assert flips == [] and before == record
    now = deadline or record.since + timedelta(days=30)
    _, flips = run(record, [(Tick(), now)])
    assert (path(flips) or "-") == at_deadline
    assert all(flip.at == now for flip in flips[:1])
    _, flips = run(record, [(Tick(), record.since + timedelta(days=1))])
    assert (path(flips) or "-") == much_later


def test_next_deadline_of_each_state() -> None:
    grace, timeout = timedelta(minutes=5), timedelta(minutes=10)
    expected = {
        "new": DUE,
        "up": DUE,
        "late": DUE + grace,
        "down": None,
        "failing": DUE + grace,
        "failing+run": at(9, 50) + timeout + grace,
        "running": at(10, 0, 1) + timeout + grace,
        "stuck": None,
        "paused": None,
        "paused+run": None,
    }
    for name, build in FIXTURES.items():
        record, _ = build()
        assert next_deadline(record, SPEC) == expected[name] == record.deadline_at, name


# Reasons: one line that says why.


def test_a_missed_run_goes_late_then_down_with_its_reasons_and_true_instants() -> None:
    record, _ = FIXTURES["up"]()
    down, flips = run(record, [(Tick(), at(23, 0))])
    assert [(f.at, f.from_state, f.to_state) for f in flips] == [
        (DUE, State.UP, State.LATE),
        (DUE + timedelta(minutes=5), State.LATE, State.DOWN),
    ]
    assert flips[0].reason == "due at 2026-03-02T10:00:00Z, no run yet"
    assert flips[1].reason == "no run since it was due at 2026-03-02T10:00:00Z (5m grace)"
    assert flips[1].alarm and not flips[0].alarm
    # The same tick again, or a later one, says nothing more: the job owes the 10:00 run.
    assert advance(down, Tick(), SPEC, at(23, 0)) == (down, [])
    again, flips = run(down, [(Tick(), at(23, 30)), (Tick(), at(23, 59))])
    assert flips == [] and again.due_at == DUE


def test_a_run_after_down_clears_it_and_its_success_is_a_recovery() -> None:
    record, _ = FIXTURES["down"]()
    _, flips = run(
        record,
        [
            (RunStartedInput("r1", at(10, 7, 30)), at(10, 7, 31)),
            (RunFinishedInput("r1", RunStatus.SUCCEEDED, at(10, 10, 42), at(10, 7, 30)), at(10, 10, 43)),
        ],
    )
    assert [f.reason for f in flips] == [
        "run r1 started, 7m30s after it was due at 2026-03-02T10:00:00Z",
        "run r1 succeeded after 3m12s; recovered from down",
    ]
    assert [f.recovered_from for f in flips] == [None, State.DOWN]
    assert flips[0].at == at(10, 7, 30)  # an event counts at its own instant


def test_a_stuck_run_says_how_long_it_has_run() -> None:
    record, _ = FIXTURES["running"]()
    stuck, flips = run(record, [(Tick(), at(12, 0))])
    assert flips[0].at == at(10, 15, 1)
    assert flips[0].reason == "run r1 running 15m, past its 10m timeout (and 5m grace)"
    _, flips = run(stuck, [(RunFinishedInput("r1", RunStatus.SUCCEEDED, at(12, 0), at(10, 0, 1)), at(12, 0))])
    assert flips[0].reason == "run r1 succeeded after 1h59m; recovered from stuck"


def test_a_new_start_after_a_stuck_run_counts_the_stuck_one_as_failed() -> None:
    record, _ = FIXTURES["stuck"]()
    after, flips = run(record, [(RunStartedInput("r2", at(11, 0)), at(11, 0))])
    assert path(flips) == "failing" and after.run_id == "r2" and after.consecutive_failures == 1
    assert flips[0].reason == "run r2 started; run r1 never finished; last run failed"
    lenient = HealthPolicy(failures_before_failing=2)
    _, flips = run(record, [(RunStartedInput("r2", at(11, 0)), at(11, 0))], policy=lenient)
    assert path(flips) == "running"


@pytest.mark.parametrize(
    ("outcome", "phrase"),
    [
        (RunStatus.FAILED, "run r1 failed with exit code 2 after 1m"),
        (RunStatus.TIMED_OUT, "run r1 timed out after 1m"),
        (RunStatus.EXPIRED, "run r1 expired before a worker ran it"),
        (RunStatus.LOST, "run r1 was lost (its worker stopped sending heartbeats) after 1m"),
    ],
)
def test_each_failed_outcome_has_its_reason(outcome: RunStatus, phrase: str) -> None:
    record, _ = FIXTURES["running"]()
    finish = RunFinishedInput("r1", outcome, at(10, 1, 1), at(10, 0, 1), exit_code=2)
    _, flips = run(record, [(finish, at(10, 1, 1))])
    assert flips[0].reason == f"last run failed: {phrase}"
    assert flips[0].alarm


def test_n_failures_in_a_row_make_a_job_failing_and_only_a_success_recovers_it() -> None:
    policy = HealthPolicy(failures_before_failing=3)
    record = initial_record(SPEC, CREATED)
    steps: list[tuple[HealthInput, datetime]] = []
    for minute in (31, 32, 33, 34):
        steps.append((HeartbeatInput(f"f{minute}", HeartbeatKind.FAIL, at(9, minute)), at(9, minute)))
    failing, flips = run(record, steps, policy=policy)
    assert path(flips) == "up>failing"
    assert flips[0].reason == "heartbeat f31 reported failure (1 of 3 failures before failing)"
    assert flips[1].reason == "last 3 runs failed: heartbeat f33 reported failure"
    assert failing.consecutive_failures == 4
    # A run that starts does not end failing; a success does.
    still, flips = run(
        failing, [(HeartbeatInput("s", HeartbeatKind.START, at(9, 40)), at(9, 40))], policy=policy
    )
    assert flips == [] and still.state is State.FAILING and still.run_id == "s"
    up, flips = run(
        still, [(HeartbeatInput("ok", HeartbeatKind.SUCCESS, at(9, 42)), at(9, 42))], policy=policy
    )
    assert path(flips) == "up" and flips[0].recovered_from is State.FAILING
    assert flips[0].reason == "heartbeat ok reported success after 2m; recovered from failing"
    assert up.consecutive_failures == 0


def test_a_start_and_success_heartbeat_give_the_run_duration() -> None:
    record = initial_record(SPEC, CREATED)
    _, flips = run(
        record,
        [
            (HeartbeatInput("a", HeartbeatKind.START, at(10, 0, 5)), at(10, 0, 5)),
            (HeartbeatInput("b", HeartbeatKind.SUCCESS, at(10, 3, 17)), at(10, 3, 17)),
        ],
    )
    assert path(flips) == "late>running>up"
    assert flips[1].reason == "run a (start heartbeat) started, 5s after it was due at 2026-03-02T10:00:00Z"
    assert flips[2].reason == "heartbeat b reported success after 3m12s"


# Order: an input older than what the record knows never moves the state backwards.


def test_a_finish_before_its_start_leaves_the_job_up() -> None:
    record, _ = FIXTURES["up"]()
    finish = RunFinishedInput("r1", RunStatus.SUCCEEDED, at(10, 4), at(10, 0))
    up, flips = run(record, [(finish, at(10, 4)), (RunStartedInput("r1", at(10, 0)), at(10, 6))])
    assert path(flips) == "late>up" and up.state is State.UP and up.run_id is None


def test_a_success_heartbeat_before_its_start_leaves_the_job_up() -> None:
    record, _ = FIXTURES["up"]()
    up, flips = run(
        record,
        [
            (HeartbeatInput("b", HeartbeatKind.SUCCESS, at(9, 58)), at(9, 58)),
            (HeartbeatInput("a", HeartbeatKind.START, at(9, 57)), at(9, 58, 1)),
        ],
    )
    assert flips == [] and up.run_id is None


def test_overlapping_runs_follow_the_latest_start() -> None:
    record, _ = FIXTURES["up"]()
    after, flips = run(
        record,
        [
            (RunStartedInput("a", at(9, 50)), at(9, 50)),
            (RunStartedInput("b", at(9, 51)), at(9, 51)),
            (RunFinishedInput("a", RunStatus.FAILED, at(9, 52), at(9, 50)), at(9, 52)),
        ],
    )
    assert path(flips) == "running" and after.run_id == "b"
    after, flips = run(after, [(RunFinishedInput("b", RunStatus.SUCCEEDED, at(9, 53), at(9, 51)), at(9, 53))])
    assert path(flips) == "up" and after.consecutive_failures == 0


def test_a_newer_run_whose_start_was_missed_replaces_the_run_in_progress() -> None:
    record, _ = FIXTURES["running"]()
    finish = RunFinishedInput("r2", RunStatus.FAILED, at(10, 3), at(10, 2))
    after, flips = run(record, [(finish, at(10, 3))])
    assert path(flips) == "failing" and after.run_id is None
    late, flips = run(
        after, [(RunFinishedInput("r1", RunStatus.SUCCEEDED, at(10, 4), at(10, 0, 1)), at(10, 4))]
    )
    assert flips == [] and late.state is State.FAILING


def test_a_fail_heartbeat_delivered_twice_counts_once() -> None:
    policy = HealthPolicy(failures_before_failing=2)
    record, _ = FIXTURES["up"]()
    fail = HeartbeatInput("f", HeartbeatKind.FAIL, at(9, 50))
    after, _ = run(record, [(fail, at(9, 50)), (fail, at(9, 50, 30))], policy=policy)
    assert after.state is State.UP and after.consecutive_failures == 1


def test_an_event_delivered_late_counts_at_its_own_instant() -> None:
    """The monitor catches up on a backlog: deadlines before the event apply, later ones do not."""
    record, _ = FIXTURES["up"]()
    running, flips = run(record, [(RunStartedInput("r1", at(10, 0, 30)), at(11, 0))])
    assert [(f.at, f.to_state) for f in flips] == [(DUE, State.LATE), (at(10, 0, 30), State.RUNNING)]
    # The stuck deadline (10:15:30) passed before now: the next tick applies it, not the event.
    assert running.deadline_at == at(10, 15, 30)
    finish = RunFinishedInput("r1", RunStatus.SUCCEEDED, at(10, 2), at(10, 0, 30))
    up, flips = run(running, [(finish, at(11, 0))])
    assert path(flips) == "up" and up.due_at == at(11, 0)


def test_an_event_dated_in_the_future_counts_now() -> None:
    record, _ = FIXTURES["up"]()
    after, flips = run(record, [(RunStartedInput("r1", at(12, 0)), at(9, 50))])
    assert flips[0].at == at(9, 50) and after.run_started_at == at(12, 0)


def test_a_record_from_a_clock_that_went_back_never_dates_a_flip_before_its_since() -> None:
    record, _ = FIXTURES["late"]()
    _, flips = run(record, [(Paused(), at(9, 0))])
    assert flips[0].at == record.since


# Pause and resume.


def test_a_paused_job_ignores_deadlines_and_keeps_counting_runs() -> None:
    record, _ = FIXTURES["paused"]()
    assert record.deadline_at is None and record.due_at is None
    fail = RunFinishedInput("r1", RunStatus.FAILED, at(11, 0), at(10, 59))
    after, flips = run(record, [(Tick(), at(23, 0)), (fail, at(23, 0))])
    assert flips == [] and after.consecutive_failures == 1
    resumed, flips = run(after, [(Resumed(), at(23, 10))])
    assert path(flips) == "failing"
    assert flips[0].reason == "resumed: the job was enabled; last run failed"
    assert resumed.due_at == datetime(2026, 3, 3, 0, 0, tzinfo=UTC)  # from the instant it resumed


def test_resuming_a_job_that_never_ran_makes_it_new() -> None:
    record = initial_record(SPEC.model_copy(update={"enabled": False}), CREATED)
    assert record.state is State.PAUSED and record.deadline_at is None
    new, flips = run(record, [(Resumed(), at(12, 30))])
    assert path(flips) == "new" and new.due_at == at(13, 0)


def test_pausing_closes_the_alarm_so_resuming_is_no_recovery() -> None:
    record, _ = FIXTURES["down"]()
    assert record.open_alarm is State.DOWN
    up, flips = run(record, [(Paused(), at(10, 6)), (Resumed(), at(10, 7))])
    assert path(flips) == "paused>up" and all(f.recovered_from is None for f in flips)
    assert up.open_alarm is None


def test_pause_and_resume_are_idempotent() -> None:
    record, _ = FIXTURES["up"]()
    paused, _ = run(record, [(Paused(), at(9, 50))])
    assert advance(paused, Paused(), SPEC, at(9, 51)) == (paused, [])
    assert advance(record, Resumed(), SPEC, at(9, 51)) == (record, [])


# Schedule changes.


def test_a_due_time_ahead_follows_the_new_schedule() -> None:
    record, _ = FIXTURES["up"]()
    daily = SPEC.model_copy(update={"schedule": "0 3 * * *"})
    after, flips = run(record, [(ScheduleChanged(), at(9, 50))], spec=daily)
    assert flips == [] and after.due_at == after.deadline_at == datetime(2026, 3, 3, 3, 0, tzinfo=UTC)


def test_a_due_time_already_passed_is_still_owed() -> None:
    record, _ = FIXTURES["late"]()
    daily = SPEC.model_copy(update={"schedule": "0 3 * * *"})
    after, flips = run(record, [(ScheduleChanged(), at(10, 1)), (Tick(), at(10, 5))], spec=daily)
    assert path(flips) == "down" and after.due_at == DUE


def test_a_shorter_timeout_applies_at_once() -> None:
    record, _ = FIXTURES["running"]()
    short = SPEC.model_copy(update={"timeout_seconds": 1.0, "grace_seconds": 0.0})
    _, flips = run(record, [(ScheduleChanged(), at(10, 0, 30))], spec=short)
    assert path(flips) == "stuck" and flips[0].at == at(10, 0, 30)


def test_no_grace_goes_late_and_down_at_the_same_instant() -> None:
    strict = SPEC.model_copy(update={"grace_seconds": 0.0})
    record = initial_record(strict, CREATED)
    _, flips = run(record, [(Tick(), DUE)], spec=strict)
    assert [(f.at, f.to_state) for f in flips] == [(DUE, State.LATE), (DUE, State.DOWN)]


# The edges: wire events become inputs, and bad arguments are refused.


def test_wire_events_become_inputs() -> None:
    common = {"trigger_id": "j@x", "job": "j", "pool": "default", "worker": "w", "scheduled_at": DUE}
    started = RunStarted(run_id="r1", started_at=at(10, 0, 1), **common)
    assert health_input(started) == RunStartedInput("r1", at(10, 0, 1))
    finished = RunFinished(
        run_id="r1",
        started_at=at(10, 0, 1),
        finished_at=at(10, 1),
        duration_seconds=59,
        status=RunStatus.FAILED,
        exit_code=3,
        **common,
    )
    assert health_input(finished) == RunFinishedInput("r1", RunStatus.FAILED, at(10, 1), at(10, 0, 1), 3)
    beat = JobHeartbeat(id="h", job="j", kind=HeartbeatKind.FAIL, exit_code=1, at=at(10, 2))
    assert health_input(beat) == HeartbeatInput("h", HeartbeatKind.FAIL, at(10, 2), 1)


def test_a_reason_is_one_line_whatever_the_ids() -> None:
    record, _ = FIXTURES["up"]()
    odd = "r\n1\x1b[2J"
    _, flips = run(record, [(RunStartedInput(odd, at(9, 50)), at(9, 50)), (Tick(), at(12, 0))])
    assert [f.reason for f in flips] == [
        "run r\\n1\\x1b[2J started",
        "run r\\n1\\x1b[2J running 15m, past its 10m timeout (and 5m grace)",
    ]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        advance(initial_record(SPEC, CREATED), Tick(), SPEC, datetime(2026, 3, 2, 10, 0))
    with pytest.raises(ValueError, match="aware"):
        RunStartedInput("r", datetime(2026, 3, 2, 10, 0))
    with pytest.raises(ValueError, match="running"):
        RunFinishedInput("r", RunStatus.RUNNING, DUE)
    with pytest.raises(ValueError, match="at least 1"):
        HealthPolicy(failures_before_failing=0)


# Daylight saving: one due per local day, whatever the night.


@pytest.mark.parametrize(
    ("zone", "schedule", "night"),
    [
        ("America/New_York", "30 1 * * *", date(2026, 11, 1)),  # 01:30 happens twice
        ("Europe/Berlin", "30 2 * * *", date(2026, 10, 25)),  # 02:30 happens twice
        ("Australia/Lord_Howe", "45 1 * * *", date(2026, 4, 5)),  # clocks go back 30 minutes
        ("America/New_York", "30 2 * * *", date(2026, 3, 8)),  # 02:30 does not happen
    ],
)
def test_a_daily_job_is_due_once_a_day_across_a_dst_night(zone: str, schedule: str, night: date) -> None:
    spec = JobSpec(name="j", schedule=schedule, timezone=zone, grace_seconds=600, timeout_seconds=60)
    tz = ZoneInfo(zone)
    start = datetime(night.year, night.month, night.day, tzinfo=tz) - timedelta(days=3)
    record = initial_record(spec, start.astimezone(UTC))
    dues: list[datetime] = []
    late_days: list[date] = []
    for _ in range(7):
        # Each run succeeds a minute after it was due; a tick at the due instant first.
        due = record.due_at
        assert due is not None
        dues.append(due)
        record, flips = advance(record, Tick(), spec, due)
        late_days += [f.at.astimezone(tz).date() for f in flips if f.to_state is State.LATE]
        ok = HeartbeatInput(f"ok{len(dues)}", HeartbeatKind.SUCCESS, due + timedelta(minutes=1))
        record, flips = advance(record, ok, spec, due + timedelta(minutes=1))
        assert path(flips) == "up"
    local_days = [d.astimezone(tz).date() for d in dues]
    assert local_days == [start.date() + timedelta(days=i) for i in range(7)]
    assert late_days == local_days
    assert all(b > a for a, b in pairwise(dues))


# Properties of any sequence of inputs.

SPECS = [
    SPEC,
    JobSpec(name="j", schedule="*/5 * * * *", grace_seconds=0, timeout_seconds=60),
    JobSpec(
        name="j", schedule="30 1 * * *", timezone="America/New_York", grace_seconds=3600, timeout_seconds=7200
    ),
    JobSpec(name="j", schedule="*/10 * * * * *", grace_seconds=5, timeout_seconds=3),
]
KINDS = ["start", "finish", "finish current", "heartbeat", "tick", "tick", "pause", "resume", "reschedule"]
OUTCOMES = [s for s in RunStatus if s is not RunStatus.RUNNING]
gaps = st.one_of(st.just(0), st.integers(0, 90), st.integers(0, 4 * 3600), st.integers(0, 2 * 86400))
steps = st.lists(
    st.tuples(
        gaps,
        st.sampled_from(KINDS),
        st.integers(0, 3),  # which run, heartbeat or spec
        st.integers(-30, 3 * 3600),  # how long ago the event happened (negative: a clock ahead)
        st.sampled_from(OUTCOMES),
        st.sampled_from([None, 0, 1]),
        st.sampled_from(list(HeartbeatKind)),
    ),
    max_size=25,
)
START = datetime(2026, 10, 30, 12, 0, tzinfo=UTC)  # the New York fall-back night is inside


def _play(
    first_spec: int,
    threshold: int,
    plan: list[tuple[int, str, int, int, RunStatus, int | None, HeartbeatKind]],
) -> list[tuple[HealthRecord, list[Flip]]]:
    """Play ``plan`` and return each step's record and flips, checking every promise on the way."""
    spec, policy = SPECS[first_spec], HealthPolicy(failures_before_failing=threshold)
    record = initial_record(spec, START)
    now = START
    seen: list[tuple[HealthRecord, list[Flip]]] = []
    for gap, kind, which, ago, outcome, exit_code, beat in plan:
        now += timedelta(seconds=gap)
        happened = now - timedelta(seconds=ago)
        event: HealthInput
        if kind == "start":
            event = RunStartedInput(f"r{which}", happened)
        elif kind == "finish":
            started = None if which == 3 else happened - timedelta(seconds=60 * which)
            event = RunFinishedInput(f"r{which}", outcome, happened, started, exit_code)
        elif kind == "finish current" and record.run_id is not None:
            event = RunFinishedInput(record.run_id, outcome, happened, record.run_started_at, exit_code)
        elif kind == "heartbeat":
            event = HeartbeatInput(f"h{which}", beat, happened, exit_code)
        elif kind == "pause":
            event = Paused()
        elif kind == "resume":
            event = Resumed()
        elif kind == "reschedule":
            spec, event = SPECS[which], ScheduleChanged()
        else:
            event = Tick()
        after, flips = advance(record, event, spec, now, policy)
        assert_consistent(record, after, flips, spec, now, policy)
        if isinstance(event, Tick):
            assert after.deadline_at is None or after.deadline_at > now
            assert advance(after, Tick(), spec, now, policy) == (after, [])
        seen.append((after, flips))
        record = after
    return seen


@settings(max_examples=250, deadline=None)
@given(st.integers(0, len(SPECS) - 1), st.integers(1, 3), steps)
def test_any_sequence_flips_consistently_and_replays_identically(
    first_spec: int,
    threshold: int,
    plan: list[tuple[int, str, int, int, RunStatus, int | None, HeartbeatKind]],
) -> None:
    seen = _play(first_spec, threshold, plan)
    flips = [flip for _, step in seen for flip in step]
    for earlier, later in pairwise(flips):
        assert later.from_state is earlier.to_state
        assert later.at >= earlier.at
    assert _play(first_spec, threshold, plan) == seen


# r1 of FIXTURES["running"] (started 10:00:01), declared lost at 10:02, whose worker (cut off, not
# dead) reports its real end later.
R1_LOST = RunFinishedInput("r1", RunStatus.LOST, at(10, 2), at(10, 0, 1))
R1_REPORTED_OK = RunFinishedInput("r1", RunStatus.SUCCEEDED, at(10, 0, 31), at(10, 0, 1))


def test_the_real_end_of_a_run_declared_lost_replaces_the_loss() -> None:
    record, _ = FIXTURES["running"]()
    after, flips = run(record, [(R1_LOST, at(10, 2)), (R1_REPORTED_OK, at(10, 3))])
    assert path(flips) == "failing>up"
    assert flips[-1].recovered_from is State.FAILING
    assert flips[-1].reason == (
        "run r1 succeeded: its worker reported it after it was declared lost; recovered from failing"
    )
    assert after.consecutive_failures == 0 and after.lost_run_id is None
    # Delivered again, it changes nothing more; nor does the loss declared again.
    _, more = run(after, [(R1_REPORTED_OK, at(10, 4)), (R1_LOST, at(10, 4))])
    assert more == []


def test_a_run_declared_lost_that_really_failed_keeps_the_job_failing_once() -> None:
    record, _ = FIXTURES["running"]()
    failed = RunFinishedInput("r1", RunStatus.FAILED, at(10, 0, 31), at(10, 0, 1), exit_code=2)
    after, flips = run(record, [(R1_LOST, at(10, 2)), (failed, at(10, 3))])
    assert path(flips) == "failing" and after.consecutive_failures == 1


def test_the_real_end_of_a_lost_run_is_history_once_a_newer_run_started() -> None:
    record, _ = FIXTURES["running"]()
    after, flips = run(
        record,
        [
            (R1_LOST, at(10, 2)),
            (RunStartedInput("r2", at(10, 2, 30)), at(10, 2, 30)),
            (R1_REPORTED_OK, at(10, 3)),
        ],
    )
    assert path(flips) == "failing" and after.run_id == "r2" and after.consecutive_failures == 1


def test_under_a_failure_threshold_the_real_end_of_a_lost_run_only_clears_the_count() -> None:
    record, _ = FIXTURES["running"]()
    lenient = HealthPolicy(failures_before_failing=2)
    after, flips = run(record, [(R1_LOST, at(10, 2))], policy=lenient)
    assert path(flips) == "up" and after.consecutive_failures == 1
    after, flips = run(after, [(R1_REPORTED_OK, at(10, 3))], policy=lenient)
    assert flips == [] and after.consecutive_failures == 0


def test_a_changed_record_is_the_record_with_those_fields_and_no_other_name_is_taken() -> None:
    record = HealthRecord(State.UP, since=DUE, due_at=DUE, deadline_at=DUE)
    moved = record.changed(state=State.LATE, since=DUE + timedelta(seconds=1))
    assert moved == HealthRecord(State.LATE, since=DUE + timedelta(seconds=1), due_at=DUE, deadline_at=DUE)
    assert record.state is State.UP  # the original is untouched
    with pytest.raises(TypeError, match="stat"):
        record.changed(stat=State.DOWN)
