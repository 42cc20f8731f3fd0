"""An index of the runs still going, by job and start (``ix_runs_job_running``, partial: ``status =
'running'``): the monitor reads a job's open heartbeat runs for each success or fail heartbeat, and
through ``ix_runs_job_started`` that read went over every run of the job the store keeps.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_index(
        "ix_runs_job_running",
        "runs",
        ["job", "started_at"],
        postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )


def downgrade() -> None:
    op.drop_index("ix_runs_job_running", table_name="runs")
