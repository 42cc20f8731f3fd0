"""``validate_job``: a job given as JSON is validated exactly as ``apply`` validates the jobs
file, and refused with the field at fault and one line of reason; the metrics buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from common.jobs import InvalidJob, parse_jobs, validate_job
from common.run_metrics import bucket_of

GOOD = {"name": "backup", "schedule": "0 3 * * *", "action": {"type": "shell", "argv": ["true"]}}


def test_a_job_from_json_equals_the_same_job_from_the_jobs_file() -> None:
    from_file = parse_jobs(
        '[jobs.backup]\nschedule = "0 3 * * *"\naction = { type = "shell", argv = ["true"] }\n'
    )
    assert validate_job(dict(GOOD)) == from_file[0]
    assert validate_job({**GOOD, "timeout_seconds": 5}).timeout_seconds == 5.0  # an integer is a good float


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"timeout_seconds": "5"}, "timeout_seconds", "valid number"),
        ({"enabled": "yes"}, "enabled", "valid boolean"),
        ({"schedule": "61 * * * *"}, "schedule", ""),
        ({"timezone": "Nowhere/Town"}, "timezone", ""),
        ({"grace_secs": 5}, "grace_secs", "unknown field"),
        ({"schedul": "@daily", "schedule": None}, "schedul", "did you mean 'schedule'"),
        ({"name": "has space"}, "name", "letters, digits"),
        ({"name": 7}, "name", "letters, digits"),
        ({"grace_seconds": 2**64}, "grace_seconds", "64-bit"),
        ({"action": {"type": "shell", "argv": ["a\x00b"]}}, "action.argv.0", ""),
        ({"action": {"type": "ftp"}}, "action", ""),
    ],
)
def test_a_bad_field_is_named_with_one_line_of_reason(change: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(InvalidJob) as refused:
        # None removes the field.
        validate_job({key: value for key, value in {**GOOD, **change}.items() if value is not None})
    assert refused.value.field == field and says in refused.value.detail
    assert "\n" not in refused.value.detail


def test_anything_but_an_object_is_refused_as_a_whole() -> None:
    bad: Any
    for bad in ([], "job", None, 3):
        with pytest.raises(InvalidJob) as refused:
            validate_job(bad)
        assert refused.value.field is None


def test_buckets_are_utc_hours_and_days() -> None:
    late = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-2)))
    assert bucket_of(late, "hour") == datetime(2026, 3, 2, 1, tzinfo=UTC)
    assert bucket_of(late, "day") == datetime(2026, 3, 2, tzinfo=UTC)
