"""Retries and exclusive jobs: room in a trigger claim's key for an attempt number.

Revision ID: 0010
Revises: 0009

- ``trigger_claims.trigger_id`` grows from 200 to 255 characters: a retry is claimed under
  ``<trigger id>#<attempt>`` (a trigger id may be 200 characters), and an exclusive job's lease is
  a row of its own, ``exclusive:<job>`` (``common.retries``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
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


def downgrade() -> None:
    # Keys that no longer fit are retries' and leases': without this revision's code nothing reads them.
    op.execute("DELETE FROM trigger_claims WHERE LENGTH(trigger_id) > 200")
    with op.batch_alter_table("trigger_claims") as claims:
        claims.alter_column(
            "trigger_id",
            existing_type=sa.String(length=255),
            type_=sa.String(length=200),
            existing_nullable=False,
        )
