"""A fleet on a three-node RabbitMQ cluster rides out the loss of a node (stopped), then of the
node that holds its pool queue's leader (killed): no fire lost, no run lost, every repeat
flagged, and the fleet back to normal by itself.

Every process is given every node's URL (``CRONFLEET_AMQP_URL=amqp://...node0,amqp://...node1,
...``), each list starting at another node so that the connections spread over the cluster; a
client whose node stops reconnects to the next one (``common.failover``). The queues are quorum
queues with a member on each node: when the leader's node stops, a follower takes over.

Measured before the publisher published again what a lost connection cut (``common.publisher``): when
the first node stopped, 10 runs stayed ``running`` for ever (their run.started was routed, its
confirm lost, the trigger given back and run by another run), so 10 fires showed two runs.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.settings import Settings, split_urls
from common.store import Store
from common.topology import Topology
from tests.chaos.cluster import PrivateCluster, cluster_fixture
from tests.chaos.conftest import PrivateBroker
from tests.conftest import STORES, Counts
from tests.fleet import (
    declare_pool,
    log_tails,
    monitor_process,
    scheduler_process,
    stop_processes,
    worker_process,
)
from tests.integration.helpers import FireTally, apply_toml, due_fires, every_second_jobs, trigger_runs

JOBS = 50
SCHEDULERS = 2
WORKERS = 2
# How long each stopped node stays down, under load.
OUTAGE_SECONDS = 6.0
# How long the fleet runs on once the cluster is whole again.
RECOVERED_SECONDS = 8.0
# Runs at once per worker: about 75 are in flight at any instant (50 a second, 1.5 s each), so
# that every node that goes down holds deliveries and events in flight, whenever it goes; the
# slots leave room to work off the backlog an outage leaves.
CONCURRENCY = 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """The module's private three-node cluster."""
    yield from cluster_fixture(tmp_path_factory.mktemp("cluster"))


def _rotated(settings: Settings, first: int) -> Settings:
    """``settings`` whose node list starts at node ``first`` (so processes spread over nodes)."""
    urls = split_urls(settings.amqp_url)
    first %= len(urls)
    return settings.model_copy(update={"amqp_url": ",".join(urls[first:] + urls[:first])})


def _short(node: str) -> str:
    return node.split("@")[0].rsplit("-", 1)[-1]


# On the store the fleet would use across hosts: PostgreSQL when the suite has one.
@pytest.mark.parametrize("settings", [STORES[-1]], indirect=True)
async def test_a_node_then_the_leaders_node_stopped_under_load_lose_nothing(
    cluster: PrivateCluster, settings: Settings, store: Store, counts: Counts, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"amqp_url": cluster.url})
    # Each process's log, shown when the fleet does not come back.
    names = ["monitor", *(f"worker-{i}" for i in range(WORKERS))]
    names += [f"scheduler-{i}" for i in range(SCHEDULERS)]
    logs = {name: tmp_path / f"{name}.log" for name in names}
    namespace = settings.namespace
    topology = Topology(namespace)
    jobs = every_second_jobs("cluster", JOBS, "tests.integration.job_functions:a_second_and_a_half", 120)
    await apply_toml(store, jobs)
    await declare_pool(settings, "default")
    members = cluster.members(topology.pool_queue("default"))
    processes: list[subprocess.Popen[bytes]] = []
    stopped: list[str] = []
    # Seconds from each node's loss until every consumer was back; where the leader went.
    recovery: list[float] = []
    moved: list[str] = []
    try:
        processes.append(monitor_process(_rotated(settings, 0), logs["monitor"]))
        for index in range(WORKERS):
            processes.append(
                worker_process(
                    _rotated(settings, index + 1),
                    "--concurrency",
                    str(CONCURRENCY),
                    "--import",
                    "tests.integration.job_functions",
                    cwd=REPO,
                    log=logs[f"worker-{index}"],
                )
            )
        for index in range(SCHEDULERS):
            processes.append(scheduler_process(_rotated(settings, index + 2), logs[f"scheduler-{index}"]))
        await _until(lambda: _consumed(cluster, topology), 60, "the fleet did not start consuming")
        await asyncio.sleep(3)  # the schedulers plan and publish
        began = datetime.now(UTC)

        # 1. A node that holds neither the pool queue's leader nor the monitor queue's; the
        # processes whose list starts with it lose their connection.
        watched = (topology.pool_queue("default"), topology.monitor_queue)
        leaders = cluster.leaders(namespace)
        victim = next(node for node in cluster.nodes if node.name not in {leaders[q] for q in watched})
        stopped.append(f"{_short(victim.name)} (no leader; rabbitmqctl stop)")
        recovery.append(await _outage(cluster, topology, victim, cluster.stop))

        # 2. The node that holds the pool queue's leader.
        leaders = cluster.leaders(namespace)
        leader = cluster.node(leaders[topology.pool_queue("default")])
        held = [q.removeprefix(f"{namespace}.") for q in watched if leaders[q] == leader.name]
        others = sum(1 for q, node in leaders.items() if node == leader.name and q not in watched)
        stopped.append(
            f"{_short(leader.name)} (leader of {', '.join(held)} and {others} other queues; SIGKILL)"
        )
        recovery.append(await _outage(cluster, topology, leader, cluster.crash, moved))
        back = datetime.now(UTC)

        # 3. Back to normal by itself: fires keep running, with nothing more done.
        await asyncio.sleep(RECOVERED_SECONDS)
        ended = datetime.now(UTC)
        due = due_fires("cluster", JOBS, began, ended)
        deadline = time.monotonic() + 60
        while True:
            runs = await trigger_runs(store, [fire_id for fire_id, _at in due])
            ended_runs = {t for t, status, _s in runs if status not in ("duplicate", "running")}
            if all(fire_id in ended_runs for fire_id, _at in due) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        consumers = cluster.consumers(namespace)
        dead_letters = cluster.depth(topology.dead_queue)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{log_tails(logs.values())}") from None
    finally:
        await stop_processes(processes)

    tally = FireTally.of(due, runs)
    lost = sorted({t for t, status, _s in runs if status not in ("duplicate", "succeeded")})
    # How late runs started (reported, not asserted: it measures this machine as much as cronfleet).
    lag = {
        fire_id: (tally.started[fire_id] - at).total_seconds()
        for fire_id, at in due
        if fire_id in tally.started
    }
    lag_after = [lag[fire_id] for fire_id, at in due if at > back + timedelta(seconds=1) and fire_id in lag]
    back_after = " and ".join(f"{seconds:.1f}" for seconds in recovery)
    counts(
        f"rabbitmq cluster: 3 nodes (pool queue members {', '.join(map(_short, members))}), stopped "
        f"{' then '.join(stopped)}, leader moved to {_short(moved[0])}; {len(due)} fires due ({JOBS} "
        f"jobs every second, {SCHEDULERS} schedulers, {WORKERS} workers, a monitor); "
        f"missing {len(tally.missing)}, lost (not succeeded) {len(lost)}, "
        f"run twice unflagged {len(tally.unflagged)}, repeats flagged as duplicate "
        f"{sum(tally.flagged.values())}; start lag at most {max(lag.values(), default=0):.1f} s, "
        f"{max(lag_after, default=0):.1f} s once whole again; dead letters "
        f"{dead_letters}; every consumer back {back_after} s after each node went down"
    )
    assert len(members) == len(cluster.nodes), f"the pool queue has members on {members} only"
    assert moved[0] != leader.name
    assert tally.missing == [], f"fires never run: {tally.missing[:5]}"
    assert lost == [], f"runs that did not succeed: {lost[:5]}"
    assert tally.unflagged == [], f"fires run twice without a duplicate flag: {tally.unflagged[:5]}"
    assert _missing_consumers(consumers, topology) == []
    assert dead_letters == 0


def _consumed(cluster: PrivateCluster, topology: Topology) -> list[str]:
    """Which consumers are not there (see ``_missing_consumers``): none when all are."""
    return _missing_consumers(cluster.consumers(topology.namespace), topology)


def _missing_consumers(consumers: dict[str, int], topology: Topology) -> list[str]:
    """Which consumers of ``consumers`` (queue name -> count) are not there: the workers' on the
    pool queue, the monitor's on its queue, each scheduler's on its own control queue."""
    control = sum(1 for name, n in consumers.items() if name.startswith(topology.control_queue("")) and n)
    expected = {
        "pool queue": (consumers.get(topology.pool_queue("default"), 0), WORKERS),
        "monitor queue": (consumers.get(topology.monitor_queue, 0), 1),
        "control queues": (control, SCHEDULERS),
    }
    return [f"{what}: {found} of {wanted}" for what, (found, wanted) in expected.items() if found != wanted]


async def _outage(
    cluster: PrivateCluster,
    topology: Topology,
    node: PrivateBroker,
    stop: Callable[[PrivateBroker], None],
    leaders: list[str] | None = None,
) -> float:
    """Take ``node`` down with ``stop`` for OUTAGE_SECONDS (noting in ``leaders`` where the pool
    queue's leader is meanwhile), start it again, and return how long after it went down every
    consumer was back on the other nodes.

    It goes down just after a second begins, as the fires of that second are being published,
    delivered and run: some are in flight on the node's connections."""
    now = time.time()
    await asyncio.sleep(math.ceil(now) - now + 0.05)
    await asyncio.to_thread(stop, node)
    down = time.monotonic()
    await _until(lambda: _consumed(cluster, topology), 60, "consumers did not come back")
    failover = time.monotonic() - down
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - failover))
    if leaders is not None:
        leaders.append(cluster.leaders(topology.namespace)[topology.pool_queue("default")])
    await asyncio.to_thread(cluster.start, node)
    await _until(lambda: _consumed(cluster, topology), 60, "consumers were not there after the restart")
    return failover


async def _until(check: Callable[[], list[str]], timeout: float, failure: str) -> None:
    """Wait (off the loop: ``check`` runs rabbitmqctl) until ``check()`` finds nothing missing;
    the failure names what was still missing."""
    deadline = time.monotonic() + timeout
    while missing := await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"{failure} within {timeout:g} s: {'; '.join(missing)}")
        await asyncio.sleep(0.5)
