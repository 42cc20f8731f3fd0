"""``cronfleet keys ping-url new|list|revoke``: the keys of the monitor's ping URLs."""

from __future__ import annotations

import argparse
import sys

from common.cli.admin import open_store
from common.cli.output import emit
from common.clock import utcnow
from common.ping_keys import create_ping_key, list_ping_keys, parse_jobs, revoke_ping_key
from common.settings import Settings
from common.store import JobRow

# Printed in the URL form when --url is not given.
URL_PLACEHOLDER = "http://MONITOR-HOST:PORT"


async def new(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet keys ping-url new --jobs a,b [--name NAME] [--url BASE]``: make a ping key and
    print its token, once, with the ping URL of each job (the token is not stored and cannot be
    shown again). A job unknown to the store is allowed (it may be applied later), with a note on
    stderr."""
    jobs = parse_jobs(args.jobs or "")
    async with open_store(settings) as store:
        key, token = await create_ping_key(store, jobs, args.name, utcnow())
        async with store.session() as session:
            known = {name for name in jobs if await session.get(JobRow, name) is not None}
    base = (args.url or URL_PLACEHOLDER).rstrip("/")
    print(f"ping key {key.name!r} (id {key.id}) for {', '.join(jobs)}; shown once, keep it secret:")
    print(token)
    if len(jobs) == 1:
        print(f"{base}/ping/{token}")
    else:
        for job in jobs:
            print(f"{base}/ping/{token}/{job}")
    for job in jobs:
        if job not in known:
            print(f"note: no job called {job!r} yet (pings are recorded all the same)", file=sys.stderr)
    return 0


async def list_keys(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet keys ping-url list [--json]``: every ping key (never its token)."""
    async with open_store(settings) as store:
        keys = await list_ping_keys(store)
    rows = [
        {
            "id": key.id,
            "name": key.name,
            "jobs": list(key.jobs) if args.json else ",".join(key.jobs),
            "created_at": key.created_at,
            "revoked_at": key.revoked_at,
            "state": "revoked" if key.revoked else "active",
        }
        for key in keys
    ]
    emit(rows, ["id", "name", "state", "jobs", "created_at", "revoked_at"], args.json)
    return 0


async def revoke(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet keys ping-url revoke NAME-or-ID``: its pings are refused from now on."""
    async with open_store(settings) as store:
        key, fresh = await revoke_ping_key(store, args.key, utcnow())
    if fresh:
        print(f"revoked ping key {key.name!r} (id {key.id})")
    else:
        print(f"ping key {key.name!r} (id {key.id}) was revoked already")
    return 0
