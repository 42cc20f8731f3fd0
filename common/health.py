"""A job's health at an instant, from its spec and its recorded state. Pure: ``now`` is an argument."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from common.cron import next_fire
from common.jobs import JobSpec
from common.messages import RunStatus


class Health(enum.StrEnum):
    """What an operator needs to know about a job at a glance."""

    OK = "ok"
    RUNNING = "running"
    FAILING = "failing"
    LATE = "late"
    WAITING = "waiting"
    PAUSED = "paused"


@dataclass(frozen=True)
class JobState:
    """What the monitor has recorded of a job (a row of ``job_state``, or nothing yet)."""

    last_status: str | None = None
    last_started_at: datetime | None = None
    last_finished_at: datetime | None = None
    next_expected_at: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    """A job's health, why, and when its next run is due."""

    health: Health
    reason: str
    due_at: datetime | None


def judge(spec: JobSpec, state: JobState, since: datetime, now: datetime) -> Verdict:
    """The health of ``spec`` at ``now``, given its recorded ``state``.

    ``since`` is when the job was last applied: a job that never ran is expected from its first
    fire after that. A run is late once its due time plus the grace period has passed.
    """
    if not spec.enabled:
        return Verdict(Health.PAUSED, "disabled", None)
    due = state.next_expected_at or next_fire(spec.schedule, spec.zone(), since)
    overdue = now > due + timedelta(seconds=spec.grace_seconds)
    if state.last_status == RunStatus.RUNNING.value:
        limit = (state.last_started_at or now) + timedelta(seconds=spec.timeout_seconds + spec.grace_seconds)
        if now > limit:
            return Verdict(Health.LATE, "running longer than its timeout", due)
        return Verdict(Health.RUNNING, "running now", due)
    if overdue:
        return Verdict(Health.LATE, f"no run since it was due at {due.isoformat()}", due)
    if state.last_status is None:
        return Verdict(Health.WAITING, "no run yet", due)
    if state.last_status != RunStatus.SUCCEEDED.value:
        return Verdict(Health.FAILING, f"last run {state.last_status}", due)
    return Verdict(Health.OK, "last run succeeded", due)
