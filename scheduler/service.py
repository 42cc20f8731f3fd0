"""The scheduler process: wires the planner to the store (jobs, fires) and to the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from common import fires
from common.bus import CONNECT_ERRORS, Publisher, connect
from common.catalog import load_fingerprints, load_jobs
from common.clock import Clock, utcnow
from common.errors import BrokerUnavailable
from common.jobs import JobSpec
from common.messages import SchedulerHeartbeat, Trigger
from common.services import ServiceOptions
from common.settings import Settings
from common.signing import Role
from common.store import STORE_OUTAGES, Store
from common.topology import Topology
from scheduler.planner import Planner

log = logging.getLogger("cronfleet.scheduler")

OUTAGES = (*STORE_OUTAGES, BrokerUnavailable, *CONNECT_ERRORS)


class Scheduler:
    """One scheduler: reloads jobs, sleeps until the next fire, claims and publishes it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        name: str,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.name = name
        self.clock = clock
        self.planner = Planner()
        self.topology = Topology(settings.namespace)
        self._pools: set[str] = set()
        self._specs: dict[str, JobSpec] = {}
        self._fingerprints: dict[str, str] = {}
        self._reloaded_at: datetime | None = None
        # Triggers whose fire could not be claimed yet (the store was unavailable).
        self._unclaimed: list[Trigger] = []
        # Held while publishing: the outbox sweep must never see this scheduler's in-flight fires
        # as pending, or it would publish them a second time.
        self._publishing = asyncio.Lock()

    async def reload(self) -> None:
        """Re-read the jobs that changed since the last reload; declare any new pool's queue."""
        fingerprints = await load_fingerprints(self.store)
        changed = [name for name, fp in fingerprints.items() if self._fingerprints.get(name) != fp]
        removed = self._fingerprints.keys() - fingerprints.keys()
        for spec in await load_jobs(self.store, changed) if changed else []:
            self._specs[spec.name] = spec
        for name in removed:
            self._specs.pop(name, None)
        self._fingerprints = fingerprints
        now = self.clock()
        if changed or removed:
            self.planner.sync(self._specs.values(), now)
        self._reloaded_at = now
        planned = {s.pool for s in self._specs.values() if s.enabled and s.action is not None}
        for pool in planned - self._pools:
            await self.topology.declare_pool(self.publisher.channel, pool)
            self._pools.add(pool)

    async def plan_forever(self) -> None:
        """Fire due jobs as they fall due; reload the jobs every ``jobs_reload_seconds``.

        An unavailable store or broker is logged and retried; it never stops the loop.
        """
        reload_every = self.settings.jobs_reload_seconds
        while True:
            now = self.clock()
            try:
                # Fire first: a reload may re-plan a job, and what is due now must go out first.
                await self.fire_due(now)
                if self._reloaded_at is None or (now - self._reloaded_at).total_seconds() >= reload_every:
                    await self.reload()
                    await self.fire_due(self.clock())
            except OUTAGES as exc:
                log.warning("scheduler cannot reach the store or the broker (%s); retrying", exc)
                self._reloaded_at = self.clock()
            await asyncio.sleep(self._seconds_to_next_work(reload_every))

    def _seconds_to_next_work(self, reload_every: float) -> float:
        """Until the next fire, the next reload, or a retry of unclaimed fires, whichever is first."""
        now = self.clock()
        moments = [(self._reloaded_at or now) + timedelta(seconds=reload_every)]
        wakeup = self.planner.next_wakeup()
        if wakeup is not None:
            moments.append(wakeup)
        if self._unclaimed:
            moments.append(now + timedelta(seconds=1))
        return max(0.0, (min(moments) - now).total_seconds())

    async def fire_due(self, now: datetime) -> int:
        """Claim and publish every fire due by ``now``; returns how many this scheduler won.

        Fires that cannot be claimed because the store is unavailable are kept and claimed on a
        later call, until their triggers expire (an expired one is logged as lost).
        """
        published_at = self.clock()
        triggers = [
            *self._unclaimed,
            *(f.job.trigger_at(f.scheduled_at, published_at) for f in self.planner.pop_due(now)),
        ]
        self._unclaimed = []
        if not triggers:
            return 0
        try:
            async with self._publishing:
                won = await fires.publish_claimed(
                    self.store, self.publisher, triggers, self.name, published_at
                )
        except (SQLAlchemyError, *STORE_OUTAGES):
            for trigger in triggers:
                if trigger.expires_at > now:
                    self._unclaimed.append(trigger)
                else:
                    log.error("fire %s expired before the store could record it", trigger.id)
            raise
        for fire in won:
            log.info("fired %s", fire.trigger_id)
        return len(won)

    async def publish_pending_forever(self, every: float = 1.0) -> None:
        """Keep publishing fires the broker has not confirmed yet (after an outage or a crash)."""
        while True:
            try:
                async with self._publishing:
                    published = await fires.publish_pending(
                        self.store, self.publisher, self.name, self.clock()
                    )
            except OUTAGES as exc:
                log.debug("pending fires not published yet: %s", exc)
            else:
                if published:
                    log.warning("published %d trigger(s) that had been waiting for the broker", published)
            await asyncio.sleep(every)

    async def heartbeat_forever(self) -> None:
        """Say this scheduler is alive, every ``heartbeat_seconds``."""
        while True:
            beat = SchedulerHeartbeat(
                scheduler=self.name,
                at=self.clock(),
                jobs=len(self.planner),
                next_fire_at=self.planner.next_wakeup(),
            )
            with contextlib.suppress(BrokerUnavailable):
                await self.publisher.event(beat)
            await asyncio.sleep(self.settings.heartbeat_seconds)


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a scheduler until cancelled. Waits out an unreachable broker; fails on bad settings."""
    keyring = settings.keyring()
    # Triggers under the trigger key, its own heartbeats under the event key.
    keyring.require([Role.TRIGGER, Role.EVENT], who="a scheduler")
    name = options.instance("scheduler")
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        connection = await connect(settings.amqp_url, name, wait=True)
        try:
            publisher = await Publisher.open(connection, Topology(settings.namespace), keyring)
            scheduler = Scheduler(settings, store, publisher, name)
            await scheduler.reload()
            log.info("scheduler %s planning %d job(s)", name, len(scheduler.planner))
            options.ready.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(scheduler.plan_forever())
                tasks.create_task(scheduler.publish_pending_forever())
                tasks.create_task(scheduler.heartbeat_forever())
        finally:
            await connection.close()
    finally:
        await store.close()
