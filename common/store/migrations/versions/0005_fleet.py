"""Fleet health: the monitor's record of each scheduler, pool, worker and the dead-letter queue.

Revision ID: 0005
Revises: 0004

- ``fleet_health``: one row per fleet component, keyed by the name its flips carry in ``flips``
  (``@scheduler``, ``@pool:<name>``, ``@worker:<name>``, ``@dead-letters``: no job can be called so).
- ``ix_runs_worker_running``: the runs still ``running``, by worker (a dead worker's runs become
  ``lost`` through it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Instants are naive UTC in the database (the models convert at the edge).
Instant = sa.DateTime(timezone=False)


def upgrade() -> None:
    op.create_table(
        "fleet_health",
        sa.Column("component", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("since", Instant, nullable=False),
        sa.Column("seen_at", Instant, nullable=True),
        sa.Column("count", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("component"),
        sa.CheckConstraint("state IN ('new', 'up', 'down')", name="ck_fleet_health_state"),
        sa.CheckConstraint(
            "kind IN ('scheduler', 'pool', 'worker', 'dead-letters')", name="ck_fleet_health_kind"
        ),
    )
    running = sa.text("status = 'running'")
    op.create_index(
        "ix_runs_worker_running", "runs", ["worker"], postgresql_where=running, sqlite_where=running
    )


def downgrade() -> None:
    op.drop_index("ix_runs_worker_running", table_name="runs")
    op.execute("DELETE FROM flips WHERE job LIKE '@%'")
    op.drop_table("fleet_health")
