"""Recording events in the store, idempotently: a redelivered event changes nothing.

A batch of events is recorded inside the caller's transaction with a handful of statements,
whatever its size (each within ``common.store.chunks``' bounds): what it touches (runs, the
heartbeats it repeats, job states, the heartbeat runs it may finish) is read up front, one query
per kind; no event queries alone. Rows are plain values written back with Core statements (new
rows and changed ones through ``common.store.bulk``, in the driver's terms), not through the ORM's
unit of work. The specs of its jobs are read once per batch and parsed once per spec text
(``health_store``), and each job's next expected time comes from ``common.next_fires``, which needs no
croniter while the answer is the one it gave last for that schedule.

In the same transaction, each new run event and job heartbeat is fed to the job's health machine
(``monitor.health``): its record is advanced and stored, with its flips. A run finished as
``duplicate`` (a repeated trigger that was not executed) is recorded but not fed to it; one
finished ``skipped`` is fed to it (neither a success nor a failure) but does not become the job's
last run in ``job_state``, as a duplicate does not. A
``run.finished`` for a run the monitor marked ``lost`` (``monitor.fleet_watch``) is recorded over
``lost``: the run did end, and that is what it did. A job
unknown to the store, or stored with a spec this cronfleet refuses, has no health record; its
runs are still recorded.

Two monitors share the events queue, so events of one job can be in two batches at once: a
batch first takes its jobs' turn (``take_turn``), and reads them only once the other has written.

An event that reuses a recorded id for something else (a heartbeat id with another job, kind,
instant or content; a run id of another job or trigger) changes nothing and is reported as a
conflict, for the caller to dead-letter.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard, cast

import orjson
from sqlalchemy import ColumnElement, Table, and_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from common.messages import (
    Event,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
)
from common.next_fires import next_fires
from common.run_metrics import add_finished
from common.store import HeartbeatRow, JobStateRow, RunRow, bulk
from common.store.chunks import IN_LIST_CHUNK, chunks
from common.store.locks import dialect_of, take_sqlite_write_lock
from monitor.health import HealthInput, health_input
from monitor.health_store import Advanced, HealthBatch, StoredSpec, read_specs

log = logging.getLogger("cronfleet.monitor")

_HEARTBEAT_STATUS = {HeartbeatKind.SUCCESS: RunStatus.SUCCEEDED, HeartbeatKind.FAIL: RunStatus.FAILED}
# Finished runs that say nothing about a job's health: ``duplicate``, a repeated trigger the
# worker recognised and did not execute. They are recorded like any run, but not fed to the
# machine.
_NOT_HEALTH_STATUSES = frozenset({RunStatus.DUPLICATE})
# Finished runs that are history but not their job's latest run (``job_state``): those above, and
# ``skipped``, a fire that did not run (another run of the job was in flight, under the overlap
# policy). The health machine takes a skipped run as neither a success nor a failure; here it
# neither replaces the run in flight as the job's last run nor counts as a failure.
_NOT_LATEST_STATUSES = _NOT_HEALTH_STATUSES | {RunStatus.SKIPPED}


@dataclass(frozen=True)
class Conflict:
    """An event whose id is already recorded for something else: why, in one line."""

    detail: str


@dataclass(frozen=True)
class BatchOutcome:
    """What recording a batch did: how many events changed something, which conflicted (by
    their position in the batch), and what it did to the health of the jobs it touched."""

    recorded: int
    conflicts: dict[int, str]
    health: Advanced = field(default_factory=Advanced)


@dataclass(slots=True)
class _Run:
    """A row of ``runs`` as the batch reads and changes it (plain values, no ORM)."""

    run_id: str
    job: str
    source: str
    status: str
    started_at: datetime
    trigger_id: str | None = None
    pool: str | None = None
    worker: str | None = None
    redelivered: bool = False
    scheduled_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None
    exit_code: int | None = None
    http_status: int | None = None
    output_tail: str | None = None
    error: str | None = None
    result: str | None = None
    endpoint_request_id: str | None = None
    attempt: int = 1


@dataclass(slots=True)
class _State:
    """A row of ``job_state`` as the batch reads and changes it."""

    job: str
    updated_at: datetime
    consecutive_failures: int = 0
    last_run_id: str | None = None
    last_status: str | None = None
    last_started_at: datetime | None = None
    last_finished_at: datetime | None = None
    next_expected_at: datetime | None = None


@dataclass(slots=True)
class _Heartbeat:
    """A row of ``heartbeats``."""

    id: str
    job: str
    kind: str
    at: datetime
    exit_code: int | None = None
    message: str | None = None
    rid: str | None = None


_RUNS = cast(Table, RunRow.__table__)
_HEARTBEATS = cast(Table, HeartbeatRow.__table__)
_STATES = cast(Table, JobStateRow.__table__)
# Each table's columns, which the row classes above must match (checked at import).
_COLUMNS: dict[Table, tuple[str, ...]] = {
    table: tuple(column.key for column in table.columns) for table in (_RUNS, _HEARTBEATS, _STATES)
}
for _table, _model in ((_RUNS, _Run), (_HEARTBEATS, _Heartbeat), (_STATES, _State)):
    if set(_COLUMNS[_table]) != set(_model.__dataclass_fields__):
        raise RuntimeError(f"monitor.recorder's {_model.__name__} does not match the table {_table.name}")


def open_heartbeat_runs(jobs: Sequence[str], latest: datetime) -> ColumnElement[bool]:
    """The heartbeat runs of ``jobs`` still running that started no later than ``latest``, opened
    without a rid (one opened with a rid is closed by its own rid only). Read through
    ``ix_runs_job_running``: the runs still going, not every run of the job ever kept."""
    return and_(
        _RUNS.c.job.in_(jobs),
        _RUNS.c.status == RunStatus.RUNNING.value,
        _RUNS.c.started_at <= latest,
        _RUNS.c.source == "heartbeat",
        _RUNS.c.run_id.startswith("hb:"),
    )


def _row_values(table: Table, row: Any) -> dict[str, Any]:
    """Every column of ``table`` from ``row`` (a ``_Run``, ``_State`` or ``_Heartbeat``)."""
    return {key: getattr(row, key) for key in _COLUMNS[table]}


async def _read(session: AsyncSession, table: Table, model: Any, where: Any) -> list[Any]:
    """The rows of ``table`` matching ``where``, as ``model`` objects: plain values the batch
    changes freely, written back with Core statements (no ORM unit of work)."""
    rows = await session.execute(select(*table.columns).where(where))
    return [model(**row._asdict()) for row in rows]


@dataclass
class _Batch:
    """What one batch reads and writes: runs, heartbeats and job states by key (plain values,
    nothing in the session), and due times to compute. ``save`` writes what is new
    or changed with a few statements of bounded size."""

    session: AsyncSession
    now: datetime
    runs: dict[str, _Run] = field(default_factory=dict)
    states: dict[str, _State] = field(default_factory=dict)
    due_after: dict[str, datetime] = field(default_factory=dict)
    # Runs this batch recorded as finished, for the metrics rollup (``common.run_metrics``).
    finished: list[_Run] = field(default_factory=list)
    heartbeats: dict[str, _Heartbeat] = field(default_factory=dict)
    open_heartbeat_runs: dict[str, list[_Run]] = field(default_factory=dict)
    # What was read, as read (to write back only what changed), and what is new.
    _as_read: dict[tuple[Table, str], dict[str, Any]] = field(default_factory=dict)
    _new: dict[Table, list[Any]] = field(default_factory=dict)

    async def load(self, events: Sequence[Event]) -> None:
        """Read, in bounded statements, everything the batch's events can touch: their runs
        (a heartbeat's own run included), their heartbeats, their jobs' states and the heartbeat
        runs still open that a heartbeat of the batch may finish."""
        session = self.session
        run_ids = {e.run_id for e in events if isinstance(e, RunStarted | RunFinished)}
        heartbeats = [e for e in events if isinstance(e, JobHeartbeat)]
        run_ids.update(f"hb:{e.id}" for e in heartbeats)
        run_ids.update(rid_run_id(e.job, e.rid) for e in heartbeats if e.rid is not None)
        for some in chunks(sorted(run_ids), IN_LIST_CHUNK):
            for run in await _read(session, _RUNS, _Run, _RUNS.c.run_id.in_(some)):
                self._keep(_RUNS, run.run_id, run)
                self.runs[run.run_id] = run
        for some in chunks(sorted({e.id for e in heartbeats}), IN_LIST_CHUNK):
            for heartbeat in await _read(session, _HEARTBEATS, _Heartbeat, _HEARTBEATS.c.id.in_(some)):
                self.heartbeats[heartbeat.id] = heartbeat
        jobs = {e.job for e in events if isinstance(e, RunStarted | RunFinished | JobHeartbeat)}
        for some in chunks(sorted(jobs), IN_LIST_CHUNK):
            for state in await _read(session, _STATES, _State, _STATES.c.job.in_(some)):
                self._keep(_STATES, state.job, state)
                self.states[state.job] = state
        # The heartbeat runs a success or fail of this batch may end: those still running that
        # started no later than the latest such heartbeat.
        ending: dict[str, datetime] = {}
        for e in heartbeats:
            if e.kind is not HeartbeatKind.START and e.rid is None:
                ending[e.job] = max(e.at, ending.get(e.job, e.at))
        latest = max(ending.values(), default=self.now)
        for some in chunks(sorted(ending), IN_LIST_CHUNK):
            for run in await _read(session, _RUNS, _Run, open_heartbeat_runs(some, latest)):
                if run.run_id not in self.runs:
                    self._keep(_RUNS, run.run_id, run)
                    self.runs[run.run_id] = run
                self.open_heartbeat_runs.setdefault(run.job, []).append(self.runs[run.run_id])

    def _keep(self, table: Table, key: str, row: Any) -> None:
        self._as_read[(table, key)] = _row_values(table, row)

    def add(self, table: Table, row: Any) -> None:
        """Insert ``row`` (a ``_Run``, ``_Heartbeat`` or ``_State`` of ``table``) when the batch
        is saved."""
        self._new.setdefault(table, []).append(row)

    async def save(self) -> None:
        """Insert what is new and write back what changed (``common.store.bulk``)."""
        for table in (_RUNS, _HEARTBEATS, _STATES):
            inserted = [_row_values(table, row) for row in self._new.get(table, [])]
            if inserted:
                await bulk.insert_rows(self.session, table, inserted)
        for table, rows, key in ((_RUNS, self.runs, "run_id"), (_STATES, self.states, "job")):
            changed = []
            for name, row in rows.items():
                before = self._as_read.get((table, name))
                if before is not None:
                    values = _row_values(table, row)
                    if values != before:
                        changed.append(values)
            if changed:
                await bulk.update_rows(self.session, table, key, changed)

    def open_heartbeat_run(self, job: str, at: datetime) -> _Run | None:
        """The latest heartbeat run of ``job`` still running that started at or before ``at``."""
        best: _Run | None = None
        for run in self.open_heartbeat_runs.get(job, ()):
            if run.status != RunStatus.RUNNING.value or run.started_at > at:
                continue
            if best is None or run.started_at > best.started_at:
                best = run
        return best

    def add_run(self, run: _Run) -> _Run:
        self.add(_RUNS, run)
        self.runs[run.run_id] = run
        return run

    def state(self, job: str) -> _State:
        """``job``'s state row, created if the monitor has never seen the job."""
        state = self.states.get(job)
        if state is None:
            state = _State(job=job, updated_at=self.now)
            self.add(_STATES, state)
            self.states[job] = state
        return state

    def start(self, run: _Run) -> bool:
        """Make ``run`` its job's current run, unless a later one has already begun."""
        state = self.state(run.job)
        if state.last_started_at is not None and run.started_at < state.last_started_at:
            return False
        state.last_run_id = run.run_id
        state.last_status = run.status
        state.last_started_at = run.started_at
        state.updated_at = self.now
        return True

    def finish(self, run: _Run, due_after: datetime) -> None:
        """Make ``run`` its job's last run, unless a later one has already begun; either way,
        its end moves the job's next expected time on (never back)."""
        if not self.start(run):
            # A later run began before this one's end was recorded (overlapping runs, or events
            # recorded out of order): this run is history, but a job whose runs always overlap
            # must still get a next expected time.
            state = self.states[run.job]
            if state.next_expected_at is None or state.next_expected_at <= due_after:
                self.due_after[run.job] = max(self.due_after.get(run.job, due_after), due_after)
            return
        state = self.states[run.job]
        state.last_finished_at = run.finished_at
        succeeded = run.status == RunStatus.SUCCEEDED.value
        state.consecutive_failures = 0 if succeeded else (state.consecutive_failures or 0) + 1
        self.due_after[run.job] = due_after

    def compute_due_times(self, specs: dict[str, StoredSpec]) -> None:
        """Each finished job's next expected time, once per job, from its current schedule (none
        for a job unknown to the store or stored with a spec this cronfleet refuses)."""
        for job, after in self.due_after.items():
            stored = specs.get(job)
            spec = None if stored is None else stored.spec
            self.states[job].next_expected_at = None if spec is None else next_fires.after(spec, after)


async def record_batch(session: AsyncSession, events: Sequence[Event], now: datetime) -> BatchOutcome:
    """Record ``events`` in order; say how many changed something (the rest were repeats or
    conflicts) and which conflicted with what is recorded.

    Process heartbeats carry no run: they are accepted and change nothing.
    """
    batch = _Batch(session, now)
    await take_turn(
        session, {e.job for e in events if isinstance(e, RunStarted | RunFinished | JobHeartbeat)}
    )
    await batch.load(events)
    recorded = 0
    conflicts: dict[int, str] = {}
    health_inputs: list[tuple[str, HealthInput]] = []
    for position, event in enumerate(events):
        changed: bool | Conflict
        match event:
            case RunStarted():
                changed = _run_started(batch, event)
            case RunFinished():
                changed = _run_finished(batch, event)
            case JobHeartbeat():
                changed = _job_heartbeat(batch, event)
            case _:
                changed = False
        if isinstance(changed, Conflict):
            conflicts[position] = changed.detail
        else:
            recorded += changed
            if changed and feeds_health(event):
                # Only what is new: a repeated event was fed to the machine when first recorded.
                health_inputs.append((event.job, health_input(event)))
    jobs = set(batch.due_after) | {job for job, _input in health_inputs}
    specs = await read_specs(session, jobs) if jobs else {}
    batch.compute_due_times(specs)
    await batch.save()
    await add_finished(session, batch.finished)
    health = HealthBatch(session, now)
    await health.load({job for job, _input in health_inputs}, specs)
    for job, event_input in health_inputs:
        health.advance(job, event_input)
    return BatchOutcome(recorded, conflicts, await health.save())


async def take_turn(session: AsyncSession, jobs: Collection[str]) -> None:
    """Hold ``jobs`` until the transaction ends, before anything of theirs is read: two monitors
    recording events of the same job at once (a run's start in one's batch, its end in the
    other's) take turns, the second reading what the first wrote. Read first, the second inserted
    the run and the job's state again (a unique violation) or wrote over the first's changes.

    PostgreSQL: a transaction advisory lock per job, taken in key order (two batches sharing jobs
    wait for each other, never in a cycle; a deadlock would still be retried as an outage). A
    batch holds at most 500 events, so at most 500 such locks, well within the server's shared
    lock table (64 per allowed connection by default, shared by all of them).
    SQLite: its one write lock, taken now rather than at the first write."""
    if not jobs:
        return
    if dialect_of(session) == "postgresql":
        keys = sorted({_job_lock_key(job) for job in jobs})
        await session.execute(_TAKE_JOB_LOCKS, {"space": _JOB_LOCKS, "keys": keys})
    else:
        await take_sqlite_write_lock(session)


# The key space of the jobs' advisory locks (the two-key form: apart from the one-key locks of
# the schema upgrade and the fleet watch), and the lock of one job in it.
_JOB_LOCKS = 0x6A6F62  # "job"
_TAKE_JOB_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock(:space, key)) FROM unnest(CAST(:keys AS integer[])) AS key"
)


def _job_lock_key(job: str) -> int:
    """A stable 32-bit key of ``job`` (two jobs may share one: they then take turns too)."""
    return int.from_bytes(hashlib.blake2b(job.encode(), digest_size=4).digest(), "big", signed=True)


def feeds_health(event: Event) -> TypeGuard[RunStarted | RunFinished | JobHeartbeat]:
    """Whether ``event`` is an input of its job's health machine: a run that started or finished
    (but not one whose status is in ``_NOT_HEALTH_STATUSES``) or a job heartbeat."""
    if isinstance(event, RunFinished):
        return event.status not in _NOT_HEALTH_STATUSES
    return isinstance(event, RunStarted | JobHeartbeat)


def _run_conflict(run: _Run, event: RunStarted | RunFinished) -> Conflict | None:
    """Whether ``event`` claims ``run``'s id for another job or trigger."""
    if run.job == event.job and run.trigger_id == event.trigger_id:
        return None
    return Conflict(
        f"run {event.run_id!r} is recorded for job {run.job!r}, trigger {run.trigger_id!r}, "
        f"not job {event.job!r}, trigger {event.trigger_id!r}"
    )


def _run_started(batch: _Batch, event: RunStarted) -> bool | Conflict:
    run = batch.runs.get(event.run_id)
    if run is not None:
        return _run_conflict(run, event) or False
    run = batch.add_run(
        _Run(
            run_id=event.run_id,
            trigger_id=event.trigger_id,
            job=event.job,
            source="worker",
            pool=event.pool,
            worker=event.worker,
            redelivered=event.redelivered,
            status=RunStatus.RUNNING.value,
            scheduled_at=event.scheduled_at,
            started_at=event.started_at,
            attempt=event.attempt,
        )
    )
    batch.start(run)
    return True


def _run_finished(batch: _Batch, event: RunFinished) -> bool | Conflict:
    run = batch.runs.get(event.run_id)
    if run is not None and (conflict := _run_conflict(run, event)) is not None:
        return conflict
    if run is not None and run.finished_at is not None and run.status != RunStatus.LOST.value:
        return False
    # A run the monitor marked lost (its worker went silent) that did finish after all: its
    # real end is recorded over ``lost``.
    if run is None:
        run = batch.add_run(
            _Run(
                run_id=event.run_id,
                job=event.job,
                source="worker",
                status=event.status.value,
                started_at=event.started_at,
            )
        )
    run.trigger_id = event.trigger_id
    run.job = event.job
    run.pool = event.pool
    run.worker = event.worker
    run.redelivered = event.redelivered
    run.scheduled_at = event.scheduled_at
    run.started_at = event.started_at
    run.finished_at = event.finished_at
    run.duration_seconds = event.duration_seconds
    run.status = event.status.value
    run.exit_code = event.exit_code
    run.http_status = event.http_status
    run.output_tail = event.output_tail
    run.error = event.error
    run.result = None if event.result is None else orjson.dumps(event.result).decode()
    run.endpoint_request_id = event.endpoint_request_id
    run.attempt = event.attempt
    batch.finished.append(run)
    if event.status not in _NOT_LATEST_STATUSES:
        # A repeat, or a fire skipped, is history, not the job's latest run.
        batch.finish(run, due_after=max(event.scheduled_at, event.finished_at))
    return True


def _same_heartbeat(row: _Heartbeat, event: JobHeartbeat) -> bool:
    return (row.job, row.kind, row.at, row.exit_code, row.message, row.rid) == (
        event.job,
        event.kind.value,
        event.at,
        event.exit_code,
        event.message,
        event.rid,
    )


def rid_run_id(job: str, rid: str) -> str:
    """The run id of ``job``'s heartbeat run linked by ``rid`` (its start and finish share it)."""
    return f"rid:{job}:{rid}"


def _job_heartbeat(batch: _Batch, event: JobHeartbeat) -> bool | Conflict:
    seen = batch.heartbeats.get(event.id)
    if seen is not None:
        if _same_heartbeat(seen, event):
            return False
        return Conflict(f"heartbeat {event.id!r} is recorded with other content (job {seen.job!r})")
    own_run = f"hb:{event.id}"
    if own_run in batch.runs:
        return Conflict(f"run {own_run!r}, the run of heartbeat {event.id!r}, is already recorded")
    heartbeat = _Heartbeat(
        id=event.id,
        job=event.job,
        kind=event.kind.value,
        exit_code=event.exit_code,
        at=event.at,
        message=event.message,
        rid=event.rid,
    )
    batch.add(_HEARTBEATS, heartbeat)
    batch.heartbeats[event.id] = heartbeat
    if event.rid is not None:
        return _rid_heartbeat(batch, event, event.rid)
    if event.kind is HeartbeatKind.START:
        started = batch.add_run(
            _Run(
                run_id=own_run,
                job=event.job,
                source="heartbeat",
                status=RunStatus.RUNNING.value,
                started_at=event.at,
            )
        )
        batch.open_heartbeat_runs.setdefault(event.job, []).append(started)
        batch.start(started)
        return True
    run = batch.open_heartbeat_run(event.job, event.at)
    if run is None:
        run = batch.add_run(
            _Run(
                run_id=own_run,
                job=event.job,
                source="heartbeat",
                status=_HEARTBEAT_STATUS[event.kind].value,
                started_at=event.at,
            )
        )
    _finish_heartbeat_run(batch, run, event)
    return True


def _finish_heartbeat_run(batch: _Batch, run: _Run, event: JobHeartbeat) -> None:
    run.status = _HEARTBEAT_STATUS[event.kind].value
    run.finished_at = event.at
    run.duration_seconds = max(0.0, (event.at - run.started_at).total_seconds())
    run.exit_code = event.exit_code
    run.output_tail = event.message
    batch.finished.append(run)
    batch.finish(run, due_after=event.at)


def _rid_heartbeat(batch: _Batch, event: JobHeartbeat, rid: str) -> bool:
    """A heartbeat with a ``rid``: its start and its finish are the same run (``rid_run_id``),
    whatever order they arrive in and whatever else the job reports meanwhile.

    A start opens the run (a repeated start changes nothing more); a start that arrives after
    its finish moves the run's start back to it (an earlier instant) and so gives it its
    duration. A finish closes the run, or records it as finished at once if its start has not
    arrived; a second finish for a finished run is a run of its own (``hb:<id>``)."""
    run_id = rid_run_id(event.job, rid)
    run = batch.runs.get(run_id)
    if event.kind is HeartbeatKind.START:
        if run is None:
            started = batch.add_run(
                _Run(
                    run_id=run_id,
                    job=event.job,
                    source="heartbeat",
                    status=RunStatus.RUNNING.value,
                    started_at=event.at,
                )
            )
            batch.start(started)
        elif run.finished_at is not None and event.at < run.started_at:
            run.started_at = event.at
            run.duration_seconds = max(0.0, (run.finished_at - event.at).total_seconds())
        return True
    status = _HEARTBEAT_STATUS[event.kind].value
    if run is None:
        run = batch.add_run(
            _Run(run_id=run_id, job=event.job, source="heartbeat", status=status, started_at=event.at)
        )
    elif run.status != RunStatus.RUNNING.value:
        run = batch.add_run(
            _Run(
                run_id=f"hb:{event.id}", job=event.job, source="heartbeat", status=status, started_at=event.at
            )
        )
    _finish_heartbeat_run(batch, run, event)
    return True
