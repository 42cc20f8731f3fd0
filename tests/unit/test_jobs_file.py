"""Jobs files: every job valid or none; an error names the line, the job and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.bounds import MAX_EXPIRY_SECONDS, MAX_GRACE_SECONDS, MAX_JOBS_FILE_BYTES, MAX_TIMEOUT_SECONDS
from common.errors import JobFileError
from common.jobs import JobSpec, load_jobs_file, parse_jobs, spec_from_json

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
        ('[jobs.a]\nschedule = "* * * * *"\nschedule = "* * * * *"\n', "<jobs>:3:23: not valid TOML"),
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


# -- issue 12: nothing a jobs file says can stop the fleet --------------------------------------

JOB = '[jobs.a]\nschedule = "* * * * *"\n'


def refusal(text: str) -> str:
    with pytest.raises(JobFileError) as caught:
        parse_jobs(text)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    return message


@pytest.mark.parametrize(
    ("line", "field"),
    [
        # 1e12 s overflowed the trigger's expiry: the scheduler died at the first fire and at
        # every restart.
        ("expires_after_seconds = 1e12", "expires_after_seconds"),
        ("expires_after_seconds = 31536001", "expires_after_seconds"),
        # inf was stored as null; every reader of the store then crashed.
        ("grace_seconds = inf", "grace_seconds"),
        ("grace_seconds = nan", "grace_seconds"),
        ("grace_seconds = 31536001", "grace_seconds"),
        ("timeout_seconds = inf", "timeout_seconds"),
        ("timeout_seconds = nan", "timeout_seconds"),
        ("timeout_seconds = 604801", "timeout_seconds"),
        ("expires_after_seconds = 0", "expires_after_seconds"),
        ("grace_seconds = -1", "grace_seconds"),
    ],
)
def test_durations_are_finite_positive_and_bounded(line: str, field: str) -> None:
    assert refusal(JOB + line + "\n").startswith(f"<jobs>:3: job 'a', field {field}: ")


def test_durations_at_their_bounds_are_accepted_and_round_trip() -> None:
    text = JOB + "timeout_seconds = 604800\ngrace_seconds = 0\nexpires_after_seconds = 31536000\n"
    (job,) = parse_jobs(text)
    assert (job.timeout_seconds, job.grace_seconds, job.expires_after_seconds) == (604800, 0, 31536000)
    assert spec_from_json(job.canonical_json()) == job


@pytest.mark.parametrize(
    ("action", "field", "reason"),
    [
        # These raised ValueError inside the worker, at every fire.
        ('argv = ["echo", "a\\u0000b"]', "action.argv.1", "NUL"),
        ('argv = ["x"], env = { "A=B" = "1" }', "action.env.A=B", "environment variable name"),
        ('argv = ["x"], env = { "" = "1" }', 'action.env.""', "environment variable name"),
        ('argv = ["x"], env = { "1A" = "1" }', "action.env.1A", "environment variable name"),
        ('argv = ["x"], env = { A = "\\u0000" }', "action.env.A", "NUL"),
        ('argv = ["x"], cwd = "/tmp\\u0000"', "action.cwd", "NUL"),
        ('argv = ["x"], cwd = ""', "action.cwd", "at least 1"),
        ('argv = ["x"], success_exit_codes = [256]', "action.success_exit_codes.0", "less than or equal"),
    ],
)
def test_a_shell_action_the_kernel_would_refuse_is_refused(action: str, field: str, reason: str) -> None:
    message = refusal(JOB + 'action = { type = "shell", ' + action + " }\n")
    assert message.startswith(f"<jobs>:3: job 'a', field {field}: "), message
    assert reason in message, message


def test_an_argument_longer_than_the_kernel_allows_is_refused() -> None:
    # A 1 MiB argument can never be executed (Linux: 128 KiB per argument).
    message = refusal(JOB + f'action = {{ type = "shell", argv = ["echo", "{"x" * 1024 * 1024}"] }}\n')
    assert message.startswith("<jobs>:3: job 'a', field action.argv.1: "), message
    assert "131071 bytes" in message


def test_the_whole_command_is_bounded() -> None:
    argv = ", ".join(f'"{"x" * 100_000}"' for _ in range(6))
    message = refusal(JOB + f'action = {{ type = "shell", argv = [{argv}] }}\n')
    assert message.startswith("<jobs>:3: job 'a', field action: the command"), message


def test_an_action_whose_json_would_not_fit_a_message_is_refused() -> None:
    # Control characters are escaped six times longer in JSON: the trigger would outgrow a message.
    argv = ", ".join('"' + "\\u0001" * 100_000 + '"' for _ in range(2))
    message = refusal(JOB + f'action = {{ type = "shell", argv = ["x", {argv}] }}\n')
    assert message.startswith("<jobs>:3: job 'a', field action: "), message
    assert "message" in message


@pytest.mark.parametrize(
    ("action", "field"),
    [
        ('headers = { "X A" = "1" }', "action.headers.X A"),
        ('headers = { "X-A" = "a\\nb" }', "action.headers.X-A"),
        ('headers = { "X-A" = "a\\rb" }', "action.headers.X-A"),
        ('headers = { "X-A" = "\\u0000" }', "action.headers.X-A"),
        ('headers = { "X-A" = "é" }', "action.headers.X-A"),
        ('headers = { "X-A" = " padded " }', "action.headers.X-A"),
        ('headers = { "Content-Length" = "1" }', "action.headers.Content-Length"),
        ('body = "\\u0000"', "action.body"),
        ("expect_status = [99]", "action.expect_status.0"),
    ],
)
def test_an_http_action_the_client_would_refuse_is_refused(action: str, field: str) -> None:
    message = refusal(JOB + f'action = {{ type = "http", url = "http://127.0.0.1/", {action} }}\n')
    assert message.startswith(f"<jobs>:3: job 'a', field {field}: "), message


def test_a_url_is_bounded() -> None:
    message = refusal(JOB + f'action = {{ type = "http", url = "http://h/{"a" * 3000}" }}\n')
    assert message.startswith("<jobs>:3: job 'a', field action.url: "), message


def test_a_description_is_bounded_and_has_no_nul() -> None:
    assert refusal(JOB + f'description = "{"d" * 5000}"\n').startswith(
        "<jobs>:3: job 'a', field description: "
    )
    assert refusal(JOB + 'description = "\\u0000"\n').startswith("<jobs>:3: job 'a', field description: ")


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        # Coerced before: "300" became 300.0 and "yes" became True.
        ('timeout_seconds = "300"', "timeout_seconds", "Input should be a valid number"),
        ('grace_seconds = "60"', "grace_seconds", "Input should be a valid number"),
        ('enabled = "yes"', "enabled", "Input should be a valid boolean"),
        ("enabled = 1", "enabled", "Input should be a valid boolean"),
        ("description = 5", "description", "Input should be a valid string"),
        ("timezone = 1979-05-27", "timezone", "Input should be a valid string"),
        (
            'action = { type = "shell", argv = ["x"], success_exit_codes = ["0"] }',
            "action.success_exit_codes.0",
            "Input should be a valid integer",
        ),
        (
            'action = { type = "shell", argv = ["x"], success_exit_codes = [1.0] }',
            "action.success_exit_codes.0",
            "Input should be a valid integer",
        ),
    ],
)
def test_no_value_is_coerced_from_another_type(line: str, field: str, reason: str) -> None:
    message = refusal(JOB + line + "\n")
    assert message.startswith(f"<jobs>:3: job 'a', field {field}: {reason}"), message


def test_toml_integers_are_still_good_float_durations() -> None:
    (job,) = parse_jobs(JOB + "timeout_seconds = 600\ngrace_seconds = 0\n")
    assert job.timeout_seconds == 600.0 and isinstance(job.timeout_seconds, float)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        # Beyond 64 bits: orjson raised TypeError while apply stored the job.
        (
            'action = { type = "shell", argv = ["x"], success_exit_codes = [99999999999999999999] }',
            "action.success_exit_codes.0",
        ),
        ("grace_seconds = 99999999999999999999999999999999999999999", "grace_seconds"),
        ("unknown = -9223372036854775809", "unknown"),
    ],
)
def test_integers_beyond_64_bits_are_refused(line: str, field: str) -> None:
    message = refusal(JOB + line + "\n")
    assert message.startswith(f"<jobs>:3: job 'a', field {field}"), message
    assert "64-bit" in message, message


def test_an_integer_too_long_to_read_is_refused_on_its_line() -> None:
    # tomllib raised a bare ValueError (Python's 4300-digit limit).
    message = refusal(JOB + "timeout_seconds = 1" + "0" * 5000 + "\n")
    assert message.startswith("<jobs>:3: "), message
    assert "64-bit" in message, message


def test_toml_syntax_errors_name_line_and_column() -> None:
    assert refusal('[jobs.a]\nschedule = "* * * * *"\nschedule = "* * * * *"\n').startswith(
        "<jobs>:3:23: not valid TOML: Cannot overwrite a value"
    )
    unclosed = refusal('\n\n[jobs.x\nschedule = "@daily"\n')
    assert unclosed.startswith("<jobs>:3:8: not valid TOML: Expected ']'"), unclosed
    assert refusal(JOB + 'description = "\\uD800"\n').startswith("<jobs>:3:")


@pytest.mark.parametrize(
    "value", ["[" * 2000 + "]" * 2000, "{a = " * 600 + "1" + "}" * 600, "[{a = " * 400 + "1" + "}]" * 400]
)
def test_deep_nesting_is_one_line_naming_its_line(value: str) -> None:
    # tomllib raised RecursionError.
    message = refusal(JOB + "\ndescription = " + value + "\n")
    assert message.startswith("<jobs>:4: "), message
    assert "nested too deeply" in message, message


@pytest.mark.parametrize(
    ("zone", "reason"),
    [
        ("a" * 5000, "too long"),  # OSError: file name too long
        ("America", "unknown time zone"),  # IsADirectoryError
        ("../../etc/passwd", "unknown time zone"),
        ("UTC\\u0000", "unknown time zone"),
        ("Europe/Paris ", "unknown time zone"),
        ("zone.tab", "unknown time zone"),
        ("leapseconds", "unknown time zone"),
        ("Europe//Paris", "unknown time zone"),
    ],
)
def test_odd_time_zones_are_refused_as_the_field(zone: str, reason: str) -> None:
    message = refusal(JOB + f'timezone = "{zone}"\n')
    assert message.startswith("<jobs>:3: job 'a', field timezone: "), message
    assert reason in message, message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("schedule", "reason"),
    [
        ("R * * * *", "random"),  # each scheduler drew its own minute
        ("0 R(0-5) * * *", "random"),
        ("H * * * *", "hashed"),
        ("x" * 5000, "too long"),
    ],
)
def test_schedules_every_scheduler_cannot_agree_on_are_refused(schedule: str, reason: str) -> None:
    message = refusal(f'[jobs.a]\nschedule = "{schedule}"\n')
    assert message.startswith("<jobs>:2: job 'a', field schedule: "), message
    assert reason in message, message


def test_a_job_name_with_a_trailing_newline_is_refused() -> None:
    message = refusal('[jobs."abc\\n"]\nschedule = "@daily"\n')
    assert message.startswith("<jobs>:1: job 'abc\\n', field name: "), message


def test_user_text_in_a_refusal_cannot_break_its_line() -> None:
    message = refusal(JOB + 'action = { type = "sh\\nell\\r\\u001b[2J" }\n')
    assert message.startswith("<jobs>:3: job 'a', field action: "), message


def test_an_empty_or_comment_only_file_has_no_jobs() -> None:
    assert parse_jobs("") == []
    assert parse_jobs("# all commented out\n# [jobs.a]\n") == []
    assert parse_jobs("[jobs]\n") == []


def test_a_file_that_is_not_utf8_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_bytes(b'[jobs.a]\nschedule = "@daily"\ndescription = "caf\xe9"\n')
    with pytest.raises(JobFileError) as caught:
        load_jobs_file(path)
    assert str(caught.value) == f"{path}:3:19: not UTF-8 text (byte 0xe9)"


def test_a_binary_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(JobFileError) as caught:
        load_jobs_file(path)
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: [^\n]+", str(caught.value)), str(caught.value)


def test_an_oversize_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    with path.open("wb") as out:
        out.write(b"# padding\n" * (MAX_JOBS_FILE_BYTES // 10 + 1))
    with pytest.raises(JobFileError) as caught:
        load_jobs_file(path)
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+: the file is larger than 64 MiB", str(caught.value))


# -- every accepted spec round-trips through the store's JSON ------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30)
durations = st.one_of(
    st.floats(min_value=0, max_value=MAX_EXPIRY_SECONDS * 1.01),
    st.floats(),
    st.integers(min_value=0, max_value=MAX_EXPIRY_SECONDS + 1),
    st.sampled_from([5e-324, 1e-9, 0.1, MAX_TIMEOUT_SECONDS, MAX_GRACE_SECONDS, -0.0]),
)
shell_actions = st.fixed_dictionaries(
    {"type": st.just("shell"), "argv": st.lists(texts, min_size=1, max_size=4)},
    optional={
        "cwd": st.none() | texts,
        "env": st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True) | texts, texts),
        "success_exit_codes": st.lists(st.integers(-300, 300), min_size=1, max_size=4),
    },
)
http_actions = st.fixed_dictionaries(
    {"type": st.just("http"), "url": st.sampled_from(["http://127.0.0.1:9/x", "https://h.example/a?b=c"])},
    optional={
        "method": st.sampled_from(["GET", "POST", "DELETE"]),
        "headers": st.dictionaries(st.from_regex(r"[A-Za-z-]{1,10}", fullmatch=True), texts, max_size=3),
        "body": st.none() | texts,
        "expect_status": st.lists(st.integers(90, 610), min_size=1, max_size=4),
    },
)
specs = st.fixed_dictionaries(
    {"name": names, "schedule": st.sampled_from(["* * * * *", "@daily", "*/10 * * * * *", "0 0 L * *"])},
    optional={
        "timezone": st.sampled_from(["UTC", "Europe/Paris", "Australia/Lord_Howe"]),
        "action": st.none() | shell_actions | http_actions,
        "pool": names,
        "timeout_seconds": durations,
        "expires_after_seconds": durations,
        "grace_seconds": durations,
        "enabled": st.booleans(),
        "description": texts,
    },
)


@settings(max_examples=400, derandomize=True)
@given(specs)
def test_every_accepted_spec_round_trips_through_canonical_json(data: dict[str, object]) -> None:
    try:
        spec = JobSpec.model_validate(data, strict=True)
    except ValidationError:
        return
    stored = spec.canonical_json()
    assert spec_from_json(stored) == spec
    assert spec_from_json(stored).canonical_json() == stored
    assert spec_from_json(stored).fingerprint() == spec.fingerprint()


def test_failure_threshold_is_strict_bounded_and_kept_out_of_old_fingerprints() -> None:
    job = parse_jobs('[jobs.a]\nschedule = "@daily"\nfailure_threshold = 3\n')[0]
    assert job.failure_threshold == 3
    assert spec_from_json(job.canonical_json()) == job
    default = parse_jobs('[jobs.a]\nschedule = "@daily"\n')[0]
    assert default.failure_threshold == 1
    # A spec stored before the field existed reads back the same, with the same fingerprint.
    assert b"failure_threshold" not in default.canonical_json()
    assert job.fingerprint() != default.fingerprint()
    for value, reason in (
        ("0", "greater than or equal to 1"),
        ("1001", "less than or equal to 1000"),
        ('"2"', "valid integer"),
        ("1.5", "valid integer"),
    ):
        with pytest.raises(JobFileError, match=rf"<jobs>:3: job 'a', field failure_threshold: .*{reason}"):
            parse_jobs(f'[jobs.a]\nschedule = "@daily"\nfailure_threshold = {value}\n')
