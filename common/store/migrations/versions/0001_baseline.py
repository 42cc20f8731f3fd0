"""Baseline: the schema as ``create_all`` made it before cronfleet had migrations.

Revision ID: 0001
Revises: -

A database made then (all these tables, no ``alembic_version``) is stamped at this revision by
``cronfleet db upgrade`` instead of being created again. Frozen: never edit a released revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Instants are naive UTC in the database (the models convert at the edge).
Instant = sa.DateTime(timezone=False)


def upgrade() -> None:
    op.create_table(
        "fires",
        sa.Column("trigger_id", sa.String(length=200), nullable=False),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("scheduled_at", Instant, nullable=False),
        sa.Column("expires_at", Instant, nullable=False),
        sa.Column("claimed_by", sa.String(length=200), nullable=False),
        sa.Column("claimed_at", Instant, nullable=False),
        sa.Column("published_at", Instant, nullable=True),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("trigger_id"),
        sa.UniqueConstraint("job", "scheduled_at", name="uq_fires_job_scheduled"),
    )
    op.create_index("ix_fires_unpublished", "fires", ["published_at", "claimed_at"])
    op.create_table(
        "heartbeats",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("at", Instant, nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_heartbeats_job", "heartbeats", ["job"])
    op.create_table(
        "job_state",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("last_run_id", sa.String(length=255), nullable=True),
        sa.Column("last_status", sa.String(length=16), nullable=True),
        sa.Column("last_started_at", Instant, nullable=True),
        sa.Column("last_finished_at", Instant, nullable=True),
        sa.Column("next_expected_at", Instant, nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("updated_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("job"),
    )
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", Instant, nullable=False),
        sa.Column("updated_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("trigger_id", sa.String(length=200), nullable=True),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("redelivered", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("scheduled_at", Instant, nullable=True),
        sa.Column("started_at", Instant, nullable=False),
        sa.Column("finished_at", Instant, nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("output_tail", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id"),
    )
    op.create_index("ix_runs_job_started", "runs", ["job", "started_at"])
    op.create_index("ix_runs_trigger_id", "runs", ["trigger_id"])


def downgrade() -> None:
    for table in ("runs", "leases", "jobs", "job_state", "heartbeats", "fires"):
        op.drop_table(table)
