"""Alerts: every delivery attempt, and an outbox on flips so each alert is delivered once.

Revision ID: 0006
Revises: 0005

- ``alert_attempts``: one row per attempt at delivering an alert to a channel (flip, channel,
  attempt number, time, delivered or the error, final, next try); listed newest first by
  ``cronfleet alerts`` (through ``at`` and (``job``, ``at``)), deleted by retention by age.
- ``flips.alert``: ``pending`` for a flip people must be told about until every channel of its
  route has a final attempt, then ``done`` (None: nothing to tell); ``flips.alert_lease_until``:
  until when the monitor delivering it holds it. The pending ones are found through a partial
  index. Flips stored before this revision are not alerted (``alert`` stays None).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PENDING = sa.text("alert = 'pending'")


def upgrade() -> None:
    op.create_table(
        "alert_attempts",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("flip_id", Id, nullable=True),
        sa.Column("alert_id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", Instant, nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("retry_at", Instant, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("kind IN ('alarm', 'recovery', 'test')", name="ck_alert_attempts_kind"),
    )
    op.create_index("ix_alert_attempts_flip_id", "alert_attempts", ["flip_id"])
    op.create_index("ix_alert_attempts_at", "alert_attempts", ["at"])
    op.create_index("ix_alert_attempts_job_at", "alert_attempts", ["job", "at"])
    with op.batch_alter_table("flips") as flips:
        flips.add_column(sa.Column("alert", sa.String(length=16), nullable=True))
        flips.add_column(sa.Column("alert_lease_until", Instant, nullable=True))
        flips.create_check_constraint("ck_flips_alert", "alert IS NULL OR alert IN ('pending', 'done')")
    op.create_index(
        "ix_flips_alert_pending",
        "flips",
        ["alert_lease_until"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_flips_alert_pending", table_name="flips")
    with op.batch_alter_table("flips") as flips:
        flips.drop_constraint("ck_flips_alert", type_="check")
        flips.drop_column("alert_lease_until")
        flips.drop_column("alert")
    op.drop_index("ix_alert_attempts_job_at", table_name="alert_attempts")
    op.drop_index("ix_alert_attempts_at", table_name="alert_attempts")
    op.drop_index("ix_alert_attempts_flip_id", table_name="alert_attempts")
    op.drop_table("alert_attempts")
