"""Retries, exclusive jobs and long runs: room in a trigger claim's key for an attempt number,
and a long run's trigger kept in its claim.

Revision ID: 0012
Revises: 0011

- ``trigger_claims.trigger_id`` grows from 200 to 255 characters: a retry is claimed under
  ``<trigger id>#<attempt>`` (a trigger id may be 200 characters), and an exclusive job's lease is
  a row of its own, ``exclusive:<job>`` (``common.retries``).
- ``trigger_claims.trigger_body`` and ``trigger_envelope``: a long run's trigger is acked when the
  run starts (``CRONFLEET_EARLY_ACK_SECONDS``), so its claim keeps the signed body and the
  signature headers: the worker that finds the claim lapsed (its worker died) ends the run from
  them. None for every other claim.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trigger_claims") as claims:
        claims.alter_column(
            "trigger_id",
            existing_type=sa.String(length=200),
            type_=sa.String(length=255),
            existing_nullable=False,
        )
        claims.add_column(sa.Column("trigger_body", sa.Text(), nullable=True))
        claims.add_column(sa.Column("trigger_envelope", sa.Text(), nullable=True))
    kept = sa.text("finished_at IS NULL AND trigger_body IS NOT NULL")
    op.create_index(
        "ix_trigger_claims_kept_lease",
        "trigger_claims",
        ["lease_until"],
        sqlite_where=kept,
        postgresql_where=kept,
    )


def downgrade() -> None:
    # Keys that no longer fit are retries' and leases': without this revision's code nothing reads them.
    op.execute("DELETE FROM trigger_claims WHERE LENGTH(trigger_id) > 200")
    op.drop_index("ix_trigger_claims_kept_lease", table_name="trigger_claims")
    with op.batch_alter_table("trigger_claims") as claims:
        claims.drop_column("trigger_envelope")
        claims.drop_column("trigger_body")
        claims.alter_column(
            "trigger_id",
            existing_type=sa.String(length=255),
            type_=sa.String(length=200),
            existing_nullable=False,
        )
