"""What a run gave back: a python action's result and an http endpoint's request id.

Revision ID: 0010
Revises: 0009

- ``runs.result``: the JSON text of what a ``python`` action's function returned (at most 16 KiB
  as JSON); None for other runs and for runs stored before this revision.
- ``runs.endpoint_request_id``: the ``requestId`` an ``http`` action's endpoint answered with, linking the
  endpoint's own logs to the run; None when it gave none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("result", sa.Text(), nullable=True))
        runs.add_column(sa.Column("endpoint_request_id", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("endpoint_request_id")
        runs.drop_column("result")
