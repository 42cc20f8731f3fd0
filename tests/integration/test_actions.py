"""Python actions, signed calls to the user's endpoint, and the run's context handed to every
action: through the real fleet (scheduler, worker, monitor) on the real broker and store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

import tests.integration.job_functions  # noqa: F401  (registers the functions the jobs call)
from common.envelope import REJECTION_DETAIL_HEADER
from common.settings import Settings
from common.store import Store
from tests.conftest import Start
from tests.fleet import cronfleet, declare_pool, eventually, worker_process
from tests.http_server import serving
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_poison import DeadLetters

SECRET_KEY = b"cronfleet-test-webhook-key-32-bytes!"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks' verification, written from the specification, independently of the
    library the worker signs with: HMAC-SHA256 over ``id.timestamp.body`` under the base64 key
    after ``whsec_``; the header holds space-separated ``v1,<base64>`` signatures."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [
        part.partition(",")[2] for part in headers["webhook-signature"].split() if part.startswith("v1,")
    ]
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(hmac.compare_digest(expected, signature) for signature in given)


@dataclass
class Endpoint:
    base: str = ""
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, path: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.requests if r[0] == path]


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    state = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                state.requests.append((self.path, headers, body))
            reply = orjson.dumps({"requestId": f"ep-{headers.get('webhook-id', 'none')}", "ok": True})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler) as base:
        state.base = base
        yield state


async def test_python_functions_run_with_their_context_and_their_results_are_stored(
    store: Store, fleet: Start
) -> None:
    await apply_toml(
        store,
        """
        [jobs.py-sync]
        schedule = "* * * * * *"
        action = { type = "python", function = "tests.integration.job_functions:add_days" }
        context = { days = 29, owner = "ops" }

        [jobs.py-async]
        schedule = "* * * * * *"
        action = { type = "python", function = "tests.integration.job_functions:renamed" }

        [jobs.py-explode]
        schedule = "* * * * * *"
        action = { type = "python", function = "tests.integration.job_functions:explode" }

        [jobs.py-odd]
        schedule = "* * * * * *"
        action = { type = "python", function = "tests.integration.job_functions:unserialisable" }
        """,
    )
    await fleet("monitor", "worker", "scheduler")

    [sync, *_] = await eventually(lambda: runs_of(store, "py-sync", status="succeeded"))
    result = orjson.loads(sync.result or "null")
    assert result["run_id"] == sync.run_id and result["trigger_id"] == sync.trigger_id
    assert result["job"] == "py-sync" and result["attempt"] == 1 and result["days_plus_one"] == 30
    assert sync.scheduled_at is not None
    assert result["scheduled_at"].startswith(sync.scheduled_at.strftime("%Y-%m-%dT%H:%M:%S"))

    [done, *_] = await eventually(lambda: runs_of(store, "py-async", status="succeeded"))
    assert orjson.loads(done.result or "null") == ["py-async", "async"]

    [failed, *_] = await eventually(lambda: runs_of(store, "py-explode", status="failed"))
    assert failed.error == "RuntimeError: cannot do py-explode"
    assert failed.output_tail is not None and "Traceback" in failed.output_tail
    assert "job_functions.py" in failed.output_tail

    [odd, *_] = await eventually(lambda: runs_of(store, "py-odd", status="succeeded"))
    assert odd.result is None and odd.error is not None and "the result was not kept" in odd.error


async def test_a_function_the_worker_did_not_register_is_refused_as_not_allowed(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await apply_toml(
        store,
        """
        [jobs.py-forbidden]
        schedule = "* * * * * *"
        action = { type = "python", function = "tests.integration.job_functions:not_registered" }

        [jobs.py-os]
        schedule = "* * * * * *"
        action = { type = "python", function = "os:system" }
        """,
    )
    await fleet("monitor", "worker", "scheduler")
    dead = await DeadLetters.open(amqp, settings)
    await dead.wait_for(2)
    assert set(dead.reasons()) == {"not_allowed"}
    details = " ".join(str((m.headers or {})[REJECTION_DETAIL_HEADER]) for m in dead.messages)
    assert "is not registered on this worker" in details
    # Never silent: each refusal is also a failed run in the job's history.
    for job in ("py-forbidden", "py-os"):
        [run, *_] = await eventually(lambda job=job: runs_of(store, job, status="failed"))
        assert run.error is not None and run.error.startswith("not_allowed: ")


async def test_http_calls_are_signed_as_standard_webhooks_and_the_endpoints_request_id_is_kept(
    store: Store, fleet: Start, endpoint: Endpoint
) -> None:
    await apply_toml(
        store,
        f"""
        [jobs.signed-call]
        schedule = "* * * * * *"
        [jobs.signed-call.action]
        type = "http"
        method = "POST"
        url = "{endpoint.base}/hook"
        body = '{{"event": "tick"}}'
        webhook_secret = "{SECRET}"

        [jobs.plain-call]
        schedule = "* * * * * *"
        action = {{ type = "http", method = "POST", url = "{endpoint.base}/plain", body = "x" }}
        """,
    )
    await fleet("monitor", "worker", "scheduler")
    [run, *_] = await eventually(lambda: runs_of(store, "signed-call", status="succeeded"))
    [(_path, headers, body)] = [r for r in endpoint.seen("/hook") if r[1]["x-request-id"] == run.run_id]
    assert body == b'{"event": "tick"}'
    assert headers["webhook-id"] == run.run_id
    assert verify_standard_webhook(SECRET, headers, body)
    assert not verify_standard_webhook(SECRET, headers, body + b" ")
    other = "whsec_" + base64.b64encode(b"another-key-of-thirty-two-bytes!").decode()
    assert not verify_standard_webhook(other, headers, body)
    assert run.endpoint_request_id == f"ep-{run.run_id}"

    [plain, *_] = await eventually(lambda: runs_of(store, "plain-call", status="succeeded"))
    [(_path, plain_headers, _body)] = [
        r for r in endpoint.seen("/plain") if r[1]["x-request-id"] == plain.run_id
    ]
    assert "webhook-signature" not in plain_headers
    assert plain.endpoint_request_id == "ep-none"


def test_a_worker_told_to_import_a_module_that_does_not_import_says_so_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "broken_jobs.py").write_text("raise RuntimeError('half-written module')\n")
    ended = cronfleet(settings, "worker", "--import", "broken_jobs", cwd=tmp_path)
    assert ended.returncode != 0
    lines = [line for line in ended.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith("--import broken_jobs: cannot import it (RuntimeError: half-written module)"), (
        ended.stderr
    )
    assert "Traceback" not in ended.stderr


async def test_an_application_runs_its_own_worker_with_its_functions(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    # As an application would: its own module, registering its own function, imported by a
    # ``cronfleet worker --import`` started in the application's directory.
    (tmp_path / "myapp_jobs.py").write_text(
        "from worker.functions import job_function\n\n"
        "@job_function\n"
        "def report(run):\n"
        "    return {'job': run.job, 'owner': run.context['owner']}\n"
    )
    await apply_toml(
        store,
        """
        [jobs.app-report]
        schedule = "* * * * * *"
        action = { type = "python", function = "myapp_jobs:report" }
        context = { owner = "billing" }
        """,
    )
    await declare_pool(settings, "default")
    worker = worker_process(settings, "--import", "myapp_jobs", cwd=tmp_path)
    try:
        await fleet("monitor", "scheduler")
        [run, *_] = await eventually(lambda: runs_of(store, "app-report", status="succeeded"), timeout=30)
    finally:
        worker.terminate()
        # Off the loop: the in-process services must go on, or one caught inside a SQLite write
        # would hold the lock the stopping worker needs to end its runs.
        await asyncio.to_thread(worker.wait, 30)
    assert orjson.loads(run.result or "null") == {"job": "app-report", "owner": "billing"}
