"""Jobs' next fire instant and change versions: a scheduler starts on (name, next_fire_at) and
reloads only what changed.

Revision ID: 0011
Revises: 0010

- ``jobs.planned``: whether a scheduler plans the job (enabled, with an action). Set here from the
  stored spec (its canonical JSON starts with ``{"action":null`` when it has none).
- ``jobs.next_fire_at`` (indexed): the job's next fire, written by ``apply`` and by the scheduler
  that fires it. None for jobs stored before this revision: a scheduler computes it from the spec.
- ``jobs.version`` (indexed), ``jobs_version`` (one row, the counter every write of jobs takes
  the next value of) and ``job_removals`` (tombstones with the version that removed them): a
  scheduler reads only the jobs changed or removed since the version it has seen.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("planned", sa.Boolean(), nullable=False, server_default=sa.false()))
        jobs.add_column(sa.Column("next_fire_at", Instant, nullable=True))
        jobs.add_column(sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"))
    no_action = '{"action":null%'
    op.execute(
        sa.text("UPDATE jobs SET planned = (enabled AND spec NOT LIKE :no_action)").bindparams(
            no_action=no_action
        )
    )
    with op.batch_alter_table("jobs") as jobs:
        jobs.alter_column("planned", server_default=None)
        jobs.alter_column("version", server_default=None)
    op.create_index("ix_jobs_next_fire", "jobs", ["next_fire_at"])
    op.create_index("ix_jobs_version", "jobs", ["version"])
    op.create_table(
        "jobs_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO jobs_version (id, version) VALUES (1, 0)")
    op.create_table(
        "job_removals",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_job_removals_version", "job_removals", ["version"])


def downgrade() -> None:
    op.drop_index("ix_job_removals_version", table_name="job_removals")
    op.drop_table("job_removals")
    op.drop_table("jobs_version")
    op.drop_index("ix_jobs_version", table_name="jobs")
    op.drop_index("ix_jobs_next_fire", table_name="jobs")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("version")
        jobs.drop_column("next_fire_at")
        jobs.drop_column("planned")
