"""Ping keys: random tokens that may send the heartbeats of some jobs through the monitor's ping
URLs (``/ping/<token>``), and do nothing else.

A ping key is not a signing key (it never signs a message: the monitor that takes the ping signs
the heartbeat with its own key) and not an API key. Its token is 32 URL-safe characters from
``secrets.token_urlsafe`` (192 random bits), shown once when it is made; the store keeps only its
SHA-256 (a fast hash is enough for a random token of that size: there is nothing to guess from).
A key names the jobs it may ping: one job, or several (a "project"). Revoked keys stay listed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from common.errors import ConfigError, NotFound
from common.messages import JOB_NAME_PATTERN
from common.store import PingKeyRow, Store

TOKEN_BYTES = 24  # 192 bits; token_urlsafe writes them as 32 characters
# Longer strings are not tokens this code made: refused before they are hashed.
MAX_TOKEN_LENGTH = 128
# Names start with a letter, so that ``revoke 12`` always means the key with id 12.
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.+-]{0,63}$"
MAX_JOBS = 1000

_NAME = re.compile(NAME_PATTERN)
_JOB = re.compile(JOB_NAME_PATTERN)


@dataclass(frozen=True)
class PingKey:
    """A ping key as stored (never its token)."""

    id: int
    name: str
    jobs: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked (its pings are refused)."""
        return self.revoked_at is not None


def token_sha256(token: str) -> str:
    """The hex SHA-256 of ``token``'s UTF-8 bytes (a lone surrogate is encoded as a replacement,
    so any string has a hash and none matches a real token by accident)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def parse_jobs(text: str) -> tuple[str, ...]:
    """The job names of a comma-separated list, in order, without repeats. Raises ConfigError for
    an empty list or a name that is not a job name."""
    jobs = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not jobs:
        raise ConfigError("a ping key needs at least one job (--jobs a,b)")
    if len(jobs) > MAX_JOBS:
        raise ConfigError(f"a ping key may ping at most {MAX_JOBS} jobs")
    for name in jobs:
        if not _JOB.fullmatch(name):
            raise ConfigError(f"{name!r} is not a job name ({JOB_NAME_PATTERN})")
    return jobs


def _row_key(row: PingKeyRow) -> PingKey:
    jobs = orjson.loads(row.jobs)
    return PingKey(row.id, row.name, tuple(jobs), row.created_at, row.revoked_at)


async def create_ping_key(
    store: Store, jobs: tuple[str, ...], name: str | None, now: datetime
) -> tuple[PingKey, str]:
    """Make and store a new ping key for ``jobs``; returns it and its token (the only time the
    token is known). ``name`` defaults to the jobs joined by ``+`` (cut to 64 characters).
    Raises ConfigError for a bad name or one already taken."""
    if name is None:
        name = "+".join(jobs)[:64]
        if not name[0].isalpha():
            name = f"k{name}"[:64]
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a ping key name ({NAME_PATTERN})")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    row = PingKeyRow(
        name=name,
        key_sha256=token_sha256(token),
        jobs=orjson.dumps(list(jobs)).decode(),
        created_at=now,
        revoked_at=None,
    )
    try:
        async with store.session() as session, session.begin():
            session.add(row)
    except IntegrityError as exc:
        raise ConfigError(f"a ping key named {name!r} exists already: choose another --name") from exc
    return _row_key(row), token


async def list_ping_keys(store: Store) -> list[PingKey]:
    """Every ping key, revoked ones too, oldest first."""
    async with store.session() as session:
        rows = (await session.execute(select(PingKeyRow).order_by(PingKeyRow.id))).scalars().all()
    return [_row_key(row) for row in rows]


async def revoke_ping_key(store: Store, which: str, now: datetime) -> tuple[PingKey, bool]:
    """Revoke the key named ``which`` (or with that id, when ``which`` is all digits); returns it
    and whether it was revoked now (False: it already was). Raises NotFound."""
    async with store.session() as session, session.begin():
        query = select(PingKeyRow)
        if which.isdigit():
            query = query.where(PingKeyRow.id == int(which))
        else:
            query = query.where(PingKeyRow.name == which)
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no ping key called {which!r} (see `cronfleet keys ping-url list`)")
        fresh = row.revoked_at is None
        if fresh:
            row.revoked_at = now
        return _row_key(row), fresh


async def find_ping_key(store: Store, token: str) -> PingKey | None:
    """The live (not revoked) key whose token is ``token``, else None."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    async with store.session() as session:
        row = (
            await session.execute(select(PingKeyRow).where(PingKeyRow.key_sha256 == token_sha256(token)))
        ).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return _row_key(row)
