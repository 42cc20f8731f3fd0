"""Which attempt a run is: ``runs.attempt``.

Revision ID: 0013
Revises: 0012

- ``runs.attempt``: the run's attempt at its trigger (1: the first; 2 and more: retries, from the
  run events' ``attempt``). Runs stored before this revision, and heartbeat runs, are attempt 1.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("attempt")
