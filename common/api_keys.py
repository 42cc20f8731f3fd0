"""Keys of the monitor's HTTP API: ``cfk_<id>_<secret>``, random, stored hashed, shown once,
revocable; a read-only key may read everything and change nothing.

The id finds the row; the secret's SHA-256 is compared in constant time. A revoked or unknown
key, or a malformed one, is simply not a key: callers answer 401 without saying which.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from common.errors import ConfigError, NotFound
from common.messages import JOB_NAME_PATTERN
from common.store import ApiKeyRow, Store

_KEY = re.compile(r"^cfk_([A-Za-z0-9]{16})_([A-Za-z0-9_-]{32,128})$")
_NAME = re.compile(JOB_NAME_PATTERN)


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: never its secret."""

    id: str
    name: str
    read_only: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _listed(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, row.read_only, row.created_at, row.revoked_at, row.last_used_at)


async def create_api_key(store: Store, name: str, *, read_only: bool, now: datetime) -> tuple[ApiKey, str]:
    """A new key called ``name`` and its full text (the only time it exists in clear). Raises
    ConfigError for a bad or taken name."""
    if not _NAME.match(name):
        raise ConfigError(
            f"API key name {name!r}: a letter or digit, then letters, digits, '_' or '-' (64 at most)"
        )
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    async with store.session() as session, session.begin():
        if await session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == name)) is not None:
            raise ConfigError(f"an API key called {name!r} exists already (revoke it or choose another name)")
        row = ApiKeyRow(
            id=key_id, name=name, secret_sha256=_sha256(secret), read_only=read_only, created_at=now
        )
        session.add(row)
    return _listed(row), f"cfk_{key_id}_{secret}"


async def list_api_keys(store: Store) -> list[ApiKey]:
    """Every key, revoked ones too, by name."""
    async with store.session() as session:
        rows = (await session.execute(select(ApiKeyRow).order_by(ApiKeyRow.name))).scalars()
        return [_listed(row) for row in rows]


async def revoke_api_key(store: Store, name: str, now: datetime) -> ApiKey:
    """Revoke the key called ``name`` at once (idempotent). Raises NotFound."""
    async with store.session() as session, session.begin():
        row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.name == name))
        if row is None:
            raise NotFound(f"no API key called {name!r}")
        if row.revoked_at is None:
            row.revoked_at = now
        return _listed(row)


async def verify_api_key(store: Store, presented: str | None, now: datetime) -> ApiKey | None:
    """The live key ``presented`` is, or None (missing, malformed, unknown, wrong or revoked)."""
    found = _KEY.match(presented or "")
    if found is None:
        return None
    key_id, secret = found.groups()
    async with store.session() as session, session.begin():
        row = await session.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.secret_sha256, _sha256(secret)):
            return None
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            await session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=now))
        return _listed(row)
