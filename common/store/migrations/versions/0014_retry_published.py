"""A trigger claim records that the retry its run called for was published.

Revision ID: 0014
Revises: 0013

- ``trigger_claims.retry_published_at``: when the broker confirmed the retry (the next attempt)
  that this claim's failed run called for. A repeat of the same attempt (a duplicate publish, a
  redelivery) publishes the retry only while this is empty and no live worker is publishing it,
  so one failed attempt is followed by one retry message, not one per repeat. Claims stored
  before this revision have none: a repeat of one may publish its retry again (flagged, as
  before).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trigger_claims") as claims:
        claims.add_column(sa.Column("retry_published_at", sa.DateTime(timezone=False), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trigger_claims") as claims:
        claims.drop_column("retry_published_at")
