"""The test fleet's stop: a service that does not stop when cancelled fails the test, naming it and
printing where it waits, instead of holding the suite until pytest-timeout ends the process."""

from __future__ import annotations

import asyncio

import pytest

from common.settings import Settings
from tests import fleet as fleet_module
from tests.fleet import Fleet


async def _ignores_cancel(release: asyncio.Event) -> None:
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def _stops() -> None:
    await asyncio.sleep(3600)


async def test_a_service_that_does_not_stop_fails_the_test_and_prints_its_stack(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fleet_module, "STOP_SECONDS", 0.2)
    fleet = Fleet(Settings())
    fleet.tasks.append(asyncio.create_task(_stops(), name="worker-0"))
    release = asyncio.Event()
    stuck = asyncio.create_task(_ignores_cancel(release), name="monitor-1")
    fleet.tasks.append(stuck)
    await asyncio.sleep(0)
    with pytest.raises(AssertionError, match=r"monitor-1 did not stop within 0.2s"):
        await fleet.stop()
    assert "_ignores_cancel" in capsys.readouterr().err
    assert fleet.tasks == []
    release.set()
    await stuck


async def test_services_that_stop_when_cancelled_stop_quietly() -> None:
    fleet = Fleet(Settings())
    fleet.tasks.append(asyncio.create_task(_stops(), name="worker-0"))
    await asyncio.sleep(0)
    await fleet.stop()
    assert fleet.tasks == []
