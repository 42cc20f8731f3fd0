"""The fleet's health as pure decisions: for each component (the schedulers, a pool, a worker, the
dead-letter queue), ``decide(record, observation, policy, now)`` gives the new record, its flips and
what to do about it. No clock is read: every instant is an argument.

A component is ``up`` or ``down`` (``new`` until first decided); a flip to ``down`` is an alarm and
the flip back to ``up`` is its recovery, like a job's (``monitor.health``). ``docs/monitoring.md``
("Fleet health") lists the rules:

- ``@scheduler``: down when no scheduler heartbeat came for ``heartbeat_timeout`` while some
  enabled job has an action (a scheduler is needed); up at the next heartbeat.
- ``@pool:<name>``: down when triggers have been waiting in its queue with no consumer for
  ``heartbeat_timeout``; up once a consumer is back or nothing waits.
- ``@worker:<name>``: up from its first heartbeat. When its heartbeats stop for
  ``heartbeat_timeout``: if it held runs (the store has runs of it still ``running``) it goes
  down and those runs are to be marked ``lost``; otherwise it left cleanly and is forgotten
  without a flip. A down worker is up again at its next heartbeat, and
  forgotten after ``forget_after``.
- ``@dead-letters``: down when the queue holds more messages than at the last look; up when it is
  emptied or has not grown for ``dead_letters_quiet``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from monitor.health import Flip, State

# The prefix no job name can start with (``JOB_NAME_PATTERN`` starts with a letter or a digit),
# so that a component's flips share the ``flips`` table with the jobs' without a collision.
RESERVED_PREFIX = "@"
# The ``flips.job`` column's width: longer component names are shortened with a hash.
NAME_WIDTH = 64


class Kind(enum.StrEnum):
    """What a fleet component is."""

    SCHEDULER = "scheduler"
    POOL = "pool"
    WORKER = "worker"
    DEAD_LETTERS = "dead-letters"


def component_key(kind: Kind, name: str = "") -> str:
    """The component's name in the ``flips`` table: ``@scheduler``, ``@dead-letters``,
    ``@pool:<name>``, ``@worker:<name>``; at most ``NAME_WIDTH`` characters (a longer one keeps
    its start and ends with ``~`` and 8 hex digits of its hash), never a valid job name."""
    key = (
        f"{RESERVED_PREFIX}{kind.value}"
        if kind in (Kind.SCHEDULER, Kind.DEAD_LETTERS)
        else (f"{RESERVED_PREFIX}{kind.value}:{name}")
    )
    if len(key) <= NAME_WIDTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{key[: NAME_WIDTH - 9]}~{digest}"


@dataclass(frozen=True)
class FleetPolicy:
    """How patient the fleet watch is. ``heartbeat_timeout``: the silence after which a scheduler
    or a worker is taken for gone, and how long triggers may wait in a pool without a consumer
    (a multiple of the heartbeat interval). ``dead_letters_quiet``: how long the dead-letter queue
    must not grow for its alarm to end. ``forget_after``: how long a down worker stays listed."""

    heartbeat_timeout: timedelta
    dead_letters_quiet: timedelta
    forget_after: timedelta

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout", "dead_letters_quiet", "forget_after"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class ComponentRecord:
    """What the monitor stores for a component: its state, since when, and what the next decision
    needs. ``seen_at``: a scheduler's or worker's latest heartbeat; a pool's latest look at which
    it was fine (a consumer, or nothing waiting); the dead-letter queue's latest growth.
    ``count``: a worker's running jobs (its last heartbeat), a pool's waiting triggers, the
    dead-letter queue's messages, at the latest look. ``detail``: one line on the latest look."""

    state: State
    since: datetime
    seen_at: datetime | None = None
    count: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class SchedulerSeen:
    """The newest heartbeat of any scheduler (None: none seen), and whether a scheduler is needed
    (some enabled job has an action)."""

    last_heartbeat: datetime | None
    needed: bool


@dataclass(frozen=True)
class PoolSeen:
    """A look at a pool's queue: ready triggers and consumers (0 and 0 for a queue that does not
    exist yet)."""

    waiting: int
    consumers: int


@dataclass(frozen=True)
class WorkerSeen:
    """A worker's newest heartbeat, the running jobs it reported then, how many runs the store
    still has ``running`` on it, and when the latest of those started (None: unknown)."""

    last_heartbeat: datetime
    running: int
    held: int = 0
    held_since: datetime | None = None


def _left_behind(seen: WorkerSeen, policy: FleetPolicy, now: datetime) -> bool:
    """Whether a worker judged gone (down, or not listed) holds runs recorded after that which are
    lost too: it is silent, and so is the latest of them (a worker back from a cut may start a
    run a moment before its first heartbeat arrives)."""
    return seen.held > 0 and silent(seen.held_since, policy, now)


@dataclass(frozen=True)
class DeadLettersSeen:
    """A look at the dead-letter queue: how many messages it holds."""

    messages: int


Observation = SchedulerSeen | PoolSeen | WorkerSeen | DeadLettersSeen


@dataclass(frozen=True)
class Decision:
    """A decision: the new record (None: forget the component), the flips, and for a worker that
    went down holding runs, ``lose_runs``: mark its runs still ``running`` as ``lost``."""

    record: ComponentRecord | None
    flips: tuple[Flip, ...] = ()
    lose_runs: bool = False


def decide(
    kind: Kind, record: ComponentRecord | None, seen: Observation, policy: FleetPolicy, now: datetime
) -> Decision:
    """The component's next record and flips after a look at ``now``. ``record`` None: never
    decided before (a record is made, ``new`` since ``now``, then decided). Raises ValueError when
    ``seen`` does not fit ``kind``."""
    current = record or ComponentRecord(State.NEW, since=now)
    match kind, seen:
        case Kind.SCHEDULER, SchedulerSeen():
            return _scheduler(current, seen, policy, now)
        case Kind.POOL, PoolSeen():
            return _pool(current, seen, policy, now)
        case Kind.WORKER, WorkerSeen():
            return _worker(record, seen, policy, now)
        case Kind.DEAD_LETTERS, DeadLettersSeen():
            return _dead_letters(record, seen, policy, now)
    raise ValueError(f"a {type(seen).__name__} says nothing about a {kind.value}")


def silent(last: datetime | None, policy: FleetPolicy, now: datetime) -> bool:
    """Whether a process last heard at ``last`` (None: never) is silent at ``now``."""
    return last is None or now - last > policy.heartbeat_timeout


def _to(record: ComponentRecord, state: State, now: datetime, reason: str, **changes: Any) -> Decision:
    """``record`` moved to ``state`` (a flip only when the state changes)."""
    if record.state is state:
        return Decision(replace(record, **changes))
    recovered = State.DOWN if record.state is State.DOWN and state is State.UP else None
    flip = Flip(now, record.state, state, reason, recovered)
    return Decision(replace(record, state=state, since=now, **changes), (flip,))


def _scheduler(record: ComponentRecord, seen: SchedulerSeen, policy: FleetPolicy, now: datetime) -> Decision:
    last = seen.last_heartbeat
    if record.seen_at is not None and (last is None or last < record.seen_at):
        last = record.seen_at
    if not silent(last, policy, now):
        assert last is not None
        detail = f"last heartbeat at {_at(last)}"
        return _to(record, State.UP, now, "a scheduler sends heartbeats", seen_at=last, detail=detail)
    if not seen.needed:
        if record.state is State.DOWN:
            return _to(
                record, State.UP, now, "no enabled job has an action: no scheduler is needed", seen_at=last
            )
        return Decision(replace(record, seen_at=last, detail="no enabled job has an action"))
    # Silent since its last heartbeat, or since the watch began for one never seen.
    silent_since = last or record.since
    if now - silent_since <= policy.heartbeat_timeout:
        return Decision(replace(record, seen_at=last))
    what = "no scheduler heartbeat yet" if last is None else f"no scheduler heartbeat since {_at(last)}"
    return _to(record, State.DOWN, now, what, seen_at=last, detail=what)


def _pool(record: ComponentRecord, seen: PoolSeen, policy: FleetPolicy, now: datetime) -> Decision:
    detail = f"{seen.waiting} waiting, {seen.consumers} consumer(s)"
    if seen.consumers > 0 or seen.waiting == 0:
        why = "a worker consumes it" if seen.consumers > 0 else "no trigger waits"
        return _to(record, State.UP, now, why, seen_at=now, count=seen.waiting, detail=detail)
    fine_at = record.seen_at or record.since
    if now - fine_at <= policy.heartbeat_timeout:
        return Decision(replace(record, count=seen.waiting, detail=detail))
    reason = f"{seen.waiting} trigger(s) waiting and no worker consuming since {_at(fine_at)}"
    return _to(record, State.DOWN, now, reason, count=seen.waiting, detail=detail)


def _worker(record: ComponentRecord | None, seen: WorkerSeen, policy: FleetPolicy, now: datetime) -> Decision:
    newer = record is None or record.seen_at is None or seen.last_heartbeat > record.seen_at
    if newer or record is None:
        last, running = seen.last_heartbeat, seen.running
    else:
        assert record.seen_at is not None
        last, running = record.seen_at, record.count or 0
    detail = f"{running} running at its last heartbeat, {_at(last)}"
    if record is None:
        if silent(last, policy, now):
            # A heartbeat too old to matter: never listed. Runs the store still has running on it
            # (their start recorded once it was forgotten, or it was never heard) are lost.
            return Decision(None, lose_runs=_left_behind(seen, policy, now))
        return _to(
            ComponentRecord(State.NEW, since=now),
            State.UP,
            now,
            "first heartbeat",
            seen_at=last,
            count=running,
            detail=detail,
        )
    if record.state is State.DOWN:
        if newer:
            return _to(record, State.UP, now, "heartbeats again", seen_at=last, count=running, detail=detail)
        if _left_behind(seen, policy, now):
            # Runs whose start was recorded after it went down (late events): lost as well.
            return Decision(record, lose_runs=True)
        if now - record.since > policy.forget_after:
            return Decision(None)
        return Decision(record)
    if not silent(last, policy, now):
        return _to(record, State.UP, now, "heartbeats", seen_at=last, count=running, detail=detail)
    if seen.held == 0:
        # It left holding no run the store knows as running: a clean stop (its last heartbeat
        # may still count a run that it then finished), or scaled down.
        return Decision(None)
    reason = f"no heartbeat since {_at(last)} ({running} running then); {seen.held} run(s) of it marked lost"
    decision = _to(record, State.DOWN, now, reason, seen_at=last, count=running, detail=reason)
    return replace(decision, lose_runs=True)


def _dead_letters(
    record: ComponentRecord | None, seen: DeadLettersSeen, policy: FleetPolicy, now: datetime
) -> Decision:
    detail = f"{seen.messages} message(s)"
    if record is None:
        # The first look is the baseline: what was there before says nothing about growth.
        return _to(
            ComponentRecord(State.NEW, since=now),
            State.UP,
            now,
            "first look",
            count=seen.messages,
            detail=detail,
        )
    before = record.count or 0
    if seen.messages > before:
        reason = f"the dead-letter queue grew from {before} to {seen.messages} message(s)"
        return _to(record, State.DOWN, now, reason, seen_at=now, count=seen.messages, detail=detail)
    if seen.messages == 0:
        return _to(record, State.UP, now, "the dead-letter queue is empty", count=0, detail=detail)
    grew_at = record.seen_at or record.since
    if record.state is State.DOWN and now - grew_at >= policy.dead_letters_quiet:
        reason = f"the dead-letter queue has not grown since {_at(grew_at)}"
        return _to(record, State.UP, now, reason, count=seen.messages, detail=detail)
    return Decision(replace(record, count=seen.messages, detail=detail))


def _at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
