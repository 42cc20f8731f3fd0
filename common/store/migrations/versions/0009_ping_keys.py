"""Ping keys: who may send heartbeats through the monitor's ping URLs; heartbeats' ``rid``.

Revision ID: 0009
Revises: 0008

- ``ping_keys``: one row per ping key (``cronfleet keys ping-url new``): its unique name, the
  SHA-256 of the random token (never the token), the jobs it may ping (a JSON list), when it was
  made and, once revoked, when. Looked up by the token's hash (unique index) on every ping.
- ``heartbeats.rid``: the heartbeat's ``rid`` (``?rid=`` of a ping URL), which links a start to
  its finish; None for heartbeats stored before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Instant = sa.DateTime(timezone=False)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ping_keys",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("jobs", sa.Text(), nullable=False),
        sa.Column("created_at", Instant, nullable=False),
        sa.Column("revoked_at", Instant, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("key_sha256"),
    )
    with op.batch_alter_table("heartbeats") as heartbeats:
        heartbeats.add_column(sa.Column("rid", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("heartbeats") as heartbeats:
        heartbeats.drop_column("rid")
    op.drop_table("ping_keys")
