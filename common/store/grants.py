"""The narrowest PostgreSQL rights a worker needs: read the schema version, keep trigger claims.

A worker holds no trigger-signing key (with Ed25519) and, with these grants, cannot write jobs or
fires either: the scheduler signs what is in those tables, so a worker that could write them
could have a trigger of its choosing signed.
"""

from __future__ import annotations

import re

from common.errors import ConfigError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# What a worker reads and writes, and nothing else.
WORKER_TABLE_RIGHTS = {"alembic_version": "SELECT", "trigger_claims": "SELECT, INSERT, UPDATE, DELETE"}


def worker_grants(role: str, schema: str | None) -> list[str]:
    """The GRANT statements that let PostgreSQL ``role`` run a worker against the tables in
    ``schema`` (``public`` when None). Raises ConfigError for a name that is not a plain
    lower-case identifier."""
    schema = schema or "public"
    for what, name in (("role", role), ("schema", schema)):
        if not _IDENTIFIER.match(name):
            raise ConfigError(f"the {what} name {name!r} must be a lower-case identifier ([a-z_][a-z0-9_]*)")
    statements = [f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"']
    statements += [
        f'GRANT {rights} ON "{schema}"."{table}" TO "{role}"' for table, rights in WORKER_TABLE_RIGHTS.items()
    ]
    return statements
