"""Settings that may hold a password (the broker's and the store's URLs) are also read from the
file a ``CRONFLEET_<NAME>_FILE`` variable names, as Docker, Kubernetes and systemd pass secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import Settings


@pytest.fixture(autouse=True)
def no_cronfleet_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CRONFLEET_"):
            monkeypatch.delenv(name)


def test_urls_are_read_from_their_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "amqp").write_text("amqp://cronfleet:s3cret@rabbit:5672/fleet\n")
    (tmp_path / "db").write_text("  postgresql://cronfleet:pw@db/cronfleet\n\n")
    monkeypatch.setenv("CRONFLEET_AMQP_URL_FILE", str(tmp_path / "amqp"))
    monkeypatch.setenv("CRONFLEET_DATABASE_URL_FILE", str(tmp_path / "db"))
    settings = Settings()
    assert settings.amqp_url == "amqp://cronfleet:s3cret@rabbit:5672/fleet"
    # Read like the variable: the async driver is added by the same validator.
    assert settings.database_url == "postgresql+asyncpg://cronfleet:pw@db/cronfleet"


def test_the_variable_wins_over_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "amqp").write_text("amqp://from-file/")
    monkeypatch.setenv("CRONFLEET_AMQP_URL_FILE", str(tmp_path / "amqp"))
    monkeypatch.setenv("CRONFLEET_AMQP_URL", "amqp://from-variable/")
    assert Settings().amqp_url == "amqp://from-variable/"


def test_a_file_that_cannot_be_read_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRONFLEET_DATABASE_URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"cannot read CRONFLEET_DATABASE_URL_FILE .*missing"):
        Settings()

    from common.cli.main import main

    assert main(["jobs"]) == 1
    assert capsys.readouterr().err.startswith("cronfleet: cannot read CRONFLEET_DATABASE_URL_FILE")
