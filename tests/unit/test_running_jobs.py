"""The worker's running jobs when it stops: waited for, then killed, and a job that does not end
after its kill is named and left, so that the worker still stops."""

from __future__ import annotations

import asyncio

import pytest

from worker import service
from worker.service import RunningJobs


async def _hangs_in_clean_up(release: asyncio.Event) -> None:
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def test_a_killed_job_that_does_not_end_is_named_and_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service, "KILL_SECONDS", 0.1)
    release = asyncio.Event()
    runs = RunningJobs()
    runs.start(_hangs_in_clean_up(release), "trigger t-stuck")
    runs.start(asyncio.sleep(3600), "trigger t-killed")
    await asyncio.sleep(0)
    await asyncio.wait_for(runs.drain(0.05), timeout=5)
    assert "1 killed job(s) did not end within 0.1s and are abandoned: trigger t-stuck" in caplog.text
    release.set()
    await asyncio.sleep(0.01)


async def test_jobs_that_end_in_time_are_not_killed(caplog: pytest.LogCaptureFixture) -> None:
    runs = RunningJobs()
    runs.start(asyncio.sleep(0.01), "trigger t-quick")
    await runs.drain(5)
    assert "killed" not in caplog.text
