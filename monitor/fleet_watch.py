"""The monitor's watch on the fleet: it keeps the newest heartbeat of each scheduler and worker
from the events it records, looks at the pool queues and the dead-letter queue, and every
heartbeat interval applies ``monitor.fleet.decide`` to each component, storing the records in
``fleet_health`` and each change of state as a flip in ``flips``.

Several monitors share the events (each sees a part of the heartbeats) and may look at once: a
look's transaction is serialised with every other monitor's (an advisory lock on PostgreSQL,
SQLite's write lock), and the newest heartbeat of a component is the newer of what this monitor
saw and what is stored, so a flip is decided and stored once. A worker that went down holding runs
has its runs still ``running`` marked ``lost`` in the same transaction (an UPDATE of the runs
still running: doing it twice changes nothing), and each lost run is fed to its job's health.

While the monitor cannot see the broker, heartbeats cannot reach it: for a ``heartbeat_timeout``
after it sees the broker again (and after it starts) no scheduler or worker is judged silent; nor
while events wait in the monitors' queue (a heartbeat stuck behind a backlog is no silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity
from sqlalchemy import Table, delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from common.cancel import stop_if_cancelled
from common.clock import Clock, utcnow
from common.connection import CONNECT_ERRORS, link_loss_as_error, open_channel
from common.messages import Event, RunStatus, SchedulerHeartbeat, WorkerHeartbeat
from common.retry import OutageLog
from common.settings import Settings
from common.store import STORE_OUTAGES, FleetHealthRow, JobRow, RunRow, Store
from common.store.locks import dialect_of, take_sqlite_write_lock
from common.topology import Topology
from monitor.fleet import (
    ComponentRecord,
    DeadLettersSeen,
    Decision,
    FleetPolicy,
    Kind,
    Observation,
    PoolSeen,
    SchedulerSeen,
    WorkerSeen,
    component_key,
    decide,
    silent,
)
from monitor.health import RunFinishedInput, State
from monitor.health_store import Advanced, HealthBatch, JobFlip, log_flips, read_specs, store_flips, whole

log = logging.getLogger("cronfleet.monitor")

_FLEET = cast(Table, FleetHealthRow.__table__)
# Fleet looks of all monitors take turns on this PostgreSQL advisory lock ("flee").
_FLEET_LOCK = 0x666C6565
_NO_ACTION = '{"action":null'


def fleet_policy(settings: Settings) -> FleetPolicy:
    """The thresholds of ``settings``: see ``common.settings`` and docs/monitoring.md."""
    return FleetPolicy(
        heartbeat_timeout=timedelta(seconds=settings.fleet_missed_heartbeats * settings.heartbeat_seconds),
        dead_letters_quiet=timedelta(seconds=settings.fleet_dead_letters_quiet_seconds),
        forget_after=timedelta(seconds=settings.fleet_forget_seconds),
    )


@dataclass(frozen=True)
class BrokerLook:
    """What the broker showed at one look: each pool's queue, and the dead-letter queue's size."""

    pools: dict[str, PoolSeen]
    dead_letters: int
    # Events ready in the monitors' queue that no monitor has taken yet: heartbeats may be among them.
    backlog: int = 0


class FleetWatch:
    """The fleet's heartbeats as this monitor saw them, and the loop that decides the fleet."""

    def __init__(
        self,
        store: Store,
        connection: AbstractRobustConnection,
        topology: Topology,
        policy: FleetPolicy,
        interval: float,
        on_health: Callable[[Advanced], None] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.connection = connection
        self.topology = topology
        self.policy = policy
        self.interval = interval
        self.on_health = on_health
        self.clock = clock
        self.schedulers: dict[str, datetime] = {}
        self.workers: dict[str, WorkerHeartbeat] = {}
        self.looks = 0
        # Since when this monitor sees the broker without a break (None: it does not now).
        self._seeing_since: datetime | None = None

    def note(self, event: Event) -> None:
        """Keep ``event`` if it is the newest heartbeat of its scheduler or worker. Its instant
        counts, capped by now: a clock ahead of the monitor's does not keep a process alive."""
        match event:
            case SchedulerHeartbeat():
                at = min(event.at, self.clock())
                known = self.schedulers.get(event.scheduler)
                if known is None or at > known:
                    self.schedulers[event.scheduler] = at
            case WorkerHeartbeat():
                seen = self.workers.get(event.worker)
                if seen is None or event.at > seen.at:
                    self.workers[event.worker] = event.model_copy(update={"at": min(event.at, self.clock())})

    async def run_forever(self, started: Callable[[], Awaitable[None]]) -> None:
        """Once ``started()`` returns (the queued events are recorded), look at the fleet every
        ``interval`` seconds, forever. An unavailable store or broker is logged and retried."""
        await started()
        stop_if_cancelled()
        outage = OutageLog(log, "the monitor's fleet watch, waiting for the store")
        while True:
            stop_if_cancelled()
            try:
                await self.look(self.clock())
                outage.ended()
            except Exception as exc:
                stop_if_cancelled()
                if isinstance(exc, STORE_OUTAGES):
                    outage.failed(exc)
                else:
                    log.exception("unexpected error while watching the fleet; retrying")
            await asyncio.sleep(self.interval)

    async def look(self, now: datetime) -> Advanced:
        """Look at the broker and decide every component at ``now``, in one transaction; returns
        the flips stored (of the fleet, and of the jobs whose runs were lost)."""
        async with self.store.session() as session:
            pools = await _known_pools(session)
        pools |= {beat.pool for beat in self.workers.values()}
        broker = await self._look_at_broker(pools)
        if broker is None:
            self._seeing_since = None
        elif self._seeing_since is None:
            self._seeing_since = now
        # Heartbeats are judged only while they can reach this monitor, and while the monitors
        # keep up with the events (a heartbeat stuck behind a backlog is not a silence).
        judge_heartbeats = (
            broker is not None
            and broker.backlog == 0
            and self._seeing_since is not None
            and now - self._seeing_since > self.policy.heartbeat_timeout
        )
        if broker is not None and broker.backlog:
            log.info(
                "%d event(s) wait for the monitors: no scheduler or worker judged silent now", broker.backlog
            )
        self._forget_old_schedulers(now)
        advanced = await whole(self._decide(now, broker, judge_heartbeats))
        self.looks += 1
        log_flips(advanced)
        if self.on_health is not None and (advanced.flips or advanced.deadlines):
            self.on_health(advanced)
        return advanced

    def _forget_old_schedulers(self, now: datetime) -> None:
        """Drop schedulers not heard for ``forget_after`` (each restart brings a new name)."""
        for name, at in list(self.schedulers.items()):
            if now - at > self.policy.forget_after:
                del self.schedulers[name]

    async def _look_at_broker(self, pools: Collection[str]) -> BrokerLook | None:
        """Message and consumer counts by passive declares; None when the broker cannot be seen."""
        seen: dict[str, PoolSeen] = {}
        try:
            with link_loss_as_error():
                channel = await open_channel(self.connection)
                try:
                    for pool in sorted(pools):
                        counts = await _counts(channel, self.topology.pool_queue(pool))
                        if counts is None:  # not declared yet: nothing waits in it
                            channel = await open_channel(self.connection)
                            counts = (0, 0)
                        seen[pool] = PoolSeen(waiting=counts[0], consumers=counts[1])
                    dead = await _counts(channel, self.topology.dead_queue)
                    if dead is None:
                        channel = await open_channel(self.connection)
                    backlog = await _counts(channel, self.topology.monitor_queue)
                    if backlog is None:
                        channel = await open_channel(self.connection)
                finally:
                    with contextlib.suppress(*CONNECT_ERRORS):
                        await channel.close()
        except CONNECT_ERRORS as exc:
            log.warning("the monitor cannot look at the fleet's queues (%s)", exc)
            return None
        return BrokerLook(seen, 0 if dead is None else dead[0], 0 if backlog is None else backlog[0])

    async def _decide(self, now: datetime, broker: BrokerLook | None, judge_heartbeats: bool) -> Advanced:
        async with self.store.session() as session, session.begin():
            await _lock(session)
            rows = {row.component: row for row in (await session.execute(select(FleetHealthRow))).scalars()}
            looks: list[tuple[Kind, str, Observation]] = []
            if judge_heartbeats:
                looks.append((Kind.SCHEDULER, "", await self._schedulers(session)))
                looks.extend(await self._workers(session, rows, now))
            if broker is not None:
                looks.extend((Kind.POOL, pool, seen) for pool, seen in broker.pools.items())
                looks.append((Kind.DEAD_LETTERS, "", DeadLettersSeen(broker.dead_letters)))
            flips: list[JobFlip] = []
            lost: list[RunRow] = []
            for kind, name, seen in looks:
                key = component_key(kind, name)
                row = rows.get(key)
                decision = decide(kind, None if row is None else _record(row), seen, self.policy, now)
                await _store(session, kind, name, key, row, decision, now)
                flips.extend(JobFlip(key, flip) for flip in decision.flips)
                if decision.lose_runs:
                    lost.extend(await _lose_runs(session, name, now))
                if kind is Kind.WORKER and decision.record is None:
                    self.workers.pop(name, None)
            flips = await store_flips(session, flips, now)
            advanced = await _feed_lost_runs(session, lost, now)
        advanced.flips.extend(flips)
        return advanced

    async def _schedulers(self, session: AsyncSession) -> SchedulerSeen:
        # Only an enabled job with an action needs a scheduler; a stored spec is canonical JSON
        # with sorted keys, so a job without one starts with its null action.
        planned = JobRow.enabled.is_(True) & ~JobRow.spec.startswith(_NO_ACTION, autoescape=True)
        needed = await session.scalar(select(JobRow.name).where(planned).limit(1))
        last = max(self.schedulers.values(), default=None)
        return SchedulerSeen(last_heartbeat=last, needed=needed is not None)

    async def _workers(
        self, session: AsyncSession, rows: dict[str, FleetHealthRow], now: datetime
    ) -> list[tuple[Kind, str, Observation]]:
        """A look at every worker this monitor heard or the store lists, with the runs each still
        holds in the store; and at every worker neither knows that holds runs (forgotten, or
        never heard) and whose latest run started longer than a heartbeat timeout ago."""
        held = await _held_runs(session)
        seen: dict[str, WorkerSeen] = {}
        for stored_row in rows.values():
            if stored_row.kind == Kind.WORKER.value and stored_row.seen_at is not None:
                count, since = held.get(stored_row.name, (0, None))
                seen[stored_row.name] = WorkerSeen(stored_row.seen_at, stored_row.count or 0, count, since)
        for name, beat in self.workers.items():
            stored = seen.get(name)
            if stored is None or beat.at > stored.last_heartbeat:
                count, since = held.get(name, (0, None))
                seen[name] = WorkerSeen(beat.at, beat.running, count, since)
        for name, (count, latest) in held.items():
            if name not in seen and latest is not None and silent(latest, self.policy, now):
                seen[name] = WorkerSeen(latest, 0, count, latest)
        return [(Kind.WORKER, name, worker) for name, worker in sorted(seen.items())]


async def _held_runs(session: AsyncSession) -> dict[str, tuple[int, datetime | None]]:
    """Each worker with runs the store has ``running``: how many, and when the latest started."""
    rows = await session.execute(
        select(RunRow.worker, func.count(), func.max(RunRow.started_at))
        .where(RunRow.status == RunStatus.RUNNING.value, RunRow.worker.is_not(None))
        .group_by(RunRow.worker)
    )
    return {str(worker): (int(count), latest) for worker, count, latest in rows}


async def _known_pools(session: AsyncSession) -> set[str]:
    """The pools of the stored jobs and of the pools already watched."""
    pools = set((await session.execute(select(JobRow.pool).distinct())).scalars())
    watched = select(FleetHealthRow.name).where(FleetHealthRow.kind == Kind.POOL.value)
    return pools | set((await session.execute(watched)).scalars())


async def _counts(channel: AbstractChannel, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue``, or None when it does not exist (the broker then
    closed ``channel``)."""
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        return None
    result = declared.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def _lock(session: AsyncSession) -> None:
    """Take the fleet's turn for this transaction: one monitor decides the fleet at a time."""
    if dialect_of(session) == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FLEET_LOCK})
    else:
        await take_sqlite_write_lock(session)


def _record(row: FleetHealthRow) -> ComponentRecord:
    return ComponentRecord(State(row.state), row.since, row.seen_at, row.count, row.detail)


async def _store(
    session: AsyncSession,
    kind: Kind,
    name: str,
    key: str,
    row: FleetHealthRow | None,
    decision: Decision,
    now: datetime,
) -> None:
    record = decision.record
    if record is None:
        if row is not None:
            await session.execute(delete(_FLEET).where(_FLEET.c.component == key))
        return
    values: dict[str, Any] = {
        "state": record.state.value,
        "since": record.since,
        "seen_at": record.seen_at,
        "count": record.count,
        "detail": record.detail,
        "updated_at": now,
    }
    if row is None:
        session.add(FleetHealthRow(component=key, kind=kind.value, name=name, **values))
    elif row.state != record.state.value or (row.since, row.seen_at, row.count, row.detail) != (
        record.since,
        record.seen_at,
        record.count,
        record.detail,
    ):
        for column, value in values.items():
            setattr(row, column, value)


async def _lose_runs(session: AsyncSession, worker: str, now: datetime) -> list[RunRow]:
    """Mark ``worker``'s runs still ``running`` as ``lost`` at ``now``; returns them. Runs another
    monitor (or a late ``run.finished``) already ended are left alone, including an end the
    recorder commits while this transaction reads: the runs are read locked, and PostgreSQL reads
    a run that an uncommitted end holds again once that end commits (without the lock, ``lost``
    was written over it)."""
    found = await session.execute(
        select(RunRow)
        .where(RunRow.worker == worker, RunRow.status == RunStatus.RUNNING.value)
        .with_for_update()
    )
    runs = list(found.scalars())
    for run in runs:
        run.status = RunStatus.LOST.value
        run.finished_at = now
        run.duration_seconds = max(0.0, (now - run.started_at).total_seconds())
        run.error = f"lost: worker {worker} stopped sending heartbeats"
        log.warning(
            "run %s of job %s marked lost: worker %s stopped sending heartbeats", run.run_id, run.job, worker
        )
    return runs


async def _feed_lost_runs(session: AsyncSession, runs: list[RunRow], now: datetime) -> Advanced:
    """Feed each lost run to its job's health machine, in this transaction."""
    if not runs:
        return Advanced()
    await session.flush()
    jobs = {run.job for run in runs}
    specs = await read_specs(session, jobs)
    batch = HealthBatch(session, now)
    await batch.load(jobs, specs)
    for run in sorted(runs, key=lambda r: r.started_at):
        batch.advance(run.job, RunFinishedInput(run.run_id, RunStatus.LOST, now, run.started_at))
    return await batch.save()
