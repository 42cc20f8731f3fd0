"""A worker's allow list of shell commands (CRONFLEET_ALLOW_COMMANDS)."""

from __future__ import annotations

import shutil

import pytest

from common.errors import ConfigError
from worker.allow import CommandAllowList


def test_unset_no_command_runs_and_the_refusal_says_what_to_set() -> None:
    refusal = CommandAllowList.parse(None).refusal("backup")
    assert refusal is not None and "CRONFLEET_ALLOW_COMMANDS" in refusal


@pytest.mark.parametrize(
    ("setting", "program", "allowed"),
    [
        ("*", "anything", True),
        ("/usr/local/bin/*", "/usr/local/bin/backup", True),
        ("/usr/local/bin/*", "/usr/bin/backup", False),
        ("backup, /opt/x", "backup", True),
        ("backup\n/opt/x", "/opt/x", True),
        ("backup", "/tmp/backup", False),
        ("/opt/jobs/*", "/opt/jobs/../../bin/sh", False),  # matched as the path resolves
        ("/opt/jobs/*", "/opt/jobs/./run", True),
    ],
)
def test_patterns_match_the_program_as_written(setting: str, program: str, allowed: bool) -> None:
    assert (CommandAllowList.parse(setting).refusal(program) is None) is allowed


def test_a_bare_name_is_also_matched_as_found_on_the_path() -> None:
    found = shutil.which("true")
    assert found is not None
    assert CommandAllowList.parse(found).refusal("true") is None
    assert CommandAllowList.parse("/nowhere/*").refusal("true") is not None


def test_a_setting_of_separators_only_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        CommandAllowList.parse(" , \n ")
