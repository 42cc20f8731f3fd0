"""The garbage collector in a long-running process: what it built to start is frozen once every
service is ready, and the young generation is collected after 10,000 objects, not 700."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

import common.cli.fleet
from common.cli.fleet import run_services
from common.collector import YOUNG_OBJECTS_BEFORE_COLLECTING, freeze_startup_heap
from common.services import Service, ServiceOptions
from common.settings import Settings

KEYS = "trigger:t:0123456789abcdef-SeCrEt,event:e:0123456789abcdef-SeCrEt"


@pytest.fixture(autouse=True)
def collector_as_it_was() -> Iterator[None]:
    """The collector as this test process had it, whatever a test did to it."""
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freezing_the_startup_heap_leaves_it_out_of_collections_and_collects_the_young_less_often() -> None:
    built_at_start = [[n] for n in range(100)]  # lists: objects the collector tracks
    assert gc.get_freeze_count() == 0
    freeze_startup_heap()
    assert gc.get_freeze_count() > len(built_at_start)
    assert gc.get_threshold()[0] == YOUNG_OBJECTS_BEFORE_COLLECTING
    assert not any(obj is built_at_start for obj in gc.get_objects())  # frozen: not walked


async def test_run_services_freezes_the_heap_once_every_service_is_ready_not_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen_when_ready: dict[str, int] = {}
    release = asyncio.Event()

    def load_service(name: str) -> Service:
        async def serve(settings: Settings, options: ServiceOptions) -> None:
            # The second service gets ready later: nothing is frozen before it is.
            await asyncio.sleep(0.05 if name == "worker" else 0)
            frozen_when_ready[name] = gc.get_freeze_count()
            options.ready.set()
            await release.wait()

        return serve

    frozen = asyncio.Event()

    def freeze() -> None:
        freeze_startup_heap()
        frozen.set()

    monkeypatch.setattr(common.cli.fleet, "load_service", load_service)
    monkeypatch.setattr(common.cli.fleet, "freeze_startup_heap", freeze)
    services = [("monitor", ServiceOptions()), ("worker", ServiceOptions())]
    running = asyncio.create_task(run_services(Settings(keys=KEYS), services))
    async with asyncio.timeout(10):
        await frozen.wait()
    assert frozen_when_ready == {"monitor": 0, "worker": 0}
    assert gc.get_freeze_count() > 0
    release.set()
    assert await running == 0
