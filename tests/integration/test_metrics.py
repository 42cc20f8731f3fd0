"""``/metrics``: a real fleet runs, fails and misses jobs, and a scrape (with an API key as a
Bearer token, as Prometheus sends it) parses as the Prometheus text format with every family
and the values the store holds."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import Engine, event

from common.settings import Settings
from common.store import Store
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_http_server import free_port
from tests.integration.test_query_rules import _FULL_SCAN, FULL_SCANS_ALLOWED

pytestmark = pytest.mark.both_stores

JOBS = (
    # Fired by the scheduler every second: runs, durations and fire lag.
    '[jobs.tick]\nschedule = "* * * * * *"\n'
    'action = { type = "shell", argv = ["/bin/echo", "tick"] }\n'
    # Run by hand, fails.
    '[jobs.broken]\nschedule = "0 3 * * *"\naction = { type = "shell", argv = ["/bin/false"] }\n'
    # A heartbeat-only job due every second that never gets one: down.
    '[jobs.nightly]\nschedule = "* * * * * *"\ngrace_seconds = 1\n'
)
FAMILIES = {
    "cronfleet_runs_last_hour": "gauge",
    "cronfleet_run_duration_seconds_last_hour": "histogram",
    "cronfleet_fire_lag_seconds_last_hour": "histogram",
    "cronfleet_fire_lag_seconds_max_last_hour": "gauge",
    "cronfleet_missed_fires_last_hour": "gauge",
    "cronfleet_job_state": "gauge",
    "cronfleet_job_consecutive_failures": "gauge",
    "cronfleet_job_last_finished_timestamp_seconds": "gauge",
    "cronfleet_alert_attempts_last_hour": "gauge",
    "cronfleet_alerts_pending": "gauge",
    "cronfleet_fleet_component_up": "gauge",
    "cronfleet_fleet_component_seen_timestamp_seconds": "gauge",
    "cronfleet_queue_messages": "gauge",
    "cronfleet_worker_running_jobs": "gauge",
    "cronfleet_scheduler_heartbeat_timestamp_seconds": "gauge",
    "cronfleet_monitor_events_recorded": "counter",
    "cronfleet_monitor_events_refused": "counter",
}


def parse(text: str) -> tuple[dict[str, str], list[Sample]]:
    """The families' types by name, and every sample."""
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.extend(family.samples)
    return types, samples


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def test_metrics_read_the_store_and_take_a_bearer_key(settings: Settings, store: Store) -> None:
    await apply_toml(store, JOBS)
    made = await run_cronfleet(settings, "keys", "api", "new", "prometheus", "--read-only")
    key = made.stdout.splitlines()[-1]
    port = free_port()
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        await fleet.start("scheduler", "worker")
        assert (await run_cronfleet(settings, "trigger", "broken")).returncode == 0
        await eventually(lambda: runs_of(store, "broken", status="failed"))
        await eventually(_at_least(store, "tick", 2))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            for headers in ({}, {"Authorization": "Bearer cfk_nope"}, {"Authorization": f"Basic {key}"}):
                refused = await client.get("/metrics", headers=headers)
                assert (refused.status_code, refused.json()) == (401, {"error": "unauthorized"}), headers
            assert (await client.get("/metrics", headers={"X-API-Key": key})).status_code == 200

            async def scraped() -> tuple[dict[str, str], list[Sample]] | None:
                answer = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
                assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
                types, samples = parse(answer.text)
                done = (
                    value(samples, "cronfleet_job_state", job="nightly", state="down") == 1
                    and value(samples, "cronfleet_fleet_component_up", component="@scheduler") == 1
                    and value(samples, "cronfleet_queue_messages", queue="pool:default") is not None
                )
                return (types, samples) if done else None

            types, samples = await eventually(scraped)
    finally:
        await fleet.stop()

    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    assert value(samples, "cronfleet_runs_last_hour", job="broken", status="failed") == 1
    ticks = value(samples, "cronfleet_runs_last_hour", job="tick", status="succeeded") or 0
    assert ticks >= 2
    # Each finished tick is in the +Inf bucket; buckets are cumulative.
    histogram = "cronfleet_run_duration_seconds_last_hour"
    inf = value(samples, f"{histogram}_bucket", job="tick", le="+Inf") or 0
    assert inf >= 2 and value(samples, f"{histogram}_gcount", job="tick") == inf
    buckets = [s.value for s in samples if s.name == f"{histogram}_bucket" and s.labels["job"] == "tick"]
    assert buckets == sorted(buckets)
    assert (value(samples, "cronfleet_fire_lag_seconds_last_hour_bucket", le="+Inf") or 0) >= 2
    assert (value(samples, "cronfleet_fire_lag_seconds_max_last_hour") or 0) >= 0
    assert value(samples, "cronfleet_job_state", job="broken", state="failing") == 1
    assert value(samples, "cronfleet_job_consecutive_failures", job="broken") == 1
    assert sum(s.value for s in samples if s.name == "cronfleet_job_state" and s.labels["job"] == "tick") == 1
    assert (value(samples, "cronfleet_monitor_events_recorded_total") or 0) > 0
    assert value(samples, "cronfleet_monitor_events_refused_total") == 0
    assert (value(samples, "cronfleet_scheduler_heartbeat_timestamp_seconds") or 0) > 0
    assert value(samples, "cronfleet_queue_messages", queue="dead-letters") == 0


def _at_least(store: Store, job: str, count: int) -> Any:
    async def check() -> bool:
        return len(await runs_of(store, job, status="succeeded")) >= count

    return check


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
async def test_a_scrape_and_the_dashboard_read_the_store_by_its_indexes(
    settings: Settings, store: Store
) -> None:
    await apply_toml(store, JOBS)
    key = (
        await run_cronfleet(settings, "keys", "api", "new", "prometheus", "--read-only")
    ).stdout.splitlines()[-1]
    port = free_port()
    fleet = Fleet(settings)
    captured: dict[str, Any] = {}

    def capture(*args: Any) -> None:
        _conn, _cursor, statement, parameters, _context, executemany = args
        if not executemany and statement.lstrip().upper().startswith("SELECT"):
            captured.setdefault(statement, parameters)

    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        await fleet.start("scheduler", "worker")
        await eventually(_at_least(store, "tick", 2))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            event.listen(Engine, "before_cursor_execute", capture)
            try:
                for path in ("/metrics", "/dashboard/overview", "/dashboard/jobs/tick/runs"):
                    answer = await client.get(path, headers={"X-API-Key": key})
                    assert answer.status_code == 200, path
            finally:
                event.remove(Engine, "before_cursor_execute", capture)
    finally:
        await fleet.stop()
    scans: dict[str, list[str]] = {}
    async with store.engine.connect() as connection:
        for statement, parameters in captured.items():
            plan = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            for row in plan:
                found = _FULL_SCAN.match(row[-1])
                if found and found.group(1) not in FULL_SCANS_ALLOWED:
                    scans.setdefault(found.group(1), []).append(" ".join(statement.split())[:160])
    assert len(captured) > 5
    assert scans == {}, f"full table scans: {scans}"
