"""The jobs file's python actions, signed http actions and context table: what they accept, and
a clear error naming the line and the field for what they do not."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from common.actions import HttpAction, PythonAction
from common.errors import JobFileError
from common.jobs import parse_jobs
from common.redact import MASK, redact

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_a_python_job_with_a_context_makes_triggers_that_carry_it() -> None:
    [job] = parse_jobs(
        """
        [jobs.cleanup]
        schedule = "0 4 * * *"
        action = { type = "python", function = "myapp.jobs:cleanup" }
        context = { days = 30, tables = ["a", "b"], nested = { deep = true } }
        """
    )
    assert job.action == PythonAction(function="myapp.jobs:cleanup")
    at = datetime(2026, 11, 27, 4, tzinfo=UTC)
    trigger = job.trigger_at(at, at)
    assert trigger.context == {"days": 30, "tables": ["a", "b"], "nested": {"deep": True}}
    assert b'"context":{"days":30' in trigger.to_bytes()


def test_a_job_without_a_context_keeps_its_fingerprint_and_sends_none() -> None:
    text = '[jobs.a]\nschedule = "* * * * *"\naction = { type = "shell", argv = ["true"] }\n'
    [job] = parse_jobs(text)
    assert b"context" not in job.canonical_json()
    at = datetime(2026, 11, 27, tzinfo=UTC)
    assert b"context" not in job.trigger_at(at, at).to_bytes()


@pytest.mark.parametrize(
    ("line", "field", "why"),
    [
        ('action = { type = "python", function = "no colon" }', "action.python.function", "pattern"),
        ('action = { type = "python", function = "os:system; rm" }', "action.python.function", "pattern"),
        ("context = { when = 2026-11-27T04:00:00Z }", "context.when", "JSON"),
        (f'context = {{ big = "{"x" * 17000}" }}', "context", "at most 16384 bytes"),
    ],
)
def test_bad_python_actions_and_contexts_name_the_line_and_the_field(line: str, field: str, why: str) -> None:
    text = f'[jobs.bad]\nschedule = "* * * * *"\n{line}\n'
    if "action" not in line:
        text += 'action = { type = "shell", argv = ["true"] }\n'
    with pytest.raises(JobFileError) as caught:
        parse_jobs(text, "jobs.toml")
    message = str(caught.value)
    assert message.startswith("jobs.toml:3: job 'bad'"), message
    assert f"field {field}" in message and why.lower() in message.lower(), message


def test_a_webhook_secret_must_be_a_standard_webhooks_secret_and_is_never_shown() -> None:
    action = HttpAction(url="https://example.com/hook", webhook_secret=SECRET)  # type: ignore[arg-type]
    assert action.webhook_secret == SECRET
    for bad in ("hunter2", "whsec_short", "whsec_" + "!" * 40):
        with pytest.raises(ValueError, match="webhook secret"):
            HttpAction(url="https://example.com/hook", webhook_secret=bad)  # type: ignore[arg-type]
    shown = redact(action.model_dump(mode="json"))
    assert shown["webhook_secret"] == MASK
