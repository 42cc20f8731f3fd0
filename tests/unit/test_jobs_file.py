"""Jobs files: every job valid or none; an error names the line, the job and the field."""

from __future__ import annotations

import pytest

from common.errors import JobFileError
from common.jobs import JobSpec, parse_jobs, spec_from_json

GOOD = """
[jobs.backup]
schedule = "0 3 * * *"
timezone = "Europe/Paris"
timeout_seconds = 600
action = { type = "shell", argv = ["/usr/local/bin/backup", "--full"] }

[jobs.hook]
schedule = "*/5 * * * *"
[jobs.hook.action]
type = "http"
url = "https://example.com/hook"
method = "POST"

[jobs.pinged]
schedule = "@daily"
"""


def test_a_good_file_gives_its_jobs_in_order() -> None:
    jobs = parse_jobs(GOOD)
    assert [j.name for j in jobs] == ["backup", "hook", "pinged"]
    assert jobs[0].action is not None and jobs[0].action.type == "shell"
    assert jobs[1].action is not None and jobs[1].action.type == "http"
    assert jobs[2].action is None and jobs[2].pool == "default" and jobs[2].enabled


def test_specs_round_trip_and_fingerprints_follow_content() -> None:
    for job in parse_jobs(GOOD):
        assert spec_from_json(job.canonical_json()) == job
    first, again = parse_jobs(GOOD)[0], parse_jobs(GOOD)[0]
    assert first.fingerprint() == again.fingerprint()
    changed = JobSpec.model_validate({**first.model_dump(), "timeout_seconds": 1})
    assert changed.fingerprint() != first.fingerprint()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[jobs.a]\nschedule = "* * * * *"\ntimeout_seconds = -1\n',
            "<jobs>:3: job 'a', field timeout_seconds: Input should be greater than 0",
        ),
        ('[jobs.a]\nschedule = "* * * *"\n', "<jobs>:2: job 'a', field schedule: a schedule has 5 fields"),
        (
            '[jobs.a]\nschedule = "* * * * *"\n\n[jobs.a.action]\ntype = "shell"\nargs = ["x"]\n',
            "<jobs>:6: job 'a', field action.args: unknown field (did you mean 'argv'?)",
        ),
        (
            '[jobs.a]\nschedule = "* * * * *"\naction = { type = "http", url = "nope" }\n',
            "<jobs>:3: job 'a', field action.url: Input should be a valid URL",
        ),
        ('[jobs."bad name"]\nschedule = "* * * * *"\n', "<jobs>:1: job 'bad name', field name: use letters"),
        (
            '[jobs.a]\nname = "b"\nschedule = "* * * * *"\n',
            "<jobs>:2: job 'a', field name: the name is the table key",
        ),
        ('[job.a]\nschedule = "* * * * *"\n', "<jobs>:1: unknown top-level key 'job'"),
        ('[jobs.a]\nschedule = "* * * * *"\nschedule = "* * * * *"\n', "<jobs>: not valid TOML"),
        (
            '[jobs.ok]\nschedule = "@hourly"\n[jobs.a]\nenabled = "maybe"\nschedule = "* * * * *"\n',
            "<jobs>:4: job 'a', field enabled: Input should be a valid boolean",
        ),
    ],
)
def test_errors_name_the_line_job_and_field(text: str, message: str) -> None:
    with pytest.raises(JobFileError) as caught:
        parse_jobs(text)
    assert str(caught.value).startswith(message), str(caught.value)
