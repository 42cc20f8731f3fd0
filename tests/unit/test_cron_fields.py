"""The fields mean what they meant with croniter: same schedules accepted, same fires (in UTC).

``common.cron`` parses the common forms itself and leaves the rest (``L``, ``W``, ``#``, wrapping
ranges) to croniter. Both sides are checked here against croniter with ``implement_cron_bug``,
which is cron's rule for the day fields: when either starts with ``*`` a day must match both.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from croniter import croniter
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.cron import next_fire, parse_schedule

# (lowest, highest, names) per field, seconds first.
FIELDS = [
    (0, 59, []),
    (0, 59, []),
    (0, 23, []),
    (1, 31, []),
    (1, 12, ["JAN", "FEB", "MAR", "JUN", "OCT", "DEC", "jan", "Sep"]),
    (0, 7, ["SUN", "MON", "FRI", "SAT", "mon", "Tue"]),
]


@st.composite
def items(draw: st.DrawFn, field: int) -> str:
    low, high, names = FIELDS[field]
    # Now and then one past either end, so that refusals are compared too.
    number = st.integers(low - 1, high + 1).map(str) | st.integers(low, high).map(lambda n: f"{n:02d}")
    value = number | st.sampled_from(names) if names else number
    kind = draw(st.sampled_from(["*", "value", "range", "step", "range-step", "value-step", "?"]))
    step = draw(st.integers(0, 70))
    if kind == "*":
        return "*"
    if kind == "?":
        return "?"
    if kind == "value":
        return draw(value)
    if kind == "step":
        return f"*/{step}"
    if kind == "value-step":
        return f"{draw(value)}/{step}"
    # Two different numbers: croniter 7 reads any 'a-a' as '*' (every value), a bug that
    # common.cron does not copy (see test_a_range_of_one_value_is_that_value).
    a, b = draw(st.lists(st.integers(low - 1, high + 1), min_size=2, max_size=2, unique=True))
    return f"{a}-{b}" if kind == "range" else f"{a}-{b}/{step}"


@st.composite
def expressions(draw: st.DrawFn) -> str:
    six = draw(st.booleans())
    fields = []
    for field in range(0 if six else 1, 6):
        count = draw(st.integers(1, 3))
        fields.append(",".join(draw(items(field)) for _ in range(count)))
    return " ".join(fields)


def croniter_fires(expression: str, after: datetime, count: int) -> list[datetime]:
    six = len(expression.split()) == 6
    steps = croniter(expression, after, implement_cron_bug=True, second_at_beginning=six)
    return [steps.get_next(datetime) for _ in range(count)]


def our_fires(expression: str, after: datetime, count: int) -> list[datetime]:
    found, at = [], after
    for _ in range(count):
        at = next_fire(expression, UTC, at)
        found.append(at)
    return found


def croniter_reads(expression: str) -> bool:
    try:
        return bool(croniter.is_valid(expression, second_at_beginning=len(expression.split()) == 6))
    except (TypeError, IndexError, KeyError, ValueError):
        return False


@settings(max_examples=800, derandomize=True, deadline=None, database=None)
@given(
    expressions(),
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)),
)
def test_the_common_forms_read_as_croniter_read_them(expression: str, after: datetime) -> None:
    try:
        parse_schedule(expression)
    except ValueError as refused:
        # Refused: croniter refused it too, or it is a date no calendar has (30 February).
        assert not croniter_reads(expression) or "never fires" in str(refused), expression
        return
    assert croniter_reads(expression), expression
    # A day field holding '*' after its first item ('1,*'): cron looks at the first character
    # only (a union with the other day field), croniter at the whole field (an intersection).
    day_fields = expression.split()[-3::2]
    assume(not any("*" in field[1:] for field in day_fields))
    assert our_fires(expression, after, 4) == croniter_fires(expression, after, 4), expression


CALENDAR = [
    "0 0 L * *",
    "30 6 L 2 *",
    "0 12 * * L5",
    "0 12 * * L0",
    "0 0 * * 1#2",
    "0 0 * * MON#5",
    "0 0 * * 1#2,3#4",
    "0 0 ? * MON#2",
    "0 0 15W * *",
    "0 0 1W * *",
    "0 0 31W * *",
    "0 0 L * MON",
    "0 0 1-L * *",
    "*/7 * ? * MON-FRI",
    "0 5-2 * * *",
    "0 22-3/2 * * *",
    "0 0 * * FRI-MON",
    "0 0 25-5 * *",
    "0 0 * NOV-FEB *",
    "10 */20 0 L * *",
]


@pytest.mark.parametrize("expression", CALENDAR)
@pytest.mark.parametrize("after", [datetime(2026, 1, 1, tzinfo=UTC), datetime(2028, 2, 27, 13, tzinfo=UTC)])
def test_croniter_extensions_keep_their_meaning(expression: str, after: datetime) -> None:
    assert our_fires(expression, after, 12) == croniter_fires(expression, after, 12)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # cron's rule: a day field starting with '*' makes the two an intersection...
        ("0 0 */2 * MON", ["2026-01-05", "2026-01-19", "2026-02-09"]),
        ("0 0 * * MON", ["2026-01-05", "2026-01-12", "2026-01-19"]),
        # ... and two restricted fields a union.
        ("0 0 13 * FRI", ["2026-01-02", "2026-01-09", "2026-01-13"]),
    ],
)
def test_day_of_month_and_weekday_combine_as_in_cron(expression: str, expected: list[str]) -> None:
    found = our_fires(expression, datetime(2026, 1, 1, tzinfo=UTC), 3)
    assert [f.date().isoformat() for f in found] == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0 5-5 * * *", "2026-01-01T05:00"),
        ("0 0 * * 1-1", "2026-01-05T00:00"),
        ("0 0 * * MON-MON", "2026-01-05T00:00"),
        ("0 0 * * 1-1/2", "2026-01-05T00:00"),
    ],
)
def test_a_range_of_one_value_is_that_value(expression: str, expected: str) -> None:
    # As in cron; croniter 7 reads 'a-a' as every value (every hour, every day).
    after = datetime(2026, 1, 1, tzinfo=UTC)
    assert our_fires(expression, after, 1)[0].strftime("%Y-%m-%dT%H:%M") == expected
