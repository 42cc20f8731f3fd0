"""The whole fleet, for real: scheduler -> RabbitMQ -> worker -> RabbitMQ -> monitor -> store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select

from common.clock import utcnow
from common.store import FireRow, JobStateRow, Store
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import apply_toml, runs_of, state_of


async def test_a_one_second_job_produces_succeeded_runs(store: Store, fleet: Start) -> None:
    await apply_toml(
        store,
        """
        [jobs.every-second]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["sh", "-c", "echo hello from cronfleet"] }
        """,
    )
    await fleet("monitor", "worker", "scheduler")

    async def two_succeeded() -> list[object]:
        runs = await runs_of(store, "every-second", status="succeeded")
        return runs if len(runs) >= 2 else []

    runs = await eventually(two_succeeded)
    first = runs[0]
    assert first.exit_code == 0
    assert first.output_tail == "hello from cronfleet\n"
    assert first.trigger_id.startswith("every-second@")
    assert first.scheduled_at is not None and first.trigger_id.endswith("Z")
    assert first.redelivered is False
    # Each fire is claimed once and each trigger gives exactly one run.
    trigger_ids = [r.trigger_id for r in await runs_of(store, "every-second")]
    assert len(trigger_ids) == len(set(trigger_ids))
    async with store.session() as session:
        state = await session.get(JobStateRow, "every-second")
        # A fire still unpublished is one prepared ahead of its instant, never one due already.
        unpublished = await session.scalar(
            select(func.count())
            .select_from(FireRow)
            .where(FireRow.published_at.is_(None), FireRow.scheduled_at <= utcnow() - timedelta(seconds=1))
        )
    assert state is not None and state.last_status in ("succeeded", "running")
    assert state.next_expected_at is not None
    assert unpublished == 0


async def test_a_failing_shell_job_produces_a_failed_run_with_its_exit_code(
    store: Store, fleet: Start
) -> None:
    await apply_toml(
        store,
        """
        [jobs.fails]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["sh", "-c", "echo about to fail >&2; exit 3"] }
        """,
    )
    await fleet("monitor", "worker", "scheduler")

    runs = await eventually(lambda: runs_of(store, "fails", status="failed"))
    assert runs[0].exit_code == 3
    assert runs[0].error == "exit code 3"
    assert runs[0].output_tail == "about to fail\n"

    async def failed_state() -> JobStateRow | None:
        state = await state_of(store, "fails")
        return state if state is not None and state.last_status == "failed" else None

    state = await eventually(failed_state)
    assert state.consecutive_failures >= 1


async def test_a_shell_job_past_its_timeout_is_killed_and_timed_out(store: Store, fleet: Start) -> None:
    await apply_toml(
        store,
        """
        [jobs.hangs]
        schedule = "*/2 * * * * *"
        timeout_seconds = 0.5
        action = { type = "shell", argv = ["sleep", "30"] }
        """,
    )
    await fleet("monitor", "worker", "scheduler")
    runs = await eventually(lambda: runs_of(store, "hangs", status="timed_out"))
    assert runs[0].duration_seconds is not None and runs[0].duration_seconds < 10
    assert "timed out" in (runs[0].error or "")


class _Endpoint(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        status = 200 if self.path == "/ok" else 503
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"got " + body + b" with " + self.headers.get("X-Token", "-").encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_jobs_succeed_on_an_expected_status_and_fail_on_another(
    store: Store, fleet: Start, endpoint: str
) -> None:
    await apply_toml(
        store,
        f"""
        [jobs.http-ok]
        schedule = "* * * * * *"
        [jobs.http-ok.action]
        type = "http"
        method = "POST"
        url = "{endpoint}/ok"
        headers = {{ X-Token = "abc" }}
        body = "ping"
        expect_status = [200]

        [jobs.http-down]
        schedule = "* * * * * *"
        action = {{ type = "http", method = "POST", url = "{endpoint}/down" }}
        """,
    )
    await fleet("monitor", "worker", "scheduler")
    ok = await eventually(lambda: runs_of(store, "http-ok", status="succeeded"))
    assert ok[0].http_status == 200
    assert ok[0].output_tail == "got ping with abc"
    down = await eventually(lambda: runs_of(store, "http-down", status="failed"))
    assert down[0].http_status == 503
    assert down[0].error is not None and "HTTP 503" in down[0].error


async def test_two_schedulers_publish_each_fire_once(store: Store, fleet: Start) -> None:
    await apply_toml(
        store,
        """
        [jobs.contended]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }
        """,
    )
    await fleet("monitor", "worker", "scheduler", "scheduler")

    async def four_runs() -> list[object]:
        runs = await runs_of(store, "contended")
        return runs if len(runs) >= 4 else []

    runs = await eventually(four_runs)
    # A fire published twice (a scheduler stalled past the claim's takeover) is run once: the
    # repeat is recorded as a duplicate run, never executed.
    trigger_ids = [r.trigger_id for r in runs if r.status != "duplicate"]
    assert len(trigger_ids) == len(set(trigger_ids)), "a fire was executed twice"


async def test_the_fleet_waits_for_jobs_applied_after_it_started(store: Store, fleet: Start) -> None:
    await fleet("monitor", "worker", "scheduler")
    await asyncio.sleep(0)  # the scheduler is planning nothing
    await apply_toml(
        store,
        """
        [jobs.late-comer]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }
        """,
    )
    await eventually(lambda: runs_of(store, "late-comer", status="succeeded"))


async def test_runs_before_any_monitor_started_are_recorded_once_it_does(store: Store, fleet: Start) -> None:
    await apply_toml(
        store,
        """
        [jobs.early]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }
        """,
    )
    await fleet("worker", "scheduler")
    await asyncio.sleep(2.5)  # fires run while no monitor exists; their events must wait for one
    monitor_started = utcnow()
    await fleet("monitor")

    async def runs_from_before_the_monitor() -> list[object]:
        runs = await runs_of(store, "early", status="succeeded")
        return [r for r in runs if r.started_at < monitor_started]

    assert len(await eventually(runs_from_before_the_monitor)) >= 2
