"""A herd's ticks computed ahead of its deadline (``PreparedTick``) and written at it: the same
records and flips as a tick computed at the deadline, and never one computed from a record or a
spec that changed meanwhile, whoever changed it. On both stores."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec
from common.store import FlipRow, JobHealthRow, Store
from monitor import deadlines as deadlines_module
from monitor.deadlines import Deadlines, tick
from monitor.health import RunStartedInput
from monitor.health_store import HealthBatch, PreparedTick, prepare_ticks, read_specs
from tests.bench.bench_ticks import herd
from tests.fleet import eventually

GRACE = 30.0


def _herd(prefix: str, count: int, due: datetime) -> list[JobSpec]:
    return herd(count, due, GRACE, prefix)


async def _fleet(store: Store, *prefixes: str, count: int = 20) -> tuple[datetime, list[list[str]]]:
    """Herds of ``count`` jobs each, all due at the same instant, with their health records."""
    now = utcnow().replace(microsecond=0)
    due = now + timedelta(seconds=5)
    herds = [_herd(prefix, count, due) for prefix in prefixes]
    await apply_jobs(store, [spec for herd in herds for spec in herd], now)
    names = [[spec.name for spec in herd] for herd in herds]
    await tick(store, [name for herd in names for name in herd], now)  # the records, `new`
    return due, names


async def _prepare(store: Store, jobs: Sequence[str], at: datetime) -> dict[str, PreparedTick]:
    async with store.session() as session:
        return await prepare_ticks(session, jobs, at)


async def _outcome(store: Store, jobs: Sequence[str]) -> list[tuple[Any, ...]]:
    """Each job's record and flips with its name taken out, in job order: what two herds of the
    same shape must have alike."""
    async with store.session() as session:
        records = {
            row.job: (row.state, row.since, row.due_at, row.deadline_at)
            for row in (
                await session.execute(select(JobHealthRow).where(JobHealthRow.job.in_(jobs)))
            ).scalars()
        }
        flips: dict[str, list[tuple[Any, ...]]] = {}
        query = select(FlipRow).where(FlipRow.job.in_(jobs)).order_by(FlipRow.id)
        for flip in (await session.execute(query)).scalars():
            flips.setdefault(flip.job, []).append((flip.from_state, flip.to_state, flip.at, flip.reason))
    return [(records[job], flips.get(job, [])) for job in sorted(jobs)]


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs ``HealthBatch.load`` read at a deadline (those not taken from a prepared tick)."""
    seen: list[str] = []
    load = HealthBatch.load

    async def spying(self: HealthBatch, jobs: Any, specs: Any) -> None:
        seen.extend(jobs)
        await load(self, jobs, specs)

    monkeypatch.setattr(HealthBatch, "load", spying)
    return seen


async def test_a_herd_ticked_ahead_ends_as_if_ticked_at_its_deadline(store: Store, loaded: list[str]) -> None:
    due, (ahead, now) = await _fleet(store, "ahead", "now")
    prepared = await _prepare(store, ahead, due)
    assert set(prepared) == set(ahead)
    loaded.clear()
    at = due + timedelta(milliseconds=3)
    late = await tick(store, ahead, at, prepared)
    assert loaded == []  # nothing read again, nothing advanced again
    await tick(store, now, at)
    assert await _outcome(store, ahead) == await _outcome(store, now)
    assert {job: at for job, at in late.deadlines.items()} == {
        job: due + timedelta(seconds=GRACE) for job in ahead
    }
    assert [(f.job, f.flip.to_state.value) for f in late.flips] == [(job, "late") for job in ahead]
    assert all(f.id is not None for f in late.flips)


async def test_a_record_written_after_its_tick_was_prepared_is_ticked_from_what_is_stored(
    store: Store, loaded: list[str]
) -> None:
    """As when another monitor recorded a run of the job in between: its write changed the row,
    so the prepared tick is not taken and the job is advanced from its stored record."""
    due, (herd,) = await _fleet(store, "herd", count=5)
    prepared = await _prepare(store, herd, due)
    started = due - timedelta(seconds=1)
    async with store.session() as session, session.begin():  # "another monitor"
        specs = await read_specs(session, [herd[2]])
        batch = HealthBatch(session, started)
        await batch.load([herd[2]], specs)
        batch.advance(herd[2], RunStartedInput("r-1", started))
        await batch.save()
    loaded.clear()
    advanced = await tick(store, herd, due + timedelta(milliseconds=3), prepared)
    assert loaded == [herd[2]]
    states = {f.job: f.flip.to_state.value for f in advanced.flips}
    assert states == {job: "late" for job in herd if job != herd[2]}  # herd[2] is running: no flip
    [(record, flips)] = await _outcome(store, [herd[2]])
    assert record[0] == "running" and [to for _from, to, _at, _reason in flips] == ["running"]


async def test_a_changed_spec_or_a_deadline_passed_since_is_not_taken_from_a_prepared_tick(
    store: Store, loaded: list[str]
) -> None:
    due, (herd,) = await _fleet(store, "herd", count=4)
    prepared = await _prepare(store, herd, due)
    changed = herd[0]
    spec = _herd("herd", 1, due)[0].model_copy(update={"name": changed, "grace_seconds": 5.0})
    await apply_jobs(store, [spec, *(_herd("herd", 4, due)[1:])], utcnow())
    loaded.clear()
    # Ticked after the grace end too: the prepared `late` would miss the `down` that is due.
    past_grace = due + timedelta(seconds=GRACE + 1)
    await tick(store, herd, past_grace, prepared)
    assert sorted(loaded) == sorted(herd)
    for _record, flips in await _outcome(store, herd):
        assert [to for _from, to, _at, _reason in flips] == ["late", "down"]
    # And a prepared tick is never taken before its own instant.
    due2 = due + timedelta(hours=1)
    early = await _prepare(store, herd, due2)
    loaded.clear()
    await tick(store, herd, due2 - timedelta(seconds=1), early)
    assert sorted(loaded) == sorted(herd)


async def test_the_timers_tick_a_herd_ahead_and_alert_it_once(
    store: Store, loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadlines_module, "HERD", 10)
    now = utcnow().replace(microsecond=0)
    due = now + timedelta(seconds=3)
    herd = _herd("herd", 30, due)
    await apply_jobs(store, herd, now)
    told: list[str] = []
    timers = Deadlines(
        store,
        reload_seconds=0.5,
        on_flips=lambda advanced: told.extend(f"{f.job}:{f.flip.to_state.value}" for f in advanced.flips),
    )

    async def started() -> None:
        return None

    task = asyncio.create_task(timers.run_forever(started))
    try:
        await eventually(lambda: _is(len(told) == 30), timeout=15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(told) == sorted(f"{spec.name}:late" for spec in herd)
    # The records were created at the first look, then the herd was ticked from prepared ticks.
    assert not set(loaded) - {spec.name for spec in herd} and len(loaded) == 30


async def _is(value: bool) -> bool:
    return value
