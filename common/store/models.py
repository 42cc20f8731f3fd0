"""Tables: jobs, fires (the scheduler's outbox), runs, heartbeats, job state, leases.

Instants are stored as naive UTC and read back as aware UTC, the same on SQLite and PostgreSQL.
These classes describe the schema at the newest migration (``common/store/migrations``); a change
here needs a new revision, and ``tests/integration/test_migrations.py`` fails until it has one.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
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


# Only the few fires still waiting for the broker: the outbox sweep reads them every second.
_UNPUBLISHED = text("published_at IS NULL")
Index("ix_fires_unpublished", FireRow.claimed_at, postgresql_where=_UNPUBLISHED, sqlite_where=_UNPUBLISHED)
Index("ix_fires_expires", FireRow.expires_at)


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


Index("ix_runs_job_started", RunRow.job, RunRow.started_at)
Index("ix_runs_started", RunRow.started_at)
Index("ix_runs_finished", RunRow.finished_at)


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


class LeaseRow(Base):
    """A named lease with a fencing epoch (scheduler leadership)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    epoch: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
