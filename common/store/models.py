"""Tables: jobs (with their change counter and removals), fires (the scheduler's outbox), runs,
missed fires, heartbeats, job state, job health and its flips (with their alerts' outbox), alert attempts, run
metrics, leases, trigger claims, fleet health, API keys, ping keys.

Instants are stored as naive UTC and read back as aware UTC, the same on SQLite and PostgreSQL.
These classes describe the schema at the newest migration (``common/store/migrations``); a change
here needs a new revision, and ``tests/integration/test_migrations.py`` fails until it has one.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from common.messages import HeartbeatKind, RunStatus


def _one_of(column: str, values: type[enum.StrEnum] | tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime in, an aware UTC datetime out; naive UTC in the column."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("store instants must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of every cronfleet table."""


class JobRow(Base):
    """A job as last applied: its spec as canonical JSON plus the columns queries need."""

    __tablename__ = "jobs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(32))
    pool: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Whether a scheduler plans the job (enabled, with an action), and its next fire instant,
    # computed when the job is applied and again when a scheduler fires it: a scheduler starts on
    # (name, next_fire_at) and reads a job's spec only when the job falls due. None when the job
    # is not planned, or was stored before this column (a scheduler computes it from the spec).
    planned: Mapped[bool] = mapped_column(Boolean, default=False)
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The ``JobsVersionRow.version`` of the write that last changed this job's spec: a scheduler
    # re-reads only the jobs whose version is above the one it has seen.
    version: Mapped[int] = mapped_column(BigInteger, default=0)


Index("ix_jobs_next_fire", JobRow.next_fire_at)
Index("ix_jobs_version", JobRow.version)


class JobsVersionRow(Base):
    """The jobs' change counter (one row, ``id`` 1): every write that adds, changes or removes
    jobs takes the next version and stamps it on what it wrote. Its row lock orders the writers,
    so versions become visible in the order they were taken."""

    __tablename__ = "jobs_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


class JobRemovalRow(Base):
    """A removed job (a tombstone): its name and the version of the write that removed it, so that
    a scheduler reading changes since a version learns of removals too."""

    __tablename__ = "job_removals"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


Index("ix_job_removals_version", JobRemovalRow.version)


class FireRow(Base):
    """A fire time claimed by a scheduler: at most one per (job, scheduled time), which is what
    the trigger id says (``job@scheduled-time``)."""

    __tablename__ = "fires"

    trigger_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job: Mapped[str] = mapped_column(String(64))
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str] = mapped_column(String(200))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    pool: Mapped[str] = mapped_column(String(64))
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    body: Mapped[str] = mapped_column(Text)
    # When the fire was meant to go out: its instant plus its job's jitter offset, or, for one
    # caught up after downtime, when it was claimed. None: ``scheduled_at`` (fires claimed before
    # this column). The fire lag counts from it.
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


# Only the few fires still waiting for the broker: the outbox sweep reads them every second.
_UNPUBLISHED = text("published_at IS NULL")
Index("ix_fires_unpublished", FireRow.claimed_at, postgresql_where=_UNPUBLISHED, sqlite_where=_UNPUBLISHED)
Index("ix_fires_expires", FireRow.expires_at)


class MissedFireRow(Base):
    """A job's fires that no scheduler sent on time (none ran, or none could reach the store or
    the broker), settled by the job's misfire policy: one row per job and backlog. Two
    schedulers settling the same backlog write it once (the key is its first missed fire)."""

    __tablename__ = "missed_fires"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_missed: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    last_missed: Mapped[datetime] = mapped_column(UTCDateTime)
    policy: Mapped[str] = mapped_column(String(8))
    # Fires of the backlog not sent (a lower bound when not ``counted_all``), and sent late.
    skipped: Mapped[int] = mapped_column(BigInteger)
    counted_all: Mapped[bool] = mapped_column(Boolean)
    caught_up: Mapped[int] = mapped_column(Integer)
    recorded_by: Mapped[str] = mapped_column(String(200))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


Index("ix_missed_fires_recorded", MissedFireRow.recorded_at)


RUN_SOURCES = ("worker", "heartbeat")


class RunRow(Base):
    """One execution of a job (by a worker), or one start/finish reported by heartbeats."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_one_of("status", RunStatus), name="ck_runs_status"),
        CheckConstraint(_one_of("source", RUN_SOURCES), name="ck_runs_source"),
    )

    # Worker runs use the run id of their events; heartbeat runs "hb:" + the heartbeat id.
    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    trigger_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    job: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    pool: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    redelivered: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    duration_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A python action's return value, as JSON text; an http endpoint's own id for the request.
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    endpoint_request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Which attempt at its trigger the run is: 1, or more for a retry (``retries``).
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


Index("ix_runs_job_started", RunRow.job, RunRow.started_at)
Index("ix_runs_started", RunRow.started_at)
Index("ix_runs_finished", RunRow.finished_at)
# Only the runs still going, by worker: the monitor marks a dead worker's runs lost through it.
_RUNNING = text("status = 'running'")
Index("ix_runs_worker_running", RunRow.worker, postgresql_where=_RUNNING, sqlite_where=_RUNNING)
# Only the runs still going, by job: the heartbeat runs a success or fail may end. Through
# ix_runs_job_started that read went over every run of the job in the store.
Index("ix_runs_job_running", RunRow.job, RunRow.started_at, postgresql_where=_RUNNING, sqlite_where=_RUNNING)


class HeartbeatRow(Base):
    """A job heartbeat, kept once by its producer-chosen id."""

    __tablename__ = "heartbeats"
    __table_args__ = (CheckConstraint(_one_of("kind", HeartbeatKind), name="ck_heartbeats_kind"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    rid: Mapped[str | None] = mapped_column(String(64), nullable=True)


Index("ix_heartbeats_at", HeartbeatRow.at)


class JobStateRow(Base):
    """What the monitor knows of a job now: its last run and when the next one is due."""

    __tablename__ = "job_state"
    __table_args__ = (
        CheckConstraint(
            f"last_status IS NULL OR {_one_of('last_status', RunStatus)}", name="ck_job_state_last_status"
        ),
    )

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    last_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_expected_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The states of monitor/health.py's machine (``State``; common cannot import monitor, and a test
# checks that the two agree), and those among them that are alarms.
# A flip's alert (the outbox, ``FlipRow.alert``) and the kinds of alert an attempt delivers.
ALERT_STATES = ("pending", "done")
ALERT_KINDS = ("alarm", "recovery", "test")
HEALTH_STATES = ("new", "up", "running", "late", "down", "failing", "stuck", "paused")
ALARM_STATES = ("down", "failing", "stuck")


class JobHealthRow(Base):
    """A job's health as the monitor keeps it: a ``monitor.health.HealthRecord``, plus the
    fingerprint of the spec it follows (a job whose fingerprint differs changed since)."""

    __tablename__ = "job_health"
    __table_args__ = (
        CheckConstraint(_one_of("state", HEALTH_STATES), name="ck_job_health_state"),
        CheckConstraint(
            f"open_alarm IS NULL OR {_one_of('open_alarm', ALARM_STATES)}", name="ck_job_health_open_alarm"
        ),
    )

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer)
    open_alarm: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lost_run_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    fingerprint: Mapped[str | None] = mapped_column(String(32), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The monitor's timers are rebuilt from it at start, and it finds what falls due next by it;
# with the job in it, both read the index alone.
Index("ix_job_health_deadline", JobHealthRow.deadline_at, JobHealthRow.job)


class FlipRow(Base):
    """One change of a job's health state: when, from what, to what, and why."""

    __tablename__ = "flips"
    __table_args__ = (
        CheckConstraint(_one_of("from_state", HEALTH_STATES), name="ck_flips_from_state"),
        CheckConstraint(_one_of("to_state", HEALTH_STATES), name="ck_flips_to_state"),
        CheckConstraint(
            f"recovered_from IS NULL OR {_one_of('recovered_from', ALARM_STATES)}",
            name="ck_flips_recovered_from",
        ),
        CheckConstraint(f"alert IS NULL OR {_one_of('alert', ALERT_STATES)}", name="ck_flips_alert"),
    )

    # BIGINT on PostgreSQL (flips pile up); SQLite autoincrements only an INTEGER primary key.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    recovered_from: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The alert outbox: None for a flip nobody is told about, ``pending`` until every channel of
    # its route has a final attempt, then ``done``. A pending alert is being delivered by the
    # monitor that holds it until ``alert_lease_until`` (renewed while it tries); past it, any
    # monitor may claim it and deliver what is left.
    alert: Mapped[str | None] = mapped_column(String(16), nullable=True)
    alert_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


Index("ix_flips_job_at", FlipRow.job, FlipRow.at)
Index("ix_flips_at", FlipRow.at)
# Only the few alerts still pending: every monitor looks for expired leases among them.
_PENDING_ALERT = text("alert = 'pending'")
Index(
    "ix_flips_alert_pending",
    FlipRow.alert_lease_until,
    postgresql_where=_PENDING_ALERT,
    sqlite_where=_PENDING_ALERT,
)


class AlertAttemptRow(Base):
    """One try at delivering an alert to one channel (``monitor.channels.Attempt``).

    ``flip_id``: the flip it tells (None for ``cronfleet alerts test``); ``alert_id``: the id the
    receiver sees (``flip-42``, the same on every attempt and channel). ``attempt``: 1 for the
    first try; 0 when the alert was not tried (queue full, monitor stopping). ``final``: no
    further attempt follows on this channel; ``retry_at``: when the next one is due.
    """

    __tablename__ = "alert_attempts"
    __table_args__ = (CheckConstraint(_one_of("kind", ALERT_KINDS), name="ck_alert_attempts_kind"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    flip_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), nullable=True, index=True
    )
    alert_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    job: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    final: Mapped[bool] = mapped_column(Boolean)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


# ``cronfleet alerts`` lists newest first (of one job); retention deletes by age.
Index("ix_alert_attempts_at", AlertAttemptRow.at)
Index("ix_alert_attempts_job_at", AlertAttemptRow.job, AlertAttemptRow.at)


RUN_METRIC_RESOLUTIONS = ("hour", "day")


class RunMetricRow(Base):
    """Finished runs of a job rolled up per hour and per day (UTC, by the run's start): how many,
    how many did not succeed, and their durations' sum, count (runs with one) and maximum. Kept
    by the monitor as it records runs (``common.run_metrics``), read by the HTTP API."""

    __tablename__ = "run_metrics"
    __table_args__ = (
        CheckConstraint(_one_of("resolution", RUN_METRIC_RESOLUTIONS), name="ck_run_metrics_resolution"),
    )

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    resolution: Mapped[str] = mapped_column(String(8), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    runs: Mapped[int] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(BigInteger)
    duration_count: Mapped[int] = mapped_column(BigInteger)
    duration_sum: Mapped[float] = mapped_column(Float)
    duration_max: Mapped[float | None] = mapped_column(Float, nullable=True)


class LeaseRow(Base):
    """A named lease with a fencing epoch (scheduler leadership)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    epoch: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TriggerClaimRow(Base):
    """A trigger id taken by the run that executes it: the fleet runs each trigger once.

    A worker inserts the claim before it runs the job and keeps its lease alive while the job
    runs; the finished run's ``run.finished`` body is kept here so that a repeat of the trigger
    can report it again (if the first report was lost) instead of running the job again. A claim
    whose lease ran out unfinished belonged to a dead worker and is taken over.
    """

    __tablename__ = "trigger_claims"

    trigger_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(255))
    worker: Mapped[str] = mapped_column(String(200))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime] = mapped_column(UTCDateTime)
    trigger_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_event: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A run whose trigger was acked when it started (a long job, ``CRONFLEET_EARLY_ACK_SECONDS``)
    # keeps the trigger's signed body and its signature here: should its worker die, the broker
    # will not deliver it again, and the worker that finds the claim lapsed ends it from these.
    trigger_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    trigger_envelope: Mapped[str | None] = mapped_column(Text, nullable=True)
    # When the retry this claim's failed run called for was confirmed published. Until then the
    # lease (renewed by the run's end) says a live worker is publishing it; a repeat of the
    # attempt publishes it only when neither is so (``TriggerClaims.take_retry``).
    retry_published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


# Retention deletes claims by their trigger's expiry: after it, a repeat is refused as expired.
Index("ix_trigger_claims_expires", TriggerClaimRow.trigger_expires_at)
# Workers look for lapsed claims of long runs (acked early) every few seconds: only unfinished
# claims that keep their trigger are in this index, so the look costs nothing as claims pile up.
_UNFINISHED_KEPT = "finished_at IS NULL AND trigger_body IS NOT NULL"
Index(
    "ix_trigger_claims_kept_lease",
    TriggerClaimRow.lease_until,
    sqlite_where=text(_UNFINISHED_KEPT),
    postgresql_where=text(_UNFINISHED_KEPT),
)


class FleetHealthRow(Base):
    """A fleet component's health as the monitor keeps it (``monitor.fleet.ComponentRecord``):
    the schedulers, a pool, a worker or the dead-letter queue, under the name its flips carry
    (``@scheduler``, ``@pool:<name>``, ``@worker:<name>``, ``@dead-letters``)."""

    __tablename__ = "fleet_health"
    __table_args__ = (
        CheckConstraint(_one_of("state", ("new", "up", "down")), name="ck_fleet_health_state"),
        CheckConstraint(
            _one_of("kind", ("scheduler", "pool", "worker", "dead-letters")), name="ck_fleet_health_kind"
        ),
    )

    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    """A key of the monitor's HTTP API, kept as the SHA-256 of its secret (shown once, at birth).

    ``id`` is public (it is part of the key, to find the row); a revoked key stays listed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    read_only: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PingKeyRow(Base):
    """A ping key (``cronfleet keys ping-url``): the SHA-256 of a random token that may send the
    heartbeats of ``jobs`` (a JSON list of job names) through the monitor's ping URLs, and nothing
    else. The token itself is never stored; a revoked key stays listed, with ``revoked_at``."""

    __tablename__ = "ping_keys"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    jobs: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
