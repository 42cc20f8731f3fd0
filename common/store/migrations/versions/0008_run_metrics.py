"""Run metrics: finished runs rolled up per job and hour or day, filled from the runs already
recorded (one grouped INSERT ... SELECT per resolution, as the monitor will count them from now:
``duplicate``, ``lost`` and running runs left out).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)


def upgrade() -> None:
    op.create_table(
        "run_metrics",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("resolution", sa.String(length=8), nullable=False),
        sa.Column("bucket", Instant, nullable=False),
        sa.Column("runs", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.Column("duration_count", sa.BigInteger(), nullable=False),
        sa.Column("duration_sum", sa.Float(), nullable=False),
        sa.Column("duration_max", sa.Float(), nullable=True),
        sa.CheckConstraint("resolution IN ('hour', 'day')", name="ck_run_metrics_resolution"),
        sa.PrimaryKeyConstraint("job", "resolution", "bucket"),
    )

    _backfill()


def _backfill() -> None:
    runs = sa.table(
        "runs",
        sa.column("job", sa.String()),
        sa.column("status", sa.String()),
        sa.column("started_at", Instant),
        sa.column("finished_at", Instant),
        sa.column("duration_seconds", sa.Float()),
    )
    metrics = sa.table(
        "run_metrics",
        *(sa.column(name) for name in ("job", "resolution", "bucket", "runs", "failures")),
        *(sa.column(name) for name in ("duration_count", "duration_sum", "duration_max")),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    for resolution, sqlite_format in (
        ("hour", "%Y-%m-%d %H:00:00.000000"),
        ("day", "%Y-%m-%d 00:00:00.000000"),
    ):
        # SQLite keeps instants as text in this very format; PostgreSQL truncates timestamps.
        bucket = (
            sa.func.date_trunc(resolution, runs.c.started_at)
            if postgresql
            else sa.func.strftime(sqlite_format, runs.c.started_at)
        )
        grouped = (
            sa.select(
                runs.c.job,
                sa.literal(resolution),
                bucket,
                sa.func.count(),
                sa.func.sum(sa.case((runs.c.status == "succeeded", 0), else_=1)),
                sa.func.count(runs.c.duration_seconds),
                sa.func.coalesce(sa.func.sum(runs.c.duration_seconds), 0.0),
                sa.func.max(runs.c.duration_seconds),
            )
            .where(
                runs.c.finished_at.is_not(None),
                runs.c.status.not_in(["running", "lost", "duplicate"]),
            )
            .group_by(runs.c.job, bucket)
        )
        op.execute(
            metrics.insert().from_select(
                [
                    "job",
                    "resolution",
                    "bucket",
                    "runs",
                    "failures",
                    "duration_count",
                    "duration_sum",
                    "duration_max",
                ],
                grouped,
            )
        )


def downgrade() -> None:
    op.drop_table("run_metrics")
