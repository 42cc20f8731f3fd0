"""The JSON API against a real monitor, broker and store: every route refuses a missing key (401)
and a read-only key where it changes something (403); jobs are created, changed, paused,
resumed, triggered (the run appears, linked by its trigger id) and deleted; runs are filtered
and paged; metrics count the runs; alerts, flips and fleet health read what the CLI reads."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from common.api_keys import create_api_key
from common.clock import utcnow
from common.store import Store
from monitor.http.app import create_app
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.test_http_server import free_port

JOB = {
    "name": "api-job",
    "schedule": "0 0 1 1 *",
    "timezone": "Europe/Berlin",
    "grace_seconds": 30,
    "action": {
        "type": "shell",
        "argv": ["sh", "-c", "echo hello from the api"],
        "env": {"API_TOKEN": "s3cret"},
    },
}


async def _keys(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    _rw, writer = await create_api_key(store, "writer", read_only=False, now=utcnow())
    _ro, reader = await create_api_key(store, "reader", read_only=True, now=utcnow())
    return {"X-API-Key": writer}, {"X-API-Key": reader}


def _routes() -> list[tuple[str, str]]:
    document = create_app(None).openapi()  # type: ignore[arg-type]
    return [
        (method.upper(), path.replace("{name}", "api-job").replace("{run_id}", "nope"))
        for path, methods in document["paths"].items()
        if path.startswith("/api/")
        for method in methods
    ]


async def test_every_api_route_wants_a_key_and_a_read_write_one_to_change_anything(
    store: Store, fleet: Start
) -> None:
    port = free_port()
    writer, reader = await _keys(store)
    await fleet("monitor", http=("127.0.0.1", port))
    routes = _routes()
    assert len(routes) >= 14
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        for method, path in routes:
            for headers in ({}, {"X-API-Key": "cfk_0123456789abcdef_" + "x" * 43}):
                refused = await client.request(method, path, headers=headers, json=JOB)
                assert (refused.status_code, refused.json()) == (401, {"error": "unauthorized"}), (
                    method,
                    path,
                )
            answered = await client.request(method, path, headers=reader, json=JOB)
            if method == "GET":
                assert answered.status_code in (200, 404), (method, path, answered.text)
            else:
                assert (answered.status_code, answered.json()) == (403, {"error": "read_only"}), (
                    method,
                    path,
                )
        listed = await client.get("/api/jobs", headers=writer)
        assert listed.status_code == 200 and listed.json() == {"jobs": [], "unreadable": {}}


async def test_jobs_are_created_changed_paused_triggered_and_deleted_through_the_api(
    store: Store, fleet: Start
) -> None:
    port = free_port()
    writer, reader = await _keys(store)
    await fleet("monitor", http=("127.0.0.1", port))
    await fleet("worker")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        created = await client.post("/api/jobs", headers=writer, json=JOB)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["name"] == "api-job" and body["action"] == "shell" and body["enabled"] is True
        assert body["spec"]["action"]["env"] == {"API_TOKEN": "***"}  # masked in every answer
        assert body["spec"]["grace_seconds"] == 30 and body["timezone"] == "Europe/Berlin"
        again = await client.post("/api/jobs", headers=writer, json=JOB)
        assert (again.status_code, again.json()) == (409, {"error": "exists"})

        # The same strict validation as `apply`, one line naming the field.
        for bad, field in (
            ({**JOB, "name": "other", "timeout_seconds": "5"}, "timeout_seconds"),
            ({**JOB, "name": "other", "schedule": "every day"}, "schedule"),
            ({**JOB, "name": "other", "every": "45s"}, "schedule"),  # not both
            ({**JOB, "name": "other", "timezone": "Mars/Base"}, "timezone"),
            ({**JOB, "name": "other", "grace_secs": 5}, "grace_secs"),
            ({**JOB, "name": "bad name"}, "name"),
            ({**JOB, "name": "other", "action": {"type": "shell", "argv": []}}, "action.argv"),
            ({**JOB, "name": "other", "grace_seconds": 2**70}, "grace_seconds"),
        ):
            refused = await client.post("/api/jobs", headers=writer, json=bad)
            answer = refused.json()
            assert refused.status_code == 422 and answer["error"] == "invalid", refused.text
            assert answer["field"] == field and "\n" not in answer["detail"], answer
        not_json = await client.post("/api/jobs", headers=writer, content=b"{nope")
        assert not_json.status_code == 422 and not_json.json()["field"] is None
        assert (await client.get("/api/jobs/other", headers=reader)).status_code == 404

        shown = await client.get("/api/jobs/api-job", headers=reader)
        assert shown.status_code == 200 and shown.json() == body
        listed = (await client.get("/api/jobs", headers=reader)).json()
        assert [job["name"] for job in listed["jobs"]] == ["api-job"]

        patched = await client.patch("/api/jobs/api-job", headers=writer, json={"timeout_seconds": 30})
        assert patched.status_code == 200 and patched.json()["spec"]["timeout_seconds"] == 30
        assert patched.json()["spec"]["grace_seconds"] == 30  # the other fields kept
        # A schedule and an interval replace each other.
        interval = await client.patch("/api/jobs/api-job", headers=writer, json={"every": "45s"})
        assert interval.status_code == 200, interval.text
        assert (interval.json()["schedule"], interval.json()["spec"]["schedule"]) == ("every 45s", None)
        cron = await client.patch("/api/jobs/api-job", headers=writer, json={"schedule": "0 0 1 1 *"})
        assert cron.status_code == 200 and cron.json()["spec"]["every"] is None
        renamed = await client.patch("/api/jobs/api-job", headers=writer, json={"name": "else"})
        assert renamed.status_code == 422 and renamed.json()["field"] == "name"
        replaced = await client.put(
            "/api/jobs/api-job", headers=writer, json={k: v for k, v in JOB.items() if k != "grace_seconds"}
        )
        assert replaced.status_code == 200 and replaced.json()["spec"]["grace_seconds"] == 60  # default
        assert replaced.json()["spec"]["timeout_seconds"] == 300
        missing = await client.put("/api/jobs/nobody", headers=writer, json={**JOB, "name": "nobody"})
        assert (missing.status_code, missing.json()) == (404, {"error": "not_found"})

        paused = await client.post("/api/jobs/api-job/pause", headers=writer)
        assert paused.status_code == 200 and paused.json()["enabled"] is False
        resumed = await client.post("/api/jobs/api-job/resume", headers=writer)
        assert resumed.status_code == 200 and resumed.json()["enabled"] is True

        triggered = await client.post("/api/jobs/api-job/trigger", headers=writer)
        assert triggered.status_code == 202, triggered.text
        trigger_id = triggered.json()["trigger_id"]
        assert trigger_id.startswith("api-job@")

        async def the_run() -> dict[str, Any] | None:
            page = (await client.get("/api/runs", params={"job": "api-job"}, headers=reader)).json()
            done = [r for r in page["runs"] if r["trigger_id"] == trigger_id and r["status"] == "succeeded"]
            return done[0] if done else None

        run = await eventually(the_run)
        assert run["output_tail"] == "hello from the api\n" and run["exit_code"] == 0
        assert run["request_id"] == run["run_id"]
        one = await client.get(f"/api/runs/{run['run_id']}", headers=reader)
        assert one.status_code == 200 and one.json() == run

        heartbeat_only = await client.post(
            "/api/jobs", headers=writer, json={"name": "beats", "schedule": "@daily"}
        )
        assert heartbeat_only.status_code == 201 and heartbeat_only.json()["action"] == "heartbeat"
        no_action = await client.post("/api/jobs/beats/trigger", headers=writer)
        assert (no_action.status_code, no_action.json()) == (409, {"error": "no_action"})

        deleted = await client.delete("/api/jobs/api-job", headers=writer)
        assert deleted.status_code == 204
        assert (await client.get("/api/jobs/api-job", headers=reader)).status_code == 404
        assert (await client.delete("/api/jobs/api-job", headers=writer)).status_code == 404


async def test_runs_are_filtered_and_paged_and_metrics_count_them(store: Store, fleet: Start) -> None:
    port = free_port()
    writer, reader = await _keys(store)
    await fleet("monitor", http=("127.0.0.1", port))
    await fleet("worker")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        for name, argv in (
            ("ok-job", ["sh", "-c", "echo fine 50%_done"]),
            ("bad-job", ["sh", "-c", "echo broken; exit 3"]),
        ):
            job = {"name": name, "schedule": "0 0 1 1 *", "action": {"type": "shell", "argv": argv}}
            assert (await client.post("/api/jobs", headers=writer, json=job)).status_code == 201
        triggers: list[str] = []
        for name in ("ok-job", "ok-job", "ok-job", "bad-job"):
            fired = await client.post(f"/api/jobs/{name}/trigger", headers=writer)
            assert fired.status_code == 202, fired.text
            triggers.append(fired.json()["trigger_id"])
        assert len(set(triggers)) == 4

        async def finished() -> list[dict[str, Any]] | None:
            page = (await client.get("/api/runs", headers=reader)).json()
            done = [r for r in page["runs"] if r["status"] != "running"]
            return page["runs"] if len(done) == 4 else None

        every = await eventually(finished)
        starts = [r["started_at"] for r in every]
        assert starts == sorted(starts, reverse=True)  # newest first
        assert {r["trigger_id"] for r in every} == set(triggers)

        async def ids(**params: Any) -> list[str]:
            answer = await client.get("/api/runs", params=params, headers=reader)
            assert answer.status_code == 200, answer.text
            return [r["run_id"] for r in answer.json()["runs"]]

        assert len(await ids(job="ok-job")) == 3
        failed = await client.get("/api/runs", params={"status": "failed"}, headers=reader)
        assert [(r["job"], r["exit_code"]) for r in failed.json()["runs"]] == [("bad-job", 3)]
        assert len(await ids(text="FINE 50%_")) == 3  # any case; % and _ are plain text
        assert len(await ids(text="50%x")) == 0
        assert len(await ids(text="broken")) == 1
        assert await ids(**{"from": "2999-01-01T00:00:00Z"}) == []
        assert len(await ids(**{"to": "2999-01-01T00:00:00+02:00", "from": "2000-01-01"})) == 4

        # Pages of two: every run once, in order, and no cursor after the last.
        seen: list[str] = []
        cursor = None
        for _page in range(3):
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/api/runs", params=params, headers=reader)).json()
            seen.extend(r["run_id"] for r in page["runs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [r["run_id"] for r in every] and cursor is None
        for bad in (
            {"cursor": "garbage"},
            {"limit": 0},
            {"status": "happy"},
            {"job": "no job"},
            {"from": "soon"},
        ):
            refused = await client.get("/api/runs", params=bad, headers=reader)
            assert refused.status_code == 422 and refused.json()["error"] == "invalid", (bad, refused.text)
            assert refused.json()["field"] == next(iter(bad)), refused.json()

        for resolution in ("hours", "days"):
            answer = await client.get(
                "/api/jobs/ok-job/metrics", params={"resolution": resolution}, headers=reader
            )
            assert answer.status_code == 200, answer.text
            buckets = answer.json()["buckets"]
            assert sum(b["runs"] for b in buckets) == 3 and sum(b["failures"] for b in buckets) == 0
            assert all(b["max_duration_seconds"] >= b["average_duration_seconds"] >= 0 for b in buckets)
        bad = (
            await client.get("/api/jobs/bad-job/metrics", params={"resolution": "days"}, headers=reader)
        ).json()
        assert [(b["runs"], b["failures"]) for b in bad["buckets"]] == [(1, 1)]
        assert (
            await client.get("/api/jobs/ok-job/metrics?resolution=weeks", headers=reader)
        ).status_code == 422
        backwards = await client.get(
            "/api/jobs/ok-job/metrics", params={"from": "2030-01-01", "to": "2020-01-01"}, headers=reader
        )
        assert backwards.status_code == 422 and backwards.json()["field"] == "from"

        health = await client.get("/api/health", headers=reader)
        assert health.status_code == 200
        jobs = {j["job"]: j["health"] for j in health.json()["jobs"]}
        assert set(jobs) == {"ok-job", "bad-job"}

        async def failing_flip() -> list[dict[str, Any]]:
            flips = (await client.get("/api/flips", params={"job": "bad-job"}, headers=reader)).json()[
                "flips"
            ]
            return [f for f in flips if f["to_state"] == "failing"]

        await eventually(failing_flip)
        alerts = await client.get("/api/alerts", params={"limit": 5}, headers=reader)
        assert alerts.status_code == 200 and isinstance(alerts.json()["attempts"], list)


async def test_an_http_jobs_run_reaches_its_endpoint_with_its_request_id(store: Store, fleet: Start) -> None:
    seen: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("X-Request-Id", ""))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"logged")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    writer, reader = await _keys(store)
    try:
        await fleet("monitor", http=("127.0.0.1", port))
        await fleet("worker")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            url = f"http://127.0.0.1:{server.server_address[1]}/hook"
            job = {"name": "hook", "schedule": "0 0 1 1 *", "action": {"type": "http", "url": url}}
            assert (await client.post("/api/jobs", headers=writer, json=job)).status_code == 201
            fired = (await client.post("/api/jobs/hook/trigger", headers=writer)).json()

            async def the_run() -> dict[str, Any] | None:
                page = (await client.get("/api/runs", params={"job": "hook"}, headers=reader)).json()
                done = [r for r in page["runs"] if r["status"] == "succeeded"]
                return done[0] if done else None

            run = await eventually(the_run)
    finally:
        server.shutdown()
        server.server_close()
    assert run["trigger_id"] == fired["trigger_id"] and run["http_status"] == 200
    assert seen == [run["request_id"]]
