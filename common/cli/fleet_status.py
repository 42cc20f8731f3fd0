"""The fleet section of ``cronfleet status``: the schedulers, each pool, each worker and the
dead-letter queue, as the monitor last decided them (table ``fleet_health``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from common.store import FleetHealthRow

# The order the section lists components in, by kind.
KIND_ORDER = {"scheduler": 0, "pool": 1, "worker": 2, "dead-letters": 3}
COLUMNS = ["component", "state", "since", "detail"]


async def read_fleet(session: AsyncSession) -> list[dict[str, object]]:
    """Each fleet component the monitor keeps: its name in the flips (``@scheduler``,
    ``@pool:NAME``, ``@worker:NAME``, ``@dead-letters``), kind, own name, state (``new``, ``up``,
    ``down``), since when, its latest heartbeat or good look (``seen_at``) and one line on the
    latest look; schedulers first, then pools, workers and the dead letters, by name."""
    rows = (await session.execute(select(FleetHealthRow))).scalars().all()
    listed: list[dict[str, object]] = [
        {
            "component": row.component,
            "kind": row.kind,
            "name": row.name,
            "state": row.state,
            "since": row.since,
            "seen_at": row.seen_at,
            "detail": row.detail,
        }
        for row in rows
    ]
    listed.sort(key=lambda row: (KIND_ORDER.get(str(row["kind"]), 9), str(row["name"])))
    return listed


def fleet_down(rows: list[dict[str, object]]) -> bool:
    """Whether any component is down (``cronfleet status`` then exits 1)."""
    return any(row["state"] == "down" for row in rows)
