"""``cronfleet apply`` refuses every jobs file that could stop the fleet (issue 12).

Each refusal is one line, ``FILE:LINE: job 'x', field y: reason`` (``FILE:LINE:COL: reason`` when
the text itself is at fault), exit status 2, no traceback, and the store is left as it was.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import pytest

from common.settings import Settings
from tests.fleet import cronfleet

GOOD = b"""
[jobs.alpha]
schedule = "*/5 * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.beta]
schedule = "@daily"
timezone = "Asia/Tokyo"
"""
JOB = b'[jobs.bad]\nschedule = "* * * * *"\n'


def jobs_in_store(settings: Settings) -> list[dict[str, object]]:
    listed = cronfleet(settings, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, object]] = orjson.loads(listed.stdout)
    return rows


def refused(settings: Settings, path: Path, *options: str) -> str:
    """Apply ``path``; check it was refused as one line with status 2; return that line."""
    result: subprocess.CompletedProcess[str] = cronfleet(settings, "apply", *options, str(path))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert re.fullmatch(
        rf"cronfleet: {re.escape(str(path))}:\d+(:\d+: |: (job '[^']*', field [^:]+: )?)\S.*", line
    ), line
    return line


@pytest.fixture
def applied(settings: Settings, tmp_path: Path) -> list[dict[str, object]]:
    """The store holds alpha and beta; returns them as ``cronfleet jobs --json`` shows them."""
    good = tmp_path / "good.toml"
    good.write_bytes(GOOD)
    result = cronfleet(settings, "apply", str(good))
    assert result.returncode == 0, result.stderr
    before = jobs_in_store(settings)
    assert [row["name"] for row in before] == ["alpha", "beta"]
    return before


CASES = {
    # Measured: each of these was accepted and then crashed a process of the fleet.
    "expiry_of_1e12_seconds": (
        JOB + b"expires_after_seconds = 1e12\n",
        ":3: job 'bad', field expires_after_seconds: Input should be less than or equal to 31536000",
    ),
    "infinite_grace": (JOB + b"grace_seconds = inf\n", ":3: job 'bad', field grace_seconds: "),
    "nan_timeout": (JOB + b"timeout_seconds = nan\n", ":3: job 'bad', field timeout_seconds: "),
    "nul_in_argv": (
        JOB + b'action = { type = "shell", argv = ["echo", "a\\u0000b"] }\n',
        ":3: job 'bad', field action.argv.1: must not contain a NUL character",
    ),
    "env_name_with_equals": (
        JOB + b'action = { type = "shell", argv = ["true"], env = { "A=B" = "1" } }\n',
        ":3: job 'bad', field action.env.A=B: 'A=B' is not an environment variable name",
    ),
    # Measured: accepted, though never what was meant.
    "timeout_as_a_string": (
        JOB + b'timeout_seconds = "300"\n',
        ":3: job 'bad', field timeout_seconds: Input should be a valid number",
    ),
    "enabled_as_a_string": (
        JOB + b'enabled = "yes"\n',
        ":3: job 'bad', field enabled: Input should be a valid boolean",
    ),
    "argument_of_one_mib": (
        JOB + b'action = { type = "shell", argv = ["echo", "' + b"x" * 2**20 + b'"] }\n',
        ":3: job 'bad', field action.argv.1: an argument (the kernel's limit) is 1048576 bytes",
    ),
    "random_cron_field": (
        b'[jobs.bad]\nschedule = "R * * * *"\n',
        ":2: job 'bad', field schedule: 'R' is croniter's random form",
    ),
    "hashed_cron_field": (
        b'[jobs.bad]\nschedule = "H 3 * * *"\n',
        ":2: job 'bad', field schedule: 'H' is a hashed ('H') form",
    ),
    # Measured: refused, but as a traceback or without a line.
    "toml_syntax_error": (
        GOOD + b"[jobs.bad\n",
        ":9:10: not valid TOML: Expected ']' at the end of a table declaration",
    ),
    "binary_content": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ":1:1: not UTF-8 text (byte 0x89)"),
    "time_zone_of_5000_characters": (
        JOB + b'timezone = "' + b"a" * 5000 + b'"\n',
        ":3: job 'bad', field timezone: the time zone name is too long (5000 characters, at most 64)",
    ),
    "time_zone_that_is_a_directory": (
        JOB + b'timezone = "America"\n',
        ":3: job 'bad', field timezone: unknown time zone 'America'",
    ),
    "deep_nesting": (
        JOB + b"description = " + b"{a = " * 800 + b"1" + b"}" * 800 + b"\n",
        ":3: values nested too deeply",
    ),
    "integer_beyond_64_bits": (
        JOB + b'action = { type = "shell", argv = ["x"], success_exit_codes = [99999999999999999999] }\n',
        ":3: job 'bad', field action.success_exit_codes.0: integer out of range (TOML integers are 64-bit)",
    ),
    "integer_of_5000_digits": (
        JOB + b"grace_seconds = 1" + b"0" * 5000 + b"\n",
        ":3: integer out of range (TOML integers are 64-bit)",
    ),
    # Measured: an empty or commented-out file removed every job (apply prunes by default).
    "empty_file": (b"", ":1: the file defines no jobs; applying it would remove every job"),
    "comment_only_file": (
        b"# [jobs.alpha]\n# schedule = '@daily'\n",
        ":1: the file defines no jobs; applying it would remove every job",
    ),
}


@pytest.mark.parametrize(("content", "expected"), CASES.values(), ids=CASES.keys())
def test_a_file_that_could_stop_the_fleet_is_refused_as_one_line_and_changes_nothing(
    settings: Settings, tmp_path: Path, applied: list[dict[str, object]], content: bytes, expected: str
) -> None:
    path = tmp_path / "jobs.toml"
    path.write_bytes(content)
    line = refused(settings, path)
    assert line.startswith(f"cronfleet: {path}{expected}"), line
    assert jobs_in_store(settings) == applied


def test_a_file_with_no_jobs_is_refused_even_with_keep(
    settings: Settings, tmp_path: Path, applied: list[dict[str, object]]
) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text("")
    refused(settings, path, "--keep")
    refused(settings, path, "--dry-run")
    assert jobs_in_store(settings) == applied


@pytest.mark.parametrize("option", ["--allow-empty", "--prune"])
def test_a_file_with_no_jobs_empties_the_store_when_asked_to(
    settings: Settings, tmp_path: Path, applied: list[dict[str, object]], option: str
) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text("# nothing scheduled any more\n")
    result = cronfleet(settings, "apply", option, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["removed: alpha", "removed: beta"]
    assert jobs_in_store(settings) == []


def test_keep_and_prune_cannot_both_be_asked_for(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_bytes(GOOD)
    result = cronfleet(settings, "apply", "--keep", "--prune", str(path))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_a_missing_file_is_refused_with_status_2(settings: Settings, tmp_path: Path) -> None:
    result = cronfleet(settings, "apply", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr == f"cronfleet: {tmp_path / 'nope.toml'}: cannot read: No such file or directory\n"


@pytest.mark.both_stores
def test_values_at_every_bound_apply_and_every_reader_still_works(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(
        '[jobs.edge]\nschedule = "0 0 29 2 *"\ntimezone = "Australia/Lord_Howe"\n'
        "timeout_seconds = 604800\ngrace_seconds = 31536000\nexpires_after_seconds = 31536000\n"
        f'description = "{"d" * 4096}"\n'
        'action = { type = "shell", argv = ["true", "' + "x" * 131_071 + '"], '
        "success_exit_codes = [-255, 255] }\n"
        '[jobs.zero]\nschedule = "0 0 L * *"\ngrace_seconds = 0\ntimeout_seconds = 1e-9\n'
        'action = { type = "http", url = "http://127.0.0.1:9/", headers = { X-A = "a\\tb" }, '
        "expect_status = [100, 599] }\n"
    )
    result = cronfleet(settings, "apply", str(path))
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in jobs_in_store(settings)] == ["edge", "zero"]
    status = cronfleet(settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert {row["job"]: row["health"] for row in orjson.loads(status.stdout)["jobs"]} == {
        "edge": "new",  # no monitor has seen them yet
        "zero": "new",
    }
