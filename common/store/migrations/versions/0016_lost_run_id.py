"""The run a job's health last declared lost (``job_health.lost_run_id``): should its worker report
its real end after all (it was cut off, not dead), that end replaces the loss.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_health") as job_health:
        job_health.add_column(sa.Column("lost_run_id", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_health") as job_health:
        job_health.drop_column("lost_run_id")
