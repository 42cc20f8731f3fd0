"""The overlap policy as the jobs file and the wire say it: ``overlap = "allow" | "skip" |
"queue"``, ``exclusive = true`` kept as the older name of ``queue``, contradictions refused naming
the line and the field, and the trigger readable by workers from before ``overlap``."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError

from common.errors import JobFileError
from common.jobs import parse_jobs
from common.messages import TRIGGER_ADAPTER, Overlap, Trigger

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
HEAD = '[jobs.report]\nschedule = "*/5 * * * *"\naction = { type = "shell", argv = ["true"] }\n'


def _trigger(extra: str) -> Trigger:
    [spec] = parse_jobs(HEAD + extra)
    return spec.trigger_at(NOW, NOW)


@pytest.mark.parametrize(
    ("extra", "policy", "wire"),
    [
        ("", Overlap.ALLOW, {}),
        ('overlap = "allow"', Overlap.ALLOW, {}),
        ('overlap = "skip"', Overlap.SKIP, {"overlap": "skip"}),
        (
            'overlap = "skip"\nexclusive_ttl = "2m"',
            Overlap.SKIP,
            {"overlap": "skip", "exclusive_ttl_seconds": 120},
        ),
        # ``queue`` goes on the wire as ``exclusive``, which workers from before ``overlap`` run.
        ('overlap = "queue"', Overlap.QUEUE, {"exclusive": True}),
        ("exclusive = true", Overlap.QUEUE, {"exclusive": True}),
        ('exclusive = true\noverlap = "queue"', Overlap.QUEUE, {"exclusive": True}),
        ('exclusive = false\noverlap = "allow"', Overlap.ALLOW, {}),
    ],
)
def test_each_way_of_saying_the_policy_reaches_the_trigger(
    extra: str, policy: Overlap, wire: dict[str, object]
) -> None:
    [spec] = parse_jobs(HEAD + extra)
    assert spec.overlap_policy() is policy
    trigger = spec.trigger_at(NOW, NOW)
    assert trigger.policy is policy
    body = orjson.loads(trigger.to_bytes())
    said = {k: body[k] for k in ("overlap", "exclusive", "exclusive_ttl_seconds") if k in body}
    assert said == wire
    assert TRIGGER_ADAPTER.validate_json(trigger.to_bytes(), strict=True) == trigger


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'overlap = "skip"\nexclusive = true',
            'field exclusive: exclusive = true contradicts overlap = "skip"',
        ),
        (
            'overlap = "allow"\nexclusive = true',
            'field exclusive: exclusive = true contradicts overlap = "allow"',
        ),
        (
            'overlap = "queue"\nexclusive = false',
            'field exclusive: exclusive = false contradicts overlap = "queue"',
        ),
        ('exclusive = false\noverlap = "skip"', None),  # order in the file does not matter
        ('overlap = "never"', "field overlap: Input should be 'allow', 'skip' or 'queue'"),
        ("overlap = true", "field overlap: Input should be 'allow', 'skip' or 'queue'"),
    ],
)
def test_a_contradiction_or_a_bad_value_is_refused_naming_the_line_and_field(
    extra: str, message: str | None
) -> None:
    with pytest.raises(JobFileError) as raised:
        parse_jobs(HEAD + extra + "\n", "jobs.toml")
    text = str(raised.value)
    if message is None:
        assert "job 'report', field exclusive: exclusive = false contradicts overlap = \"skip\"" in text
        assert text.startswith("jobs.toml:4:")  # the line of ``exclusive``
        return
    line = 4 + extra.count("\n")  # the field at fault is on the last line
    assert f"jobs.toml:{line}: job 'report', {message}" in text


def test_a_job_that_does_not_set_overlap_keeps_its_fingerprint_and_its_bytes() -> None:
    [plain] = parse_jobs(HEAD)
    assert b"overlap" not in plain.canonical_json()
    assert b"overlap" not in _trigger("").to_bytes()
    [old] = parse_jobs(HEAD + "exclusive = true\n")
    assert (
        b"overlap" not in old.canonical_json() and b"overlap" not in _trigger("exclusive = true").to_bytes()
    )


def test_a_trigger_without_overlap_means_its_exclusive_field_and_a_contradiction_is_malformed() -> None:
    plain = _trigger("")
    assert plain.overlap is None and plain.policy is Overlap.ALLOW
    body = orjson.loads(plain.to_bytes())
    assert TRIGGER_ADAPTER.validate_json(orjson.dumps({**body, "exclusive": True}), strict=True).policy is (
        Overlap.QUEUE
    )
    for overlap in ("allow", "skip", "queue"):
        read = TRIGGER_ADAPTER.validate_json(orjson.dumps({**body, "overlap": overlap}), strict=True)
        assert read.policy is Overlap(overlap)
    with pytest.raises(ValidationError, match='exclusive: true means overlap "queue", not "skip"'):
        TRIGGER_ADAPTER.validate_json(
            orjson.dumps({**body, "exclusive": True, "overlap": "skip"}), strict=True
        )
    with pytest.raises(ValidationError):
        TRIGGER_ADAPTER.validate_json(orjson.dumps({**body, "overlap": "sometimes"}), strict=True)
