"""A job's health as one pure state machine: ``advance(record, input, spec, now)`` gives the new
record and the flips (state changes) it went through. No clock is read: every instant is an argument.

``docs/monitoring.md`` draws the machine and lists every rule; the unit tests walk every
(state, input) pair. In short: a run that starts clears ``late`` and ``down``; only a success makes
a job ``up`` again after a failure; ``N`` failed runs in a row make it ``failing``; a deadline (due,
due + grace, start + timeout + grace) turns it ``late``, ``down`` or ``stuck``; ``paused`` ignores
deadlines. An input older than what the record already knows never moves the state backwards, and
deadlines that passed while nobody looked are applied at their own instants, each once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from common.jobs import JobSpec
from common.messages import HeartbeatKind, JobHeartbeat, RunFinished, RunStarted, RunStatus, format_instant
from common.next_fires import next_fires


class State(enum.StrEnum):
    """Where a job stands."""

    NEW = "new"  # no run seen yet, and the first one is not due yet
    UP = "up"  # the last run came in time and did not make the job failing
    RUNNING = "running"  # a run is in progress, within its timeout
    LATE = "late"  # the due time passed, still inside the grace period
    DOWN = "down"  # the grace period is over and no run started
    FAILING = "failing"  # the last N runs failed
    STUCK = "stuck"  # a run is still going after its timeout plus the grace period
    PAUSED = "paused"  # the job is disabled: no deadline applies


# The states someone must be told about; a flip into one of them is an alarm.
ALARM_STATES = frozenset({State.DOWN, State.FAILING, State.STUCK})


@dataclass(frozen=True)
class HealthPolicy:
    """How demanding the machine is. ``failures_before_failing``: how many failed runs in a row
    make a job ``failing`` (the job's ``failure_threshold``, see ``health_store.policy_of``)."""

    failures_before_failing: int = 1

    def __post_init__(self) -> None:
        if self.failures_before_failing < 1:
            raise ValueError("failures_before_failing must be at least 1")


DEFAULT_POLICY = HealthPolicy()


@dataclass(frozen=True)
class HealthRecord:
    """What the monitor stores for a job: its state and everything the next transition needs.

    ``since``: when the job entered ``state``. ``run_id`` / ``run_started_at``: the run in progress
    (None when there is none; a paused job may still have one). ``due_at``: when the next run is
    expected (a missed one stays here while the job is late or down; None while paused).
    ``deadline_at``: ``next_deadline(self, spec)``, kept for the monitor's timers and for rebuilding
    them after a restart. ``open_alarm``: the alarm state entered since the job was last up, so
    that the flip back to ``up`` is known as a recovery. ``last_run_at`` and ``last_finished_at``:
    the start of the latest run seen (its finish when the start is unknown) and the latest finish,
    which tell an older or repeated input from a new one. ``lost_run_id``: the run the latest
    finish declared lost, while no run has started or ended since: should its worker report its
    real end after all (it was cut off, not dead), that end replaces the loss.
    """

    state: State
    since: datetime
    due_at: datetime | None
    deadline_at: datetime | None
    run_id: str | None = None
    run_started_at: datetime | None = None
    consecutive_failures: int = 0
    open_alarm: State | None = None
    last_run_at: datetime | None = None
    last_finished_at: datetime | None = None
    lost_run_id: str | None = None

    def changed(self, **changes: Any) -> HealthRecord:
        """This record with ``changes`` (field names; any other raises TypeError):
        ``dataclasses.replace`` at a fraction of its cost, the machine making several for every
        event the monitor records. The new record's fields are set directly: a frozen
        dataclass's ``__init__`` sets each through ``object.__setattr__``."""
        if not changes.keys() <= _RECORD_FIELDS:
            raise TypeError(f"HealthRecord has no field {sorted(changes.keys() - _RECORD_FIELDS)}")
        record = object.__new__(HealthRecord)
        fields = record.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        return record


_RECORD_FIELDS = frozenset(HealthRecord.__dataclass_fields__)


@dataclass(frozen=True)
class Flip:
    """One change of state: when, from what, to what, and why in one line.

    ``recovered_from`` is the alarm state (down, failing, stuck) that a flip to ``up`` ends, if any:
    the flip a recovery notice is sent for.
    """

    at: datetime
    from_state: State
    to_state: State
    reason: str
    recovered_from: State | None = None

    @property
    def alarm(self) -> bool:
        """Whether this flip enters a state someone must be told about."""
        return self.to_state in ALARM_STATES


@dataclass(frozen=True)
class RunStartedInput:
    """A worker began run ``run_id`` at ``at``."""

    run_id: str
    at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.at)


@dataclass(frozen=True)
class RunFinishedInput:
    """Run ``run_id`` ended at ``at`` with ``outcome``. ``started_at`` is None when unknown.

    A run the monitor declares lost (its worker stopped sending heartbeats while holding it) is
    this input with ``outcome=RunStatus.LOST`` and ``at`` the instant it was declared lost.
    """

    run_id: str
    outcome: RunStatus
    at: datetime
    started_at: datetime | None = None
    exit_code: int | None = None

    def __post_init__(self) -> None:
        if self.outcome is RunStatus.RUNNING:
            raise ValueError("a finished run cannot be 'running'")
        _require_aware(self.at)
        if self.started_at is not None:
            _require_aware(self.started_at)


@dataclass(frozen=True)
class HeartbeatInput:
    """The job said from outside that it started, succeeded or failed (heartbeat ``id``).

    A success with a non-zero ``exit_code`` is a failure.
    """

    id: str
    kind: HeartbeatKind
    at: datetime
    exit_code: int | None = None

    def __post_init__(self) -> None:
        _require_aware(self.at)


@dataclass(frozen=True)
class Tick:
    """Time passed: apply every deadline up to ``now``."""


@dataclass(frozen=True)
class Paused:
    """The job was disabled."""


@dataclass(frozen=True)
class Resumed:
    """The job was enabled again."""


@dataclass(frozen=True)
class ScheduleChanged:
    """The job's schedule, time zone, grace or timeout changed: ``spec`` is the new one."""


HealthInput = RunStartedInput | RunFinishedInput | HeartbeatInput | Tick | Paused | Resumed | ScheduleChanged


def initial_record(spec: JobSpec, now: datetime) -> HealthRecord:
    """The record of a job first seen at ``now``: ``new`` with its first fire due, or ``paused``."""
    _require_aware(now)
    if not spec.enabled:
        return HealthRecord(State.PAUSED, since=now, due_at=None, deadline_at=None)
    record = HealthRecord(State.NEW, since=now, due_at=spec.next_fire(now), deadline_at=None)
    return record.changed(deadline_at=next_deadline(record, spec))


def next_deadline(record: HealthRecord, spec: JobSpec) -> datetime | None:
    """The instant at which a Tick could change ``record``'s state, or None if only an input can.

    ``new``/``up``: the due time (to ``late``); ``late``: due + grace (to ``down``), the due time
    counted from the end of a jittered job's jitter window (``JobSpec.jitter``); a run in
    progress (``running``, or ``failing`` with a run): its start + timeout + grace (to ``stuck``);
    ``failing`` without a run: due + grace (to ``down``). ``down``, ``stuck``, ``paused``: None.
    For a record that ``advance`` returned, it is None or strictly after ``record.since``.
    """
    state = record.state
    if state is State.RUNNING or (state is State.FAILING and record.run_started_at is not None):
        if record.run_started_at is None:
            return None
        timeout = timedelta(seconds=spec.timeout_seconds)
        return record.run_started_at + timeout + timedelta(seconds=spec.grace_seconds)
    due = record.due_at
    if due is None:
        return None
    # A jittered job's fire goes out up to its jitter window after the due time, on purpose.
    if spec.jitter is not None:
        due += timedelta(seconds=spec.jitter_seconds())
    if state is State.NEW or state is State.UP:
        return due
    if state is State.LATE or state is State.FAILING:
        return due + timedelta(seconds=spec.grace_seconds)
    return None


def advance(
    record: HealthRecord,
    event: HealthInput,
    spec: JobSpec,
    now: datetime,
    policy: HealthPolicy = DEFAULT_POLICY,
) -> tuple[HealthRecord, list[Flip]]:
    """The record after ``event`` was seen at ``now``, and the flips on the way, in order.

    An event counts at its own instant, kept between ``record.since`` and ``now`` (a late
    delivery never rewrites history, a clock ahead never dates the future); Tick, Paused, Resumed
    and ScheduleChanged count at ``now``. Deadlines passed before that instant are applied first,
    each at its own instant; what the input itself makes overdue (a run that started long ago, a
    shorter timeout) flips at the input's instant. A flip's instant is never before the previous
    one's. The returned record's ``deadline_at`` is ``next_deadline(record, spec)``. Pure and
    deterministic. Raises ValueError for a naive ``now``.
    """
    _require_aware(now)
    if isinstance(event, RunStartedInput | RunFinishedInput | HeartbeatInput):
        instant = max(record.since, min(event.at, now))
    else:
        instant = max(record.since, now)
    machine = _Machine(record, spec, policy)
    if not isinstance(event, ScheduleChanged):
        # What passed before the input, under the spec it passed under (a changed spec applies
        # from now on, never to the past).
        machine.catch_up(instant)
    match event:
        case RunStartedInput():
            machine.start(_Start(event.run_id, event.at, f"run {_label(event.run_id)}"), instant)
        case RunFinishedInput():
            machine.finish(_finish_of_run(event), instant)
        case HeartbeatInput(kind=HeartbeatKind.START):
            machine.start(_Start(event.id, event.at, f"run {_label(event.id)} (start heartbeat)"), instant)
        case HeartbeatInput():
            machine.finish(_finish_of_heartbeat(event), instant)
        case Paused():
            machine.pause(instant)
        case Resumed():
            machine.resume(instant)
        case ScheduleChanged():
            machine.reschedule(instant)
        case Tick():
            pass
    machine.catch_up(instant, at_limit=True)
    return machine.result()


def health_input(event: RunStarted | RunFinished | JobHeartbeat) -> HealthInput:
    """The machine's input for a wire event."""
    match event:
        case RunStarted():
            return RunStartedInput(event.run_id, event.started_at)
        case RunFinished():
            return RunFinishedInput(
                event.run_id, event.status, event.finished_at, event.started_at, event.exit_code
            )
        case JobHeartbeat():
            return HeartbeatInput(event.id, event.kind, event.at, event.exit_code)


@dataclass(frozen=True)
class _Start:
    run_id: str
    at: datetime
    subject: str


class _Verdict(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # a skipped run: neither a success nor a failure


@dataclass(frozen=True)
class _Finish:
    run_id: str | None  # None: a heartbeat, which ends whatever run is in progress
    started_at: datetime | None
    at: datetime
    verdict: _Verdict
    what: str  # "run r1 failed with exit code 2"
    ran: bool = True  # False: the run never ran (expired, skipped), so it has no duration
    lost: bool = False  # the monitor declared the run lost: its real end may still come


def _finish_of_run(event: RunFinishedInput) -> _Finish:
    subject = f"run {_label(event.run_id)}"
    match event.outcome:
        case RunStatus.SUCCEEDED:
            return _Finish(event.run_id, event.started_at, event.at, _Verdict.SUCCESS, f"{subject} succeeded")
        case RunStatus.SKIPPED:
            return _Finish(
                event.run_id,
                event.started_at,
                event.at,
                _Verdict.NEUTRAL,
                f"{subject} was skipped",
                ran=False,
            )
        case RunStatus.FAILED:
            code = "" if event.exit_code is None else f" with exit code {event.exit_code}"
            what = f"{subject} failed{code}"
        case RunStatus.TIMED_OUT:
            what = f"{subject} timed out"
        case RunStatus.EXPIRED:
            return _Finish(
                event.run_id,
                event.started_at,
                event.at,
                _Verdict.FAILURE,
                f"{subject} expired before a worker ran it",
                ran=False,
            )
        case _:
            what = f"{subject} was lost (its worker stopped sending heartbeats)"
    lost = event.outcome is RunStatus.LOST
    return _Finish(event.run_id, event.started_at, event.at, _Verdict.FAILURE, what, lost=lost)


def _finish_of_heartbeat(event: HeartbeatInput) -> _Finish:
    if event.kind is HeartbeatKind.SUCCESS and not event.exit_code:
        return _Finish(
            None, None, event.at, _Verdict.SUCCESS, f"heartbeat {_label(event.id)} reported success"
        )
    if event.kind is HeartbeatKind.SUCCESS:
        what = f"heartbeat {_label(event.id)} reported exit code {event.exit_code}"
    else:
        code = "" if event.exit_code is None else f" with exit code {event.exit_code}"
        what = f"heartbeat {_label(event.id)} reported failure{code}"
    return _Finish(None, None, event.at, _Verdict.FAILURE, what)


# Each deadline moves the state towards down or stuck, which have none: two steps at most.
_MAX_DEADLINES_PER_INPUT = 4


class _Machine:
    """One call of ``advance``: the record as it changes, and the flips so far."""

    def __init__(self, record: HealthRecord, spec: JobSpec, policy: HealthPolicy) -> None:
        self.record = record
        self.spec = spec
        self.policy = policy
        self.flips: list[Flip] = []

    def result(self) -> tuple[HealthRecord, list[Flip]]:
        record = self.record.changed(deadline_at=next_deadline(self.record, self.spec))
        return record, self.flips

    def due_after(self, instant: datetime) -> datetime:
        return next_fires.after(self.spec, instant)

    def move(self, to: State, at: datetime, reason: str) -> None:
        """Enter ``to`` at ``at`` with a flip, unless the job is already there."""
        record = self.record
        if to is record.state:
            return
        alarm, recovered = record.open_alarm, None
        if to in ALARM_STATES:
            alarm = to
        elif to is State.UP and alarm is not None:
            recovered, alarm = alarm, None
            reason = f"{reason}; recovered from {recovered}"
        elif to in (State.NEW, State.UP, State.PAUSED):
            alarm = None
        at = max(at, record.since)
        self.flips.append(Flip(at, record.state, to, reason, recovered))
        self.record = record.changed(state=to, since=at, open_alarm=alarm)

    def catch_up(self, limit: datetime, *, at_limit: bool = False) -> None:
        """Apply every deadline at or before ``limit``: each at its own instant, or all at
        ``limit`` when ``at_limit`` (what an input made overdue is known from its instant only)."""
        for _ in range(_MAX_DEADLINES_PER_INPUT):
            deadline = next_deadline(self.record, self.spec)
            if deadline is None or deadline > limit:
                return
            self.deadline_passed(limit if at_limit else max(deadline, self.record.since))

    def deadline_passed(self, at: datetime) -> None:
        record, spec = self.record, self.spec
        grace = timedelta(seconds=spec.grace_seconds)
        if record.run_id is not None and record.run_started_at is not None:
            timeout = timedelta(seconds=spec.timeout_seconds)
            self.move(
                State.STUCK,
                at,
                f"run {_label(record.run_id)} running {_span(at - record.run_started_at)}, "
                f"past its {_span(timeout)} timeout (and {_span(grace)} grace)",
            )
        elif record.state in (State.NEW, State.UP) and record.due_at is not None:
            self.move(State.LATE, at, f"due at {format_instant(record.due_at)}, no run yet")
        elif record.due_at is not None:
            self.move(
                State.DOWN,
                at,
                f"no run since it was due at {format_instant(record.due_at)} ({_span(grace)} grace)",
            )

    def start(self, start: _Start, instant: datetime) -> None:
        record = self.record
        if record.run_id == start.run_id or (
            record.last_run_at is not None and start.at <= record.last_run_at
        ):
            return  # a repeated or older start: the record already knows better
        paused = record.state is State.PAUSED
        abandoned = record.run_id if record.state is State.STUCK else None
        failures = record.consecutive_failures + int(abandoned is not None)
        self.record = record.changed(
            run_id=start.run_id,
            run_started_at=start.at,
            last_run_at=start.at,
            consecutive_failures=failures,
            due_at=None if paused else self.due_after(instant),
            lost_run_id=None,
        )
        if paused:
            return
        # A run replaces the one in progress; a failing job stays failing until a success.
        target = self.resting_state()
        if abandoned is not None:
            reason = f"{start.subject} started; run {_label(abandoned)} never finished"
        else:
            reason = f"{start.subject} started"
            if record.state in (State.LATE, State.DOWN) and record.due_at is not None:
                reason += (
                    f", {_span(instant - record.due_at)} after it was due at {format_instant(record.due_at)}"
                )
        if target is State.FAILING:
            reason += f"; {self.failure_verdict(failures)}"
        self.move(target, instant, reason)

    def finish(self, finish: _Finish, instant: datetime) -> None:
        record = self.record
        if record.run_id is None and finish.run_id is not None and finish.run_id == record.lost_run_id:
            if not finish.lost:
                self.correct_loss(finish, instant)
            return
        abandoned = None
        started = finish.started_at
        if record.run_id is not None and record.run_started_at is not None:
            if finish.run_id is None:
                if finish.at < record.run_started_at:
                    return  # a heartbeat from before the run in progress started
                started = record.run_started_at
            elif finish.run_id == record.run_id:
                started = finish.started_at or record.run_started_at
            elif (
                finish.verdict is not _Verdict.NEUTRAL
                and finish.started_at is not None
                and finish.started_at > record.run_started_at
            ):
                # A newer run whose start was missed ends: it replaces the one in progress.
                abandoned = record.run_id if record.state is State.STUCK else None
            else:
                return  # an older run: only the latest run speaks for the job
        else:
            if finish.verdict is _Verdict.NEUTRAL:
                return  # a skipped run that was not in progress changes nothing
            key = finish.started_at or finish.at
            if record.last_run_at is not None and key < record.last_run_at:
                return
            if record.last_finished_at is not None and finish.at <= record.last_finished_at:
                return  # the same finish again, or an older one
        self.close(finish, started, abandoned, instant)

    def close(
        self, finish: _Finish, started: datetime | None, abandoned: str | None, instant: datetime
    ) -> None:
        """The run in progress (or one whose start was missed) ended as ``finish`` says."""
        record = self.record
        paused = record.state is State.PAUSED
        failures = record.consecutive_failures + int(abandoned is not None)
        what = finish.what
        if started is not None and finish.ran:
            what += f" after {_span(finish.at - started)}"
        if abandoned is not None:
            what += f" (run {_label(abandoned)} never finished)"
        key = finish.started_at or finish.at
        last_run_at = key if record.last_run_at is None else max(record.last_run_at, key)
        last_finished_at = record.last_finished_at
        if finish.verdict is not _Verdict.NEUTRAL:
            last_finished_at = finish.at if last_finished_at is None else max(last_finished_at, finish.at)
        if finish.verdict is _Verdict.SUCCESS:
            failures = 0
        elif finish.verdict is _Verdict.FAILURE:
            failures += 1
        self.record = record.changed(
            run_id=None,
            run_started_at=None,
            consecutive_failures=failures,
            last_run_at=last_run_at,
            last_finished_at=last_finished_at,
            due_at=None if paused else self.due_after(instant),
            lost_run_id=finish.run_id if finish.lost else None,
        )
        if paused:
            return
        threshold = self.policy.failures_before_failing
        if finish.verdict is _Verdict.SUCCESS or (
            finish.verdict is _Verdict.NEUTRAL and failures < threshold
        ):
            self.move(State.UP, instant, what)
        elif finish.verdict is _Verdict.NEUTRAL:
            self.move(State.FAILING, instant, f"{what}; {self.failure_verdict(failures)}")
        elif failures >= threshold:
            self.move(State.FAILING, instant, f"{self.failure_verdict(failures)}: {what}")
        else:
            self.move(State.UP, instant, f"{what} ({failures} of {threshold} failures before failing)")

    def correct_loss(self, finish: _Finish, instant: datetime) -> None:
        """The run the latest finish declared lost ended after all, as ``finish`` says: its verdict
        replaces the loss in the count of failures, and a job failing only because of the loss is
        up again (a recovery). Its schedule is left as the loss left it: a run due since then
        that did not come stays late or down."""
        record = self.record
        failures = max(0, record.consecutive_failures - 1)
        if finish.verdict is _Verdict.SUCCESS:
            failures = 0
        elif finish.verdict is _Verdict.FAILURE:
            failures += 1
        self.record = record.changed(consecutive_failures=failures, lost_run_id=None)
        if record.state is State.FAILING and failures < self.policy.failures_before_failing:
            self.move(State.UP, instant, f"{finish.what}: its worker reported it after it was declared lost")

    def failure_verdict(self, failures: int) -> str:
        return "last run failed" if failures == 1 else f"last {failures} runs failed"

    def resting_state(self) -> State:
        """The state the record's history alone gives, once nothing is pending."""
        record = self.record
        if record.consecutive_failures >= self.policy.failures_before_failing:
            return State.FAILING
        if record.run_id is not None:
            return State.RUNNING
        return State.UP if record.last_finished_at is not None else State.NEW

    def pause(self, instant: datetime) -> None:
        if self.record.state is State.PAUSED:
            return
        self.move(State.PAUSED, instant, "paused: the job was disabled")
        self.record = self.record.changed(due_at=None)

    def resume(self, instant: datetime) -> None:
        if self.record.state is not State.PAUSED:
            return
        self.record = self.record.changed(due_at=self.due_after(instant))
        target = self.resting_state()
        reason = "resumed: the job was enabled"
        if target is State.FAILING:
            reason += f"; {self.failure_verdict(self.record.consecutive_failures)}"
        self.move(target, instant, reason)

    def reschedule(self, instant: datetime) -> None:
        """A due time still ahead follows the new schedule; one already passed is still owed."""
        record = self.record
        if record.state is State.PAUSED or (record.due_at is not None and record.due_at <= instant):
            return
        self.record = record.changed(due_at=self.due_after(instant))


def _span(delta: timedelta) -> str:
    """A duration in its two largest units: ``250ms``, ``45s``, ``1m30s``, ``2h``, ``3d4h``."""
    total = delta.total_seconds()
    if total < 1:
        return f"{max(0, round(total * 1000))}ms"
    seconds = int(total)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            count, seconds = divmod(seconds, size)
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])


def _label(name: str) -> str:
    """An id as it may appear in a one-line reason: anything unprintable escaped."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is UTC:  # every instant of a wire event, once parsed
        return
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the health machine needs aware datetimes")
