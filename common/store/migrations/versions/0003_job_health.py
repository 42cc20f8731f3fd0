"""Job health: each job's state as the monitor's health machine keeps it, and every flip.

Revision ID: 0003
Revises: 0002

- ``job_health``: one row per job, the machine's record (``monitor.health.HealthRecord``) and
  the fingerprint of the spec it follows. (``deadline_at``, ``job``) is indexed: a monitor
  rebuilds its timers from that index alone at start, and finds by it what falls due next.
- ``flips``: every change of state (time, from, to, reason), newest found through
  (``job``, ``at``) for one job and ``at`` for all.
- ``job_state`` is kept as it is: other code still reads it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Instants are naive UTC in the database (the models convert at the edge).
Instant = sa.DateTime(timezone=False)
HEALTH_STATES = "'new', 'up', 'running', 'late', 'down', 'failing', 'stuck', 'paused'"
ALARM_STATES = "'down', 'failing', 'stuck'"


def upgrade() -> None:
    op.create_table(
        "job_health",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("since", Instant, nullable=False),
        sa.Column("due_at", Instant, nullable=True),
        sa.Column("deadline_at", Instant, nullable=True),
        sa.Column("run_id", sa.String(length=255), nullable=True),
        sa.Column("run_started_at", Instant, nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("open_alarm", sa.String(length=16), nullable=True),
        sa.Column("last_run_at", Instant, nullable=True),
        sa.Column("last_finished_at", Instant, nullable=True),
        sa.Column("fingerprint", sa.String(length=32), nullable=True),
        sa.Column("updated_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("job"),
        sa.CheckConstraint(f"state IN ({HEALTH_STATES})", name="ck_job_health_state"),
        sa.CheckConstraint(
            f"open_alarm IS NULL OR open_alarm IN ({ALARM_STATES})", name="ck_job_health_open_alarm"
        ),
    )
    op.create_index("ix_job_health_deadline", "job_health", ["deadline_at", "job"])
    op.create_table(
        "flips",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("at", Instant, nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=False),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("recovered_from", sa.String(length=16), nullable=True),
        sa.Column("created_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(f"from_state IN ({HEALTH_STATES})", name="ck_flips_from_state"),
        sa.CheckConstraint(f"to_state IN ({HEALTH_STATES})", name="ck_flips_to_state"),
        sa.CheckConstraint(
            f"recovered_from IS NULL OR recovered_from IN ({ALARM_STATES})", name="ck_flips_recovered_from"
        ),
    )
    op.create_index("ix_flips_job_at", "flips", ["job", "at"])
    op.create_index("ix_flips_at", "flips", ["at"])


def downgrade() -> None:
    op.drop_index("ix_flips_at", table_name="flips")
    op.drop_index("ix_flips_job_at", table_name="flips")
    op.drop_table("flips")
    op.drop_index("ix_job_health_deadline", table_name="job_health")
    op.drop_table("job_health")
