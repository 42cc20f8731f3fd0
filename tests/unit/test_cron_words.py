"""Schedules in words: the common shapes read as English, anything else as the expression."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.cron_words import describe_schedule


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("* * * * *", "every minute"),
        ("*/5 * * * *", "every 5 minutes"),
        ("*/1 * * * *", "every minute"),
        ("0 * * * *", "every hour"),
        ("15 * * * *", "every hour at minute 15"),
        ("0 */2 * * *", "every 2 hours"),
        ("30 */6 * * *", "every 6 hours at minute 30"),
        ("0 3 * * *", "every day at 03:00"),
        ("30 9,17 * * *", "every day at 09:30 and 17:30"),
        ("30 9 * * 1-5", "at 09:30 on Monday to Friday"),
        ("0 8 * * MON-FRI", "at 08:00 on Monday to Friday"),
        ("0 10 * * 0,6", "at 10:00 on Sunday and Saturday"),
        ("0 10 * * 7", "at 10:00 on Sunday"),
        ("0 0 1 * *", "at 00:00 on the 1st of every month"),
        ("0 12 22 * *", "at 12:00 on the 22nd of every month"),
        ("0 12 13 * *", "at 12:00 on the 13th of every month"),
        ("0 6 25 12 *", "at 06:00 on 25 December"),
        ("0 6 1 JAN *", "at 06:00 on 1 January"),
        ("*/10 * * * MON", "every 10 minutes, on Monday"),
        ("* * * * * *", "every second"),
        ("*/15 * * * * *", "every 15 seconds"),
        ("0 0 3 * * *", "every day at 03:00"),
        ("@hourly", "every hour"),
        ("@daily", "every day at 00:00"),
        ("@weekly", "every Sunday at 00:00"),
    ],
)
def test_common_schedules_read_as_english(expression: str, words: str) -> None:
    assert describe_schedule(expression) == words


@pytest.mark.parametrize(
    "expression",
    ["0 3 L * *", "0 3 * * 5L", "0 3 * * 1#2", "5-10 * * * *", "0 3 15W * *", "7 * * * * * *", ""],
)
def test_other_schedules_come_back_as_they_are(expression: str) -> None:
    assert describe_schedule(expression) == expression


@given(st.text(max_size=60))
def test_it_never_raises(expression: str) -> None:
    assert isinstance(describe_schedule(expression), str)
