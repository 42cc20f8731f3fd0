"""Recording events in the store, idempotently: a redelivered event changes nothing.

A batch of events is recorded inside the caller's transaction with a handful of statements:
the runs and job states it touches are read with one query each, the specs of its jobs once,
each job's next expected time is computed once per batch, and everything is flushed once.

In the same transaction, each new run event and job heartbeat is fed to the job's health machine
(``monitor.health``): its record is advanced and stored, with its flips. A run finished as
``duplicate`` (a repeated trigger that was not executed) is recorded but not fed to it. A
``run.finished`` for a run the monitor marked ``lost`` (``monitor.fleet_watch``) is recorded over
``lost``: the run did end, and that is what it did. A job
unknown to the store, or stored with a spec this cronfleet refuses, has no health record; its
runs are still recorded.

An event that reuses a recorded id for something else (a heartbeat id with another job, kind,
instant or content; a run id of another job or trigger) changes nothing and is reported as a
conflict, for the caller to dead-letter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeGuard

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from common.cron import next_fire
from common.messages import (
    Event,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
)
from common.store import HeartbeatRow, JobStateRow, RunRow
from monitor.health import HealthInput, health_input
from monitor.health_store import Advanced, HealthBatch, StoredSpec, read_specs

log = logging.getLogger("cronfleet.monitor")

_HEARTBEAT_STATUS = {HeartbeatKind.SUCCESS: RunStatus.SUCCEEDED, HeartbeatKind.FAIL: RunStatus.FAILED}
# Finished runs that say nothing about a job's health: ``duplicate``, a repeated trigger the
# worker recognised and did not execute. They are recorded like any run, but not fed to the
# machine.
_NOT_HEALTH_STATUSES = frozenset({RunStatus.DUPLICATE})


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


@dataclass
class _Batch:
    """What one batch reads and writes: runs and job states by key, and due times to compute."""

    session: AsyncSession
    now: datetime
    runs: dict[str, RunRow] = field(default_factory=dict)
    states: dict[str, JobStateRow] = field(default_factory=dict)
    due_after: dict[str, datetime] = field(default_factory=dict)

    async def load(self, events: Sequence[Event]) -> None:
        run_ids = {e.run_id for e in events if isinstance(e, RunStarted | RunFinished)}
        if run_ids:
            rows = await self.session.execute(select(RunRow).where(RunRow.run_id.in_(run_ids)))
            self.runs = {row.run_id: row for row in rows.scalars()}
        jobs = {e.job for e in events if isinstance(e, RunStarted | RunFinished | JobHeartbeat)}
        if jobs:
            states = await self.session.execute(select(JobStateRow).where(JobStateRow.job.in_(jobs)))
            self.states = {state.job: state for state in states.scalars()}

    def add_run(self, run: RunRow) -> RunRow:
        self.session.add(run)
        self.runs[run.run_id] = run
        return run

    def state(self, job: str) -> JobStateRow:
        """``job``'s state row, created if the monitor has never seen the job."""
        state = self.states.get(job)
        if state is None:
            state = JobStateRow(job=job, consecutive_failures=0, updated_at=self.now)
            self.session.add(state)
            self.states[job] = state
        return state

    def start(self, run: RunRow) -> bool:
        """Make ``run`` its job's current run, unless a later one has already begun."""
        state = self.state(run.job)
        if state.last_started_at is not None and run.started_at < state.last_started_at:
            return False
        state.last_run_id = run.run_id
        state.last_status = run.status
        state.last_started_at = run.started_at
        state.updated_at = self.now
        return True

    def finish(self, run: RunRow, due_after: datetime) -> None:
        """Make ``run`` its job's last run, unless a later one has already begun."""
        if not self.start(run):
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
            self.states[job].next_expected_at = (
                None if spec is None else next_fire(spec.schedule, spec.zone(), after)
            )


async def record_batch(session: AsyncSession, events: Sequence[Event], now: datetime) -> BatchOutcome:
    """Record ``events`` in order; say how many changed something (the rest were repeats or
    conflicts) and which conflicted with what is recorded.

    Process heartbeats carry no run: they are accepted and change nothing.
    """
    batch = _Batch(session, now)
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
                changed = await _job_heartbeat(batch, event)
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
    await session.flush()
    health = HealthBatch(session, now)
    await health.load({job for job, _input in health_inputs}, specs)
    for job, event_input in health_inputs:
        health.advance(job, event_input)
    return BatchOutcome(recorded, conflicts, await health.save())


def feeds_health(event: Event) -> TypeGuard[RunStarted | RunFinished | JobHeartbeat]:
    """Whether ``event`` is an input of its job's health machine: a run that started or finished
    (but not one whose status is in ``_NOT_HEALTH_STATUSES``) or a job heartbeat."""
    if isinstance(event, RunFinished):
        return event.status not in _NOT_HEALTH_STATUSES
    return isinstance(event, RunStarted | JobHeartbeat)


def _run_conflict(run: RunRow, event: RunStarted | RunFinished) -> Conflict | None:
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
        RunRow(
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
        run = batch.add_run(RunRow(run_id=event.run_id, source="worker"))
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
    if event.status not in _NOT_HEALTH_STATUSES:
        # A repeat that was not run is history, not the job's latest run.
        batch.finish(run, due_after=max(event.scheduled_at, event.finished_at))
    return True


def _same_heartbeat(row: HeartbeatRow, event: JobHeartbeat) -> bool:
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


async def _rid_run(batch: _Batch, job: str, rid: str) -> RunRow | None:
    run_id = rid_run_id(job, rid)
    found = batch.runs.get(run_id)
    if found is None:
        found = await batch.session.get(RunRow, run_id)
        if found is not None:
            batch.runs[run_id] = found
    return found


async def _job_heartbeat(batch: _Batch, event: JobHeartbeat) -> bool | Conflict:
    session = batch.session
    await session.flush()  # earlier heartbeats of this batch must be visible to the queries below
    seen = await session.get(HeartbeatRow, event.id)
    if seen is not None:
        if _same_heartbeat(seen, event):
            return False
        return Conflict(f"heartbeat {event.id!r} is recorded with other content (job {seen.job!r})")
    own_run = f"hb:{event.id}"
    if own_run in batch.runs or await session.get(RunRow, own_run) is not None:
        return Conflict(f"run {own_run!r}, the run of heartbeat {event.id!r}, is already recorded")
    session.add(
        HeartbeatRow(
            id=event.id,
            job=event.job,
            kind=event.kind.value,
            exit_code=event.exit_code,
            at=event.at,
            message=event.message,
            rid=event.rid,
        )
    )
    if event.rid is not None:
        return await _rid_heartbeat(batch, event, event.rid)
    if event.kind is HeartbeatKind.START:
        started = batch.add_run(
            RunRow(
                run_id=f"hb:{event.id}",
                job=event.job,
                source="heartbeat",
                status=RunStatus.RUNNING.value,
                started_at=event.at,
            )
        )
        batch.start(started)
        return True
    run = await session.scalar(
        select(RunRow)
        .where(
            RunRow.job == event.job,
            RunRow.source == "heartbeat",
            RunRow.status == RunStatus.RUNNING.value,
            # A run opened with a rid is closed by its own rid only.
            RunRow.run_id.startswith("hb:"),
            RunRow.started_at <= event.at,
        )
        .order_by(RunRow.started_at.desc())
        .limit(1)
    )
    if run is None:
        run = batch.add_run(
            RunRow(run_id=f"hb:{event.id}", job=event.job, source="heartbeat", started_at=event.at)
        )
    _finish_heartbeat_run(batch, run, event)
    return True


def _finish_heartbeat_run(batch: _Batch, run: RunRow, event: JobHeartbeat) -> None:
    run.status = _HEARTBEAT_STATUS[event.kind].value
    run.finished_at = event.at
    run.duration_seconds = max(0.0, (event.at - run.started_at).total_seconds())
    run.exit_code = event.exit_code
    run.output_tail = event.message
    batch.finish(run, due_after=event.at)


async def _rid_heartbeat(batch: _Batch, event: JobHeartbeat, rid: str) -> bool:
    """A heartbeat with a ``rid``: its start and its finish are the same run (``rid_run_id``),
    whatever order they arrive in and whatever else the job reports meanwhile.

    A start opens the run (a repeated start changes nothing more); a start that arrives after
    its finish moves the run's start back to it (an earlier instant) and so gives it its
    duration. A finish closes the run, or records it as finished at once if its start has not
    arrived; a second finish for a finished run is a run of its own (``hb:<id>``)."""
    run = await _rid_run(batch, event.job, rid)
    if event.kind is HeartbeatKind.START:
        if run is None:
            started = batch.add_run(
                RunRow(
                    run_id=rid_run_id(event.job, rid),
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
    if run is None:
        run = batch.add_run(
            RunRow(run_id=rid_run_id(event.job, rid), job=event.job, source="heartbeat", started_at=event.at)
        )
    elif run.status != RunStatus.RUNNING.value:
        run = batch.add_run(
            RunRow(run_id=f"hb:{event.id}", job=event.job, source="heartbeat", started_at=event.at)
        )
    _finish_heartbeat_run(batch, run, event)
    return True
