"""How Alembic runs inside cronfleet: on the connection the store hands it, never from a config file.

``common.store.schema`` passes an open (sync) connection in ``config.attributes["connection"]``;
SQLite tables are altered in batch mode (copy and move), which is how SQLite changes a table.
"""

from __future__ import annotations

from alembic import context

from common.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
