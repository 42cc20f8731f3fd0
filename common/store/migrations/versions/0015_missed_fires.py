"""Fires missed during downtime (``missed_fires``), and when a fire was meant to go out
(``fires.due_at``).

Revision ID: 0015
Revises: 0014

- ``missed_fires``: one row per job and backlog of fires no scheduler sent on time, as the job's
  misfire policy settled it (how many were skipped, how many sent late), keyed by the job and its
  first missed fire so that two schedulers record a backlog once.
- ``fires.due_at``: when the fire was meant to go out (its instant plus its job's jitter offset,
  or when a fire caught up after downtime was claimed); None for fires claimed before: their
  ``scheduled_at``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)


def upgrade() -> None:
    op.create_table(
        "missed_fires",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("first_missed", Instant, nullable=False),
        sa.Column("last_missed", Instant, nullable=False),
        sa.Column("policy", sa.String(length=8), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("counted_all", sa.Boolean(), nullable=False),
        sa.Column("caught_up", sa.Integer(), nullable=False),
        sa.Column("recorded_by", sa.String(length=200), nullable=False),
        sa.Column("recorded_at", Instant, nullable=False),
        sa.PrimaryKeyConstraint("job", "first_missed"),
    )
    op.create_index("ix_missed_fires_recorded", "missed_fires", ["recorded_at"])
    with op.batch_alter_table("fires") as fires:
        fires.add_column(sa.Column("due_at", Instant, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fires") as fires:
        fires.drop_column("due_at")
    op.drop_index("ix_missed_fires_recorded", table_name="missed_fires")
    op.drop_table("missed_fires")
