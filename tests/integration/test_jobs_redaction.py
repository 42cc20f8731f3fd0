"""``cronfleet jobs --json`` shows every job's spec, never the secrets inside it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from common.redact import MASK
from common.settings import Settings
from tests.fleet import cronfleet

JOBS = """
[jobs.sync]
schedule = "*/5 * * * *"
[jobs.sync.action]
type = "http"
method = "POST"
url = "https://bot:hunter2@api.example.com/sync?api_key=k-42&page=2"
headers = { Authorization = "Bearer s3cr3t-t0ken", X-Api-Key = "k-77", Accept = "application/json" }

[jobs.dump]
schedule = "@daily"
action = { type = "shell", argv = ["pg_dump"], env = { PGPASSWORD = "pa55", PGHOST = "db" } }
"""


@pytest.mark.both_stores
def test_jobs_json_masks_headers_urls_and_variables_marked_secret(settings: Settings, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    assert cronfleet(settings, "apply", str(jobs)).returncode == 0

    listed = cronfleet(settings, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    for secret in ("hunter2", "k-42", "s3cr3t-t0ken", "k-77", "pa55"):
        assert secret not in listed.stdout
    specs = {row["name"]: row["spec"] for row in orjson.loads(listed.stdout)}
    http = specs["sync"]["action"]
    assert http["headers"] == {"Authorization": MASK, "X-Api-Key": MASK, "Accept": "application/json"}
    assert http["url"] == f"https://bot:{MASK}@api.example.com/sync?api_key={MASK}&page=2"
    assert specs["dump"]["action"]["env"] == {"PGPASSWORD": MASK, "PGHOST": "db"}
