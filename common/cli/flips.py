"""``cronfleet flips``: the changes of jobs' health states the monitor stored, newest first."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import select

from common.cli.admin import open_store
from common.cli.output import emit
from common.settings import Settings
from common.store import FlipRow, Store


async def flips(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet flips [NAME] [--limit N] [--json]``: each flip's instant, job, from and to
    states and reason, newest first (of one job with NAME)."""
    async with open_store(settings) as store:
        rows = await read_flips(store, args.name, args.limit)
    emit(rows, ["at", "job", "from_state", "to_state", "reason"], args.json)
    return 0


async def read_flips(store: Store, job: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` flips (of ``job``), newest first, as ``cronfleet flips`` shows them:
    ``at``, ``job``, ``from_state``, ``to_state``, ``reason``, ``recovered_from``."""
    query = select(FlipRow).order_by(FlipRow.at.desc(), FlipRow.id.desc()).limit(max(1, limit))
    if job:
        query = query.where(FlipRow.job == job)
    async with store.session() as session:
        found = (await session.execute(query)).scalars().all()
    return [
        {
            "at": flip.at,
            "job": flip.job,
            "from_state": flip.from_state,
            "to_state": flip.to_state,
            "reason": flip.reason,
            "recovered_from": flip.recovered_from,
        }
        for flip in found
    ]
