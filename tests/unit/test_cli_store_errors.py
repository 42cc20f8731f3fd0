"""A store that fails mid-command (SQLite locked by another writer past the busy timeout, a
database gone) is one line naming the store, never "unexpected error" with the statement."""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import OperationalError

from common.cli.main import _one_line


def test_a_locked_database_is_one_line_about_the_store() -> None:
    error = OperationalError(
        "INSERT INTO fires (trigger_id, job) VALUES (?, ?)",
        ("a@x", "a"),
        sqlite3.OperationalError("database is locked"),
    )
    line = _one_line(error)
    assert line.startswith("the store is unavailable: database is locked")
    assert "INSERT" not in line and "\n" not in line and "unexpected" not in line
