"""``cronfleet flips``: the changes of jobs' health states the monitor stored, newest first."""

from __future__ import annotations

import argparse

from sqlalchemy import select

from common.cli.admin import open_store
from common.cli.output import emit
from common.settings import Settings
from common.store import FlipRow


async def flips(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet flips [NAME] [--limit N] [--json]``: each flip's instant, job, from and to
    states and reason, newest first (of one job with NAME)."""
    query = select(FlipRow).order_by(FlipRow.at.desc(), FlipRow.id.desc()).limit(max(1, args.limit))
    if args.name:
        query = query.where(FlipRow.job == args.name)
    async with open_store(settings) as store, store.session() as session:
        found = (await session.execute(query)).scalars().all()
    rows = [
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
    emit(rows, ["at", "job", "from_state", "to_state", "reason"], args.json)
    return 0
