"""Query rules: one unique key per fact, an index for every hot query, CHECKs on status columns.

Revision ID: 0002
Revises: 0001

- ``fires`` had two unique keys for one fact (the trigger id is ``job@scheduled-time``): the
  primary key stays, ``uq_fires_job_scheduled`` goes.
- Unpublished fires are found through a partial index that holds only them.
- Listing runs newest first, and purging runs, heartbeats and fires by age, use indexes.
- Status columns accept only the values the code writes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

RUN_STATUSES = "'running', 'succeeded', 'failed', 'timed_out', 'expired', 'skipped', 'lost'"
RUN_SOURCES = "'worker', 'heartbeat'"
HEARTBEAT_KINDS = "'start', 'success', 'fail'"
UNPUBLISHED = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.drop_index("ix_fires_unpublished", table_name="fires")
    with op.batch_alter_table("fires") as fires:
        fires.drop_constraint("uq_fires_job_scheduled", type_="unique")
    with op.batch_alter_table("runs") as runs:
        runs.create_check_constraint("ck_runs_status", f"status IN ({RUN_STATUSES})")
        runs.create_check_constraint("ck_runs_source", f"source IN ({RUN_SOURCES})")
    with op.batch_alter_table("heartbeats") as heartbeats:
        heartbeats.create_check_constraint("ck_heartbeats_kind", f"kind IN ({HEARTBEAT_KINDS})")
    with op.batch_alter_table("job_state") as job_state:
        job_state.create_check_constraint(
            "ck_job_state_last_status", f"last_status IS NULL OR last_status IN ({RUN_STATUSES})"
        )
    # Created after the batch blocks: SQLite's copy-and-move would not keep a partial index.
    op.create_index(
        "ix_fires_unpublished",
        "fires",
        ["claimed_at"],
        postgresql_where=UNPUBLISHED,
        sqlite_where=UNPUBLISHED,
    )
    op.create_index("ix_fires_expires", "fires", ["expires_at"])
    op.create_index("ix_runs_started", "runs", ["started_at"])
    op.create_index("ix_runs_finished", "runs", ["finished_at"])
    op.create_index("ix_heartbeats_at", "heartbeats", ["at"])


def downgrade() -> None:
    for name, table in (
        ("ix_heartbeats_at", "heartbeats"),
        ("ix_runs_finished", "runs"),
        ("ix_runs_started", "runs"),
        ("ix_fires_expires", "fires"),
        ("ix_fires_unpublished", "fires"),
    ):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("job_state") as job_state:
        job_state.drop_constraint("ck_job_state_last_status", type_="check")
    with op.batch_alter_table("heartbeats") as heartbeats:
        heartbeats.drop_constraint("ck_heartbeats_kind", type_="check")
    with op.batch_alter_table("runs") as runs:
        runs.drop_constraint("ck_runs_source", type_="check")
        runs.drop_constraint("ck_runs_status", type_="check")
    with op.batch_alter_table("fires") as fires:
        fires.create_unique_constraint("uq_fires_job_scheduled", ["job", "scheduled_at"])
    op.create_index("ix_fires_unpublished", "fires", ["published_at", "claimed_at"])
