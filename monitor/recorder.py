"""Recording events in the store, idempotently: a redelivered event changes nothing.

One call records one event inside the caller's transaction; the caller batches many.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from common.cron import next_fire
from common.jobs import spec_from_json
from common.messages import (
    Event,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
)
from common.store import HeartbeatRow, JobRow, JobStateRow, RunRow

log = logging.getLogger("cronfleet.monitor")

_HEARTBEAT_STATUS = {HeartbeatKind.SUCCESS: RunStatus.SUCCEEDED, HeartbeatKind.FAIL: RunStatus.FAILED}


async def record(session: AsyncSession, event: Event, now: datetime) -> bool:
    """Record ``event``; returns False when it had been recorded before (nothing changed)."""
    match event:
        case RunStarted():
            return await _run_started(session, event)
        case RunFinished():
            return await _run_finished(session, event, now)
        case JobHeartbeat():
            return await _job_heartbeat(session, event, now)
    return False  # process heartbeats carry no run; they are consumed and acked


async def _run_started(session: AsyncSession, event: RunStarted) -> bool:
    if await session.get(RunRow, event.run_id) is not None:
        return False
    session.add(
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
    await session.flush()
    return True


async def _run_finished(session: AsyncSession, event: RunFinished, now: datetime) -> bool:
    run = await session.get(RunRow, event.run_id)
    if run is not None and run.finished_at is not None:
        return False
    if run is None:
        run = RunRow(run_id=event.run_id, source="worker", started_at=event.started_at)
        session.add(run)
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
    await session.flush()
    await _update_state(session, run, due_after=max(event.scheduled_at, event.finished_at), now=now)
    return True


async def _job_heartbeat(session: AsyncSession, event: JobHeartbeat, now: datetime) -> bool:
    if await session.get(HeartbeatRow, event.id) is not None:
        return False
    session.add(
        HeartbeatRow(
            id=event.id,
            job=event.job,
            kind=event.kind.value,
            exit_code=event.exit_code,
            at=event.at,
            message=event.message,
        )
    )
    if event.kind is HeartbeatKind.START:
        session.add(
            RunRow(
                run_id=f"hb:{event.id}",
                job=event.job,
                source="heartbeat",
                status=RunStatus.RUNNING.value,
                started_at=event.at,
            )
        )
        await session.flush()
        return True
    run = await session.scalar(
        select(RunRow)
        .where(
            RunRow.job == event.job,
            RunRow.source == "heartbeat",
            RunRow.status == RunStatus.RUNNING.value,
            RunRow.started_at <= event.at,
        )
        .order_by(RunRow.started_at.desc())
        .limit(1)
    )
    if run is None:
        run = RunRow(run_id=f"hb:{event.id}", job=event.job, source="heartbeat", started_at=event.at)
        session.add(run)
    run.status = _HEARTBEAT_STATUS[event.kind].value
    run.finished_at = event.at
    run.duration_seconds = max(0.0, (event.at - run.started_at).total_seconds())
    run.exit_code = event.exit_code
    run.output_tail = event.message
    await session.flush()
    await _update_state(session, run, due_after=event.at, now=now)
    return True


async def _update_state(session: AsyncSession, run: RunRow, due_after: datetime, now: datetime) -> None:
    """Make ``run`` the job's last run unless a later one is already recorded."""
    state = await session.get(JobStateRow, run.job)
    if state is None:
        state = JobStateRow(job=run.job, consecutive_failures=0, updated_at=now)
        session.add(state)
    elif (
        state.last_finished_at is not None
        and run.finished_at is not None
        and run.finished_at < state.last_finished_at
    ):
        return
    state.last_run_id = run.run_id
    state.last_status = run.status
    state.last_started_at = run.started_at
    state.last_finished_at = run.finished_at
    succeeded = run.status == RunStatus.SUCCEEDED.value
    state.consecutive_failures = 0 if succeeded else (state.consecutive_failures or 0) + 1
    state.next_expected_at = await _next_expected(session, run.job, due_after)
    state.updated_at = now
    await session.flush()


async def _next_expected(session: AsyncSession, job: str, after: datetime) -> datetime | None:
    spec_json = await session.scalar(select(JobRow.spec).where(JobRow.name == job))
    if spec_json is None:
        return None
    spec = spec_from_json(spec_json)
    return next_fire(spec.schedule, spec.zone(), after)
