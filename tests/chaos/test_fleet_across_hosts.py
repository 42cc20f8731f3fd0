"""A fleet spread over hosts loses nothing when the links of a worker host, a scheduler host and
the monitor's host are cut mid-run, and comes back to normal by itself once they are restored.

The hosts are network namespaces of this machine (``tests.chaos.hosts``): the broker (a RabbitMQ
node of its own) and the database (a PostgreSQL instance of its own) on one, two schedulers,
three workers and the monitor on one each, every one a separate ``cronfleet`` process. Each cut
is longer than every failure detector of the fleet: the broker's and the clients' AMQP
heartbeat (set short in the URL, as ``?heartbeat=N``, to fit the test into a minute), the
workers' claim lease and the monitor's judgement of a silent worker. So the broker takes the
cut worker's unacked triggers back and hands them to the others, the other scheduler takes over
the cut one's unpublished fires, the events wait for the monitor in its queue, and when the
links come back the cut processes reconnect and report what they did meanwhile.

Counted over every fire due from just before the first cut to just after the last restore:
*missing*, a fire without a succeeded run; *lost*, a run that ended ``lost`` or is still
``running``; *unflagged duplicates*, a fire executed more than once with more than one of its
executions not marked ``redelivered``; *flagged duplicates*, the ``duplicate`` runs (a repeat
not executed) and the executions beyond a fire's first that are marked ``redelivered`` (the cut
worker ran it, and so did the worker the broker gave its trigger to once the cut worker's claim
had lapsed: the promise for a worker that vanished holding a trigger).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from common.messages import trigger_id
from common.settings import Settings
from common.store import FireRow, FleetHealthRow, RunRow, Store
from tests.chaos.hosts import Host, NamespacedBroker, NamespacedPostgres, Network, refusal, sweep_abandoned
from tests.conftest import TEST_KEYS, Counts
from tests.fleet import eventually, log_lines_about, service_environment
from tests.integration.helpers import apply_toml
from worker.actions import RunContext
from worker.functions import job_function

JOBS = 20
# Each link stays cut this long: past the AMQP heartbeat timeout (both ends give up on the
# connection), the claim lease and the monitor's patience with a silent worker.
CUT_SECONDS = 25.0
# (seconds after the counted window opens, host, cut or restored): the worker first, so that the
# monitor marks its runs lost before its own link is cut; the cuts overlap.
TIMELINE = [
    (3.0, "w1", True),
    (11.0, "s1", True),
    (16.0, "mon", True),
    (3.0 + CUT_SECONDS, "w1", False),
    (11.0 + CUT_SECONDS, "s1", False),
    (16.0 + CUT_SECONDS, "mon", False),
]
AMQP_HEARTBEAT_SECONDS = 5
RUN_SECONDS = 0.5
# A fire counts as late when its first run started more than this after it was due.
LATE_SECONDS = 5.0
REPO = Path(__file__).resolve().parents[2]


@job_function
def tick(run: RunContext) -> None:
    """The jobs' action: half a second of nothing, so that a cut link always catches runs in
    progress on the cut worker (about three at any instant)."""
    time.sleep(RUN_SECONDS)


@dataclass
class Hosts:
    """The test's hosts, with the broker and the database running on ``db``."""

    network: Network
    db: Host
    broker: NamespacedBroker
    postgres: NamespacedPostgres


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """Hosts ``db`` (broker and database), ``s1``, ``s2``, ``w1``..``w3`` and ``mon``; everything is
    stopped and every namespace deleted when the test ends, whatever happened."""
    reason = refusal()
    if reason is not None:
        pytest.skip(reason)
    sweep_abandoned()
    network = Network()
    postgres: NamespacedPostgres | None = None
    try:
        db = network.add_host("db", 1)
        for number, name in enumerate(("s1", "s2"), start=11):
            network.add_host(name, number)
        for number, name in enumerate(("w1", "w2", "w3"), start=21):
            network.add_host(name, number)
        network.add_host("mon", 31)
        postgres = NamespacedPostgres(db)
        postgres.start()
        broker = NamespacedBroker(db, tmp_path / "rabbitmq")
        broker.start()
        yield Hosts(network, db, broker, postgres)
    finally:
        if postgres is not None:
            postgres.stop()
        network.close()


class Processes:
    """The fleet's processes, one per host, each logging to ``logs/HOST.log``."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.environment = service_environment(settings)
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir()

    def start(self, host: Host, *args: str) -> None:
        """``cronfleet ARGS`` on ``host``."""
        cronfleet = str(Path(sys.executable).parent / "cronfleet")
        with (self.logs / f"{host.name}.log").open("ab") as log:
            self.running[host.name] = host.start([cronfleet, *args], self.environment, log, REPO)

    async def stop(self) -> None:
        """SIGTERM each, and SIGKILL those not gone 20 s later."""
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.running.values():
            try:
                await asyncio.to_thread(process.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def exited(self) -> list[str]:
        """The hosts whose process has ended."""
        return [host for host, process in self.running.items() if process.poll() is not None]

    def name(self, host: Host, role: str) -> str:
        """The process's default name (``role@host:pid``), as it signs runs and claims."""
        return f"{role}@{host.name}:{self.running[host.name].pid}"


async def test_links_of_a_worker_a_scheduler_and_the_monitor_cut_and_restored_lose_nothing(
    hosts: Hosts, tmp_path: Path, counts: Counts
) -> None:
    settings = Settings(
        amqp_url=f"{hosts.broker.url}?heartbeat={AMQP_HEARTBEAT_SECONDS}",
        database_url=hosts.postgres.url,
        keys=TEST_KEYS,
        namespace="cronfleet",
        heartbeat_seconds=1,
        jobs_reload_seconds=1,
        claim_lease_seconds=5,
        drain_seconds=5,
    )
    store = await Store.open(hosts.postgres.local_url, upgrade=True)
    network, on = hosts.network, hosts.network.hosts
    fleet = Processes(settings, tmp_path / "logs")
    try:
        await apply_toml(
            store,
            "\n".join(
                f"""
                [jobs.every-second-{i:02d}]
                schedule = "* * * * * *"
                action = {{ type = "python", function = "{__name__}:tick" }}
                """
                for i in range(JOBS)
            ),
        )
        # The monitor first: it declares the events queue, which every other process reports to.
        fleet.start(on["mon"], "monitor")
        await eventually(lambda: _fleet_health(store), timeout=30, every=0.5)
        for name in ("s1", "s2"):
            fleet.start(on[name], "scheduler")
        for name in ("w1", "w2", "w3"):
            fleet.start(on[name], "worker", "--concurrency", "8", "--import", __name__)
        workers = [fleet.name(on[name], "worker") for name in ("w1", "w2", "w3")]
        since = datetime.now(UTC)
        await eventually(lambda: _all_ran_since(store, workers, since), timeout=45, every=0.5)

        began = datetime.now(UTC)
        restored: dict[str, datetime] = {}
        for at, host, cut in TIMELINE:
            await asyncio.sleep(max(0.0, at - (datetime.now(UTC) - began).total_seconds()))
            if cut:
                network.cut(on[host])
            else:
                network.restore(on[host])
                restored[host] = datetime.now(UTC)
        await asyncio.sleep(5)
        ended = datetime.now(UTC)

        due = [
            trigger_id(f"every-second-{i:02d}", datetime.fromtimestamp(second, UTC))
            for second in range(int(began.timestamp()) + 1, int(ended.timestamp()) + 1)
            for i in range(JOBS)
        ]
        w1, s1 = workers[0], fleet.name(on["s1"], "scheduler")

        async def not_yet_normal() -> list[str]:
            runs = await _runs(store, due)
            succeeded = {run.trigger_id for run in runs if run.status == "succeeded"}
            waiting = [
                f"{len(set(due) - succeeded)} fire(s) not run",
                f"{sum(run.status == 'running' for run in runs)} run(s) still running",
                "w1 runs nothing" if not await _ran_since(store, w1, restored["w1"]) else "",
                "s1 fires nothing" if not await _claimed_since(store, s1, restored["s1"]) else "",
                # Heartbeats of every worker judged since both w1 and the monitor came back.
                await _fleet_not_up(store, workers, max(restored["w1"], restored["mon"])),
                ", ".join(f"{host} exited" for host in fleet.exited()),
            ]
            return [what for what in waiting if what and not what.startswith("0 ")]

        # Everything due has run, the cut worker runs again, the cut scheduler fires again and
        # the monitor sees the whole fleet up: by itself, nothing restarted.
        not_normal: list[str] = []

        async def normal() -> bool:
            not_normal[:] = await not_yet_normal()
            return not not_normal

        back = True
        try:
            await eventually(normal, timeout=60, every=1.0)
        except AssertionError:
            back = False
        runs = await _runs(store, due)
        health = await _fleet_health(store)
    finally:
        await fleet.stop()
        await store.close()

    by_fire: dict[str, list[_Run]] = defaultdict(list)
    for run in runs:
        by_fire[run.trigger_id].append(run)
    executed = {
        fire: [r for r in fire_runs if r.status != "duplicate"] for fire, fire_runs in by_fire.items()
    }
    missing = [fire for fire in due if not any(r.status == "succeeded" for r in executed.get(fire, []))]
    lost = [run for run in runs if run.status in ("lost", "running")]
    # A fire executed more than once: every execution but one must be marked a redelivery.
    unflagged = [fire for fire, done in executed.items() if sum(not r.redelivered for r in done) > 1]
    flagged = sum(r.status == "duplicate" for r in runs) + sum(
        max(0, len(done) - 1) for fire, done in executed.items() if fire not in unflagged
    )
    first_start = {fire: min(r.started_at for r in done) for fire, done in executed.items() if done}
    late = sum(
        1
        for fire in due
        if fire in first_start and first_start[fire] - _due_at(fire) > timedelta(seconds=LATE_SECONDS)
    )
    statuses = Counter(run.status for run in runs)
    counts(
        f"fleet across hosts: w1, s1 and mon cut {CUT_SECONDS:g} s each, {len(due)} fires due ({JOBS} jobs "
        f"every second); missing {len(missing)}, lost {len(lost)}, unflagged duplicates {len(unflagged)}, "
        f"flagged duplicates {flagged} (duplicate runs {statuses['duplicate']}, "
        f"redelivered re-executions {flagged - statuses['duplicate']}); late (> {LATE_SECONDS:g} s) {late}; "
        f"runs by status {dict(sorted(statuses.items()))}; back to normal by itself: {back}"
    )
    for component, state, detail in health:
        if state != "up":
            counts(f"  fleet: {component} {state} ({detail})")
    if missing or lost or unflagged or not back:
        # What the processes said of the fires that went wrong, and what was not yet normal.
        story = log_lines_about(
            sorted(fleet.logs.glob("*.log")),
            [*missing[:8], *(r.trigger_id for r in lost[:8]), *(r.run_id for r in lost[:8]), *unflagged[:8]],
        )
        counts(f"not normal at the end: {'; '.join(not_normal) or 'nothing'}\n{story}")
    assert missing == [], f"fires never run: {missing[:5]}"
    assert lost == [], f"runs lost: {[(r.trigger_id, r.worker, r.status) for r in lost[:5]]}"
    assert unflagged == [], f"fires run twice without a flag: {unflagged[:5]}"
    assert back, f"not back to normal by itself: {'; '.join(not_normal)} (logs in {fleet.logs})"


@dataclass(frozen=True)
class _Run:
    run_id: str
    trigger_id: str
    status: str
    worker: str
    redelivered: bool
    started_at: datetime


def _due_at(fire: str) -> datetime:
    """When ``fire`` (``job@instant``) was due."""
    return datetime.fromisoformat(fire.rsplit("@", 1)[1])


async def _runs(store: Store, trigger_ids: list[str]) -> list[_Run]:
    runs: list[_Run] = []
    async with store.session() as session:
        for first in range(0, len(trigger_ids), 500):
            rows = await session.execute(
                select(
                    RunRow.run_id,
                    RunRow.trigger_id,
                    RunRow.status,
                    RunRow.worker,
                    RunRow.redelivered,
                    RunRow.started_at,
                ).where(RunRow.trigger_id.in_(trigger_ids[first : first + 500]))
            )
            runs.extend(_Run(str(i), str(t), str(s), str(w), bool(r), at) for i, t, s, w, r, at in rows)
    return runs


async def _ran_since(store: Store, worker: str, since: datetime) -> bool:
    async with store.session() as session:
        found = await session.scalar(
            select(func.count()).where(RunRow.worker == worker, RunRow.started_at > since)
        )
    return bool(found)


async def _all_ran_since(store: Store, workers: list[str], since: datetime) -> bool:
    return all([await _ran_since(store, worker, since) for worker in workers])


async def _claimed_since(store: Store, scheduler: str, since: datetime) -> bool:
    async with store.session() as session:
        found = await session.scalar(
            select(func.count()).where(FireRow.claimed_by == scheduler, FireRow.claimed_at > since)
        )
    return bool(found)


async def _fleet_health(store: Store) -> list[tuple[str, str, str]]:
    """Each component the monitor keeps: (component, state, detail)."""
    async with store.session() as session:
        rows = await session.execute(
            select(FleetHealthRow.component, FleetHealthRow.state, FleetHealthRow.detail)
        )
        return [(str(c), str(s), str(d)) for c, s, d in rows]


async def _fleet_not_up(store: Store, workers: list[str], since: datetime) -> str:
    """What of the fleet the monitor does not see up ('' when all is), each of ``workers`` with
    a heartbeat seen after ``since`` (the monitor's fleet watch goes on)."""
    async with store.session() as session:
        rows = (await session.execute(select(FleetHealthRow))).scalars().all()
    down = [f"{row.component} {row.state} ({row.detail})" for row in rows if row.state != "up"]
    seen = {row.name: row.seen_at for row in rows if row.kind == "worker"}
    for worker in workers:
        at = seen.get(worker)
        if at is None or at <= since:
            down.append(f"no heartbeat of {worker} seen since {since:%H:%M:%S}")
    return "; ".join(down)
