"""Trigger claims: the fleet runs each trigger id once; repeats are recorded as ``duplicate``.

Revision ID: 0004
Revises: 0003

- ``trigger_claims``: one row per trigger a worker took (its run, its worker, a lease kept alive
  while the job runs, the finished run's event), deleted by retention after the trigger expired.
- ``runs.status`` and ``job_state.last_status`` accept ``duplicate``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)
OLD_STATUSES = "'running', 'succeeded', 'failed', 'timed_out', 'expired', 'skipped', 'lost'"
NEW_STATUSES = f"{OLD_STATUSES}, 'duplicate'"


def _run_statuses(statuses: str) -> None:
    with op.batch_alter_table("runs") as runs:
        runs.drop_constraint("ck_runs_status", type_="check")
        runs.create_check_constraint("ck_runs_status", f"status IN ({statuses})")
    with op.batch_alter_table("job_state") as job_state:
        job_state.drop_constraint("ck_job_state_last_status", type_="check")
        job_state.create_check_constraint(
            "ck_job_state_last_status", f"last_status IS NULL OR last_status IN ({statuses})"
        )


def upgrade() -> None:
    op.create_table(
        "trigger_claims",
        sa.Column("trigger_id", sa.String(length=200), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("claimed_at", Instant, nullable=False),
        sa.Column("lease_until", Instant, nullable=False),
        sa.Column("trigger_expires_at", Instant, nullable=False),
        sa.Column("finished_at", Instant, nullable=True),
        sa.Column("finished_event", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("trigger_id"),
    )
    op.create_index("ix_trigger_claims_expires", "trigger_claims", ["trigger_expires_at"])
    _run_statuses(NEW_STATUSES)


def downgrade() -> None:
    op.execute("DELETE FROM runs WHERE status = 'duplicate'")
    op.execute("UPDATE job_state SET last_status = NULL WHERE last_status = 'duplicate'")
    _run_statuses(OLD_STATUSES)
    op.drop_index("ix_trigger_claims_expires", table_name="trigger_claims")
    op.drop_table("trigger_claims")
