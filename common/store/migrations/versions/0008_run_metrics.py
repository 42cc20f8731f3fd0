"""Run metrics: finished runs rolled up per job and hour or day.

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


def downgrade() -> None:
    op.drop_table("run_metrics")
