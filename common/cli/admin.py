"""Commands for people: apply, jobs, trigger, runs, status, ping, keys, schema."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import orjson
from pydantic import ValidationError
from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from common import fires
from common.catalog import apply_jobs, find_job, read_jobs
from common.cli.fleet_status import COLUMNS as FLEET_COLUMNS
from common.cli.fleet_status import fleet_down, read_fleet
from common.cli.output import emit
from common.clock import utcnow
from common.connection import CONNECT_ERRORS, connect
from common.errors import BrokerUnavailable, ConfigError, CronfleetError, JobFileError, NoAction, NotFound
from common.jobs import JobSpec, load_jobs_file
from common.messages import ALL_MESSAGES, HeartbeatKind, JobHeartbeat, RunStatus
from common.publisher import Publisher
from common.redact import redact
from common.settings import Settings
from common.signing import Keyring, Role, new_ed25519_pair, new_key
from common.store import ALARM_STATES, FlipRow, JobHealthRow, RunRow, Store
from common.topology import Topology

# ``status`` counts each job's duplicate (repeated, not run) triggers over this window.
DUPLICATES_WINDOW = timedelta(hours=24)


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """The store for the length of a command."""
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_publisher(settings: Settings, name: str) -> AsyncIterator[Publisher]:
    """A publisher for the length of a command; fails at once if the broker does not answer."""
    keyring = settings.keyring()
    connection = await connect(settings.amqp_url, name, wait=False)
    try:
        yield await Publisher.open(connection, Topology(settings.namespace), keyring)
    finally:
        await connection.close()


async def apply(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet apply FILE``: all jobs valid, or nothing changes.

    A file with no jobs (empty, or all commented out) would remove every job, since apply prunes:
    it is refused unless ``--allow-empty`` or ``--prune`` says that is meant. Raises JobFileError.
    """
    specs = load_jobs_file(args.file)
    if not specs and not (args.allow_empty or args.prune):
        raise JobFileError(
            f"{args.file}:1: the file defines no jobs; applying it would remove every job "
            "(pass --allow-empty if that is what you mean)"
        )
    async with open_store(settings) as store:
        diff = await apply_jobs(store, specs, utcnow(), prune=not args.keep, dry_run=args.dry_run)
    if not args.dry_run and (diff.added or diff.changed or diff.removed):
        await _tell_schedulers(settings)
    verb = "would be " if args.dry_run else ""
    for label, names in (("added", diff.added), ("changed", diff.changed), ("removed", diff.removed)):
        for name in names:
            print(f"{verb}{label}: {name}")
    if not (diff.added or diff.changed or diff.removed):
        print(f"no changes ({len(diff.unchanged)} job(s) up to date)")
    return 0


async def _tell_schedulers(settings: Settings) -> None:
    """Tell the running schedulers the jobs changed (``jobs.changed``); if the broker cannot be
    reached, say so on stderr: the change is stored, and they see it at their next poll."""
    why: str | None
    try:
        async with open_publisher(settings, "cronfleet-apply") as publisher:
            why = await publisher.tell_jobs_changed("cronfleet apply")
    except (BrokerUnavailable, ConfigError, *CONNECT_ERRORS) as exc:
        why = str(exc) or type(exc).__name__
    if why is not None:
        print(
            f"note: the running schedulers were not told ({why}); they will see the change "
            f"within {settings.jobs_reload_seconds:g} s",
            file=sys.stderr,
        )


async def jobs(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet jobs``."""
    async with open_store(settings) as store:
        stored = await read_jobs(store)
    specs = stored.specs
    rows = [
        {
            "name": s.name,
            "schedule": s.schedule_text(),
            "timezone": s.timezone,
            "action": s.action.type if s.action else "heartbeat",
            "pool": s.pool,
            "enabled": s.enabled,
            "timeout_seconds": s.timeout_seconds,
            # Secrets (an Authorization header, a token in a URL) never reach the output.
            "spec": redact(s.model_dump(mode="json")) if args.json else None,
        }
        for s in specs
    ]
    rows.extend({"name": name, "action": "invalid", "error": why} for name, why in stored.unreadable.items())
    emit(rows, ["name", "schedule", "timezone", "action", "pool", "enabled"], args.json)
    return 1 if stored.unreadable else 0


async def trigger(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet trigger NAME``: claim a manual fire now and publish it."""
    async with open_store(settings) as store:
        spec = await triggerable_job(store, settings.keyring(), args.name, "`cronfleet trigger`")
        async with open_publisher(settings, "cronfleet-cli") as publisher:
            fired = await trigger_now(store, publisher, spec, "cli", utcnow())
    print(f"triggered {fired}")
    return 0


async def triggerable_job(store: Store, keyring: Keyring, name: str, who: str) -> JobSpec:
    """The job ``name`` when it may be triggered by hand with ``keyring``: raises NotFound (no
    such job), NoAction (a heartbeat-only job) or ConfigError (no key signs triggers)."""
    spec = await find_job(store, name)
    if spec is None:
        raise NotFound(f"no job called {name!r} (see `cronfleet jobs`)")
    if spec.action is None:
        raise NoAction(f"job {name!r} has no action: it only receives heartbeats")
    # Before the fire is claimed: a claimed fire that cannot be signed would wait in the outbox.
    keyring.require([Role.TRIGGER], who=who)
    return spec


async def trigger_now(
    store: Store, publisher: Publisher, spec: JobSpec, claimed_by: str, now: datetime
) -> str:
    """Claim a manual fire of ``spec`` at ``now`` and publish it (its pool's queue declared
    first); its trigger id. A fire the broker did not confirm stays in the outbox, published
    again by a scheduler."""
    await Topology(publisher.namespace).declare_pool(publisher.channel, spec.pool)
    message = spec.trigger_at(now, now, manual=True)
    await fires.publish_claimed(store, publisher, [message], claimed_by, now)
    return message.id


async def runs(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet runs [NAME] [--limit N]``."""
    query = select(RunRow).order_by(RunRow.started_at.desc()).limit(max(1, args.limit))
    if args.name:
        query = query.where(RunRow.job == args.name)
    async with open_store(settings) as store, store.session() as session:
        found = (await session.execute(query)).scalars().all()
    rows = [{c.key: getattr(r, c.key) for c in RunRow.__table__.columns} for r in found]
    emit(
        rows,
        [
            "job",
            "status",
            "attempt",
            "started_at",
            "duration_seconds",
            "exit_code",
            "http_status",
            "worker",
            "error",
        ],
        args.json,
    )
    return 0


async def status(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet status``: the fleet (schedulers, pools, workers, dead letters: state and since
    when), then each job's health as the monitor stored it (state, since when, the next due time,
    the reason of its last flip); a job no monitor has seen yet is ``new``. With ``--json``, one
    object: ``{"fleet": [...], "jobs": [...]}``. Exits 1 when a fleet component is down, or a job
    is down, failing or stuck, or stored with a spec this cronfleet refuses."""
    async with open_store(settings) as store:
        fleet, rows = await read_status(store, utcnow())
    columns = ["job", "health", "since", "due_at", "last_finished_at", "duplicates_24h", "reason"]
    if args.json:
        sys.stdout.write(
            orjson.dumps({"fleet": fleet, "jobs": rows}, option=orjson.OPT_INDENT_2, default=str).decode()
        )
        sys.stdout.write("\n")
    else:
        if fleet:
            emit(fleet, FLEET_COLUMNS, False)
        else:
            print("(no monitor has looked at the fleet yet)")
        print()
        emit(rows, columns, False)
    jobs_bad = any(r["health"] in (*ALARM_STATES, "invalid") for r in rows)
    return 1 if jobs_bad or fleet_down(fleet) else 0


def last_flip_reason() -> ScalarSelect[str]:
    """The reason of the last flip of the job of each ``job_health`` row, as a correlated
    subquery to select beside ``JobHealthRow`` (``ix_flips_job_at``)."""
    return (
        select(FlipRow.reason)
        .where(FlipRow.job == JobHealthRow.job)
        .order_by(FlipRow.at.desc(), FlipRow.id.desc())
        .limit(1)
        .scalar_subquery()
    )


async def read_status(store: Store, now: datetime) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The fleet's components and every job's health as ``cronfleet status`` shows them (see
    ``status``), jobs by name; duplicates are counted over the ``DUPLICATES_WINDOW`` to ``now``."""
    last_reason = last_flip_reason()
    async with store.session() as session:
        health = {
            row.job: (row, reason) for row, reason in await session.execute(select(JobHealthRow, last_reason))
        }
        stored = await read_jobs(store)
        duplicates = await _recent_duplicates(session, now - DUPLICATES_WINDOW)
        fleet = await read_fleet(session)
    rows: list[dict[str, object]] = []
    for spec in stored.specs:
        found = health.get(spec.name)
        if found is None:
            state = "new" if spec.enabled else "paused"
            rows.append(
                {
                    "job": spec.name,
                    "health": state,
                    "duplicates_24h": duplicates.get(spec.name, 0),
                    "reason": "no monitor has seen this job yet",
                }
            )
            continue
        row, reason = found
        rows.append(
            {
                "job": spec.name,
                "health": row.state,
                "since": row.since,
                "due_at": row.due_at,
                "last_finished_at": row.last_finished_at,
                "duplicates_24h": duplicates.get(spec.name, 0),
                "reason": reason or _UNFLIPPED.get(row.state, ""),
            }
        )
    for name, why in stored.unreadable.items():
        reason = f"stored spec refused ({why}): fix the jobs file and apply it again"
        rows.append({"job": name, "health": "invalid", "reason": reason})
    rows.sort(key=lambda row: str(row["job"]))
    return fleet, rows


# Why a job is in the state of its first record, before any flip.
_UNFLIPPED = {"new": "no run yet", "paused": "the job is disabled"}


async def _recent_duplicates(session: AsyncSession, since: datetime) -> dict[str, int]:
    """How many repeats of already-run triggers each job had since ``since`` (not run again)."""
    counted = await session.execute(
        select(RunRow.job, func.count())
        .where(RunRow.started_at >= since, RunRow.status == RunStatus.DUPLICATE.value)
        .group_by(RunRow.job)
    )
    return {job: count for job, count in counted.all()}


async def ping(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet ping NAME``: a signed heartbeat, confirmed by the broker."""
    if args.start:
        kind = HeartbeatKind.START
    elif args.fail or (args.exit_code not in (None, 0)):
        kind = HeartbeatKind.FAIL
    else:
        kind = HeartbeatKind.SUCCESS
    try:
        beat = JobHeartbeat(
            id=uuid.uuid4().hex,
            job=args.name,
            kind=kind,
            exit_code=args.exit_code,
            at=utcnow(),
            message=args.message,
            rid=args.rid,
        )
    except ValidationError as exc:
        raise CronfleetError(f"cannot send that heartbeat: {exc.errors()[0]['msg']}") from exc
    keyring = settings.keyring()
    keyring.signer(Role.PING, beat.job, who="`cronfleet ping`")
    # Passively: a ping user may publish heartbeats but not declare (or delete) anything.
    connection = await connect(settings.amqp_url, "cronfleet-cli", wait=False)
    try:
        topology = Topology(settings.namespace)
        publisher = await Publisher.open(connection, topology, keyring, declare=False)
        await publisher.event(beat)
    finally:
        await connection.close()
    print(f"sent {kind.value} heartbeat for {args.name}")
    return 0


async def keys(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet keys new --role ROLE [--id ID] [--ed25519] [--jobs a,b]``: print a fresh key
    entry for CRONFLEET_KEYS (for ``--ed25519``, the private entry for schedulers and the public
    one for workers, each under a comment saying where it goes)."""
    role = Role(args.role)
    jobs = [name.strip() for name in (args.jobs or "").split(",") if name.strip()]
    if args.ed25519:
        if role is not Role.TRIGGER:
            raise ConfigError("--ed25519 is for trigger keys only (--role trigger)")
        private, public = new_ed25519_pair(args.id)
        print("# for schedulers and `cronfleet trigger` only: signs triggers (keep it secret)")
        print(private)
        print("# for workers: verifies triggers, cannot sign one")
        print(public)
        return 0
    if jobs and role is not Role.PING:
        raise ConfigError("--jobs limits ping keys only (--role ping)")
    entry = new_key(role, args.id, jobs=jobs)
    Keyring.parse(entry)  # a bad --id or job name fails here, in one line
    print(entry)
    return 0


async def schema(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet schema``: the JSON Schema of every wire message, keyed by message type."""
    schemas = {m.model_fields["type"].default: m.model_json_schema() for m in ALL_MESSAGES}
    sys.stdout.write(orjson.dumps(schemas, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
