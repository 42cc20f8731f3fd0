"""The dashboard at ``/``: its JSON takes an API key and never carries a secret; and in headless
Chromium (Debian's ``chromium``, driven by Playwright) a person opens it with a key, sees the
fleet and the jobs, sees a job turn ``down`` after a missed deadline, presses "run now" and sees
the run appear with its output.

``CRONFLEET_DASHBOARD_SCREENSHOT=PATH`` saves the browser test's page there (docs/dashboard.png
is made so)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from common.settings import Settings
from common.store import Store
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_http_server import free_port

# A heartbeat-only job due every second with 1 s of grace: no run comes, so it goes down.
MISSED = '[jobs.nightly]\nschedule = "* * * * * *"\ngrace_seconds = 1\n'
HELLO = (
    '[jobs.hello]\nschedule = "30 9 * * 1-5"\ndescription = "says hello"\n'
    'action = { type = "shell", argv = ["/bin/echo", "hello from cronfleet <b>as text</b>"] }\n'
)
SECRET = "Bearer dashboard-secret-0123456789"
CALLS_OUT = (
    '[jobs.report]\nschedule = "*/5 * * * *"\n'
    'action = { type = "http", url = "https://user:pw-secret@example.com/hook?token=tok-secret", '
    f'headers = {{ Authorization = "{SECRET}" }} }}\n'
)


def chromium() -> str | None:
    """Debian's chromium (or any chromium on PATH); None when there is none."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


async def new_key(settings: Settings, name: str, *flags: str) -> str:
    made = await run_cronfleet(settings, "keys", "api", "new", name, *flags)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


async def test_the_dashboard_json_takes_a_key_and_never_carries_a_secret(
    settings: Settings, store: Store
) -> None:
    await apply_toml(store, MISSED + HELLO + CALLS_OUT)
    reader_key = await new_key(settings, "viewer", "--read-only")
    writer_key = await new_key(settings, "ops")
    port = free_port()
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "dashboard.js" in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
            for asset in ("dashboard.js", "dashboard.css", "favicon.svg"):
                assert (await client.get(f"/dashboard/assets/{asset}")).status_code == 200, asset
            assert (await client.get("/dashboard/assets/..%2Fdashboard.py")).status_code == 404

            assert (await client.get("/dashboard/overview")).json() == {"error": "unauthorized"}
            seen = await client.get("/dashboard/overview", headers={"X-API-Key": reader_key})
            assert seen.status_code == 200
            jobs = {job["name"]: job for job in seen.json()["jobs"]}
            assert sorted(jobs) == ["hello", "nightly", "report"]
            assert jobs["hello"]["schedule_words"] == "at 09:30 on Monday to Friday"
            assert (jobs["hello"]["action"], jobs["nightly"]["action"]) == ("shell", "heartbeat")
            assert jobs["hello"]["next_run_at"] is not None
            for secret in ("dashboard-secret", "pw-secret", "tok-secret", "example.com"):
                assert secret not in seen.text, secret

            read_only = await client.post("/dashboard/jobs/hello/trigger", headers={"X-API-Key": reader_key})
            assert (read_only.status_code, read_only.json()) == (403, {"error": "read_only"})
            rw = {"X-API-Key": writer_key}
            missing = await client.post("/dashboard/jobs/nobody/trigger", headers=rw)
            assert (missing.status_code, missing.json()) == (404, {"error": "not_found"})
            heartbeat_only = await client.post("/dashboard/jobs/nightly/trigger", headers=rw)
            assert (heartbeat_only.status_code, heartbeat_only.json()) == (409, {"error": "no_action"})
            fired = await client.post("/dashboard/jobs/hello/trigger", headers=rw)
            assert fired.status_code == 202 and fired.json()["trigger_id"].startswith("hello@")

            await fleet.start("worker")
            await eventually(lambda: runs_of(store, "hello", status="succeeded"))
            runs = await client.get("/dashboard/jobs/hello/runs", headers={"X-API-Key": reader_key})
            [run] = runs.json()
            assert run["trigger_id"] == fired.json()["trigger_id"]
            assert "hello from cronfleet" in (run["output_tail"] or "")
            assert (await client.get("/dashboard/jobs/hello/runs?limit=0", headers=rw)).status_code == 422
    finally:
        await fleet.stop()


async def test_in_a_browser_a_job_goes_down_and_run_now_shows_its_run(
    settings: Settings, store: Store
) -> None:
    executable = chromium()
    if executable is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; deploy/dev does it)")
    from playwright.async_api import async_playwright, expect

    await apply_toml(store, MISSED + HELLO)
    key = await new_key(settings, "ops")
    port = free_port()
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        await fleet.start("scheduler", "worker")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=executable)
            try:
                page = await browser.new_page(viewport={"width": 1200, "height": 720})
                await page.goto(f"http://127.0.0.1:{port}/")
                await page.fill("#key", key)
                await page.click("#login button[type=submit]")
                await expect(page.locator("#who")).to_have_text("key ops")

                # The fleet on top, then each job with its schedule in words.
                for component in ("@scheduler", "@pool:default"):
                    shown = page.locator(f'#fleet li[data-component="{component}"]')
                    await expect(shown).to_be_visible(timeout=20_000)
                hello = page.locator('tr[data-job="hello"]')
                await expect(hello).to_contain_text("at 09:30 on Monday to Friday")

                # The heartbeat job's deadline passes with no run: it turns down, in red.
                nightly = page.locator('tr[data-job="nightly"]')
                await expect(nightly).to_have_attribute("data-state", "down", timeout=20_000)
                await expect(nightly.locator(".state")).to_have_class("state state-down")
                await expect(nightly.locator(".reason")).not_to_be_empty()

                # Run now: the run appears in the job's runs, with its output.
                await hello.locator("button.run-now").click()
                await expect(page.locator("#runs-title")).to_have_text("Runs of hello")
                done = page.locator('#runs .run[data-status="succeeded"]')
                await expect(done).to_contain_text("hello from cronfleet", timeout=20_000)
                # Output is shown as text, never as markup.
                await expect(done.locator("pre").first).to_have_text("hello from cronfleet <b>as text</b>\n")
                await expect(page.locator("#runs b")).to_have_count(0)
                await expect(hello).to_have_attribute("data-state", "up", timeout=20_000)
                await expect(hello.locator("svg.spark rect")).to_have_count(1)

                # A key the monitor no longer knows sends the page back to the form.
                assert (await run_cronfleet(settings, "keys", "api", "revoke", "ops")).returncode == 0
                await expect(page.locator("#login")).to_be_visible(timeout=20_000)
                await page.fill("#key", await new_key(settings, "viewer", "--read-only"))
                await page.click("#login button[type=submit]")
                await expect(page.locator("#who")).to_have_text("key viewer (read-only)")
                await expect(hello).to_be_visible()
                await expect(hello.locator("button.run-now")).to_have_count(0)

                screenshot = os.environ.get("CRONFLEET_DASHBOARD_SCREENSHOT")
                if screenshot:
                    # A few more runs, so that the duration history shows something.
                    for _ in range(5):
                        assert (await run_cronfleet(settings, "trigger", "hello")).returncode == 0
                    await hello.click()
                    await expect(page.locator('#runs .run[data-status="succeeded"]')).to_have_count(
                        6, timeout=20_000
                    )
                    await expect(hello.locator("svg.spark rect")).to_have_count(6)
                    await page.screenshot(path=Path(screenshot), full_page=True)
            finally:
                await browser.close()
    finally:
        await fleet.stop()
