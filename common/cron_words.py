"""A cron schedule in plain English, for people (the dashboard): ``*/5 * * * *`` is "every 5
minutes". Pure. It knows the common shapes only; anything else comes back as the expression."""

from __future__ import annotations

import re

_MACROS = {
    "@yearly": "every year on 1 January at 00:00",
    "@annually": "every year on 1 January at 00:00",
    "@monthly": "on the 1st of every month at 00:00",
    "@weekly": "every Sunday at 00:00",
    "@daily": "every day at 00:00",
    "@midnight": "every day at 00:00",
    "@hourly": "every hour",
}
_DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_DAY_NAMES = {name[:3].upper(): index for index, name in enumerate(_DAYS)}
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_MONTH_NAMES = {name[:3].upper(): index + 1 for index, name in enumerate(_MONTHS)}
_NUMBER = re.compile(r"\d{1,2}")
_STEP = re.compile(r"\*/(\d{1,2})")


def describe_schedule(expression: str) -> str:
    """``expression`` (5 fields, 6 with seconds first, or a macro) in English, such as "every 5
    minutes", "every day at 03:00" or "at 09:30 on Monday to Friday"; the expression itself,
    unchanged, when it is not one of the shapes this knows. Never raises."""
    text = " ".join(expression.split())
    if text.lower() in _MACROS:
        return _MACROS[text.lower()]
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        return expression
    try:
        words = _describe(*fields)
    except (ValueError, IndexError):
        return expression
    return expression if words is None else words


def _describe(second: str, minute: str, hour: str, day: str, month: str, weekday: str) -> str | None:
    when = _time_of_day(second, minute, hour)
    if when is None:
        return None
    days = _days(day, month, weekday)
    if days is None:
        return None
    if not days:
        return when if when.startswith("every") else f"every day {when}"
    if when.startswith("every"):
        return f"{when}, {days}"
    return f"{when} {days}"


def _time_of_day(second: str, minute: str, hour: str) -> str | None:
    """The part of the day: "every 5 minutes", "at 03:00", "at minute 15 of every hour"..."""
    if second == "*" and minute == "*" and hour == "*":
        return "every second"
    step = _STEP.fullmatch(second)
    if step and minute == "*" and hour == "*":
        return _every(int(step.group(1)), "second")
    if second != "0":
        return None
    if minute == "*" and hour == "*":
        return "every minute"
    step = _STEP.fullmatch(minute)
    if step and hour == "*":
        return _every(int(step.group(1)), "minute")
    if not _NUMBER.fullmatch(minute) or int(minute) > 59:
        return None
    if hour == "*":
        return "every hour" if minute == "0" else f"every hour at minute {int(minute)}"
    step = _STEP.fullmatch(hour)
    if step:
        every = _every(int(step.group(1)), "hour")
        return every if minute == "0" else f"{every} at minute {int(minute)}"
    hours = hour.split(",")
    if not all(_NUMBER.fullmatch(h) and int(h) <= 23 for h in hours):
        return None
    return "at " + _join([f"{int(h):02d}:{int(minute):02d}" for h in hours])


def _days(day: str, month: str, weekday: str) -> str | None:
    """Which days: "" (every day), "on Monday to Friday", "on the 1st of every month", "on 1
    January"...; None for a shape this does not know."""
    if day in ("*", "?") and month == "*" and weekday in ("*", "?"):
        return ""
    if day in ("*", "?") and month == "*":
        named = _weekdays(weekday)
        return None if named is None else f"on {named}"
    if weekday not in ("*", "?") or not _NUMBER.fullmatch(day) or not 1 <= int(day) <= 31:
        return None
    if month == "*":
        return f"on the {_ordinal(int(day))} of every month"
    number = _MONTH_NAMES.get(month.upper()) or (int(month) if _NUMBER.fullmatch(month) else 0)
    if not 1 <= number <= 12:
        return None
    return f"on {int(day)} {_MONTHS[number - 1]}"


def _weekdays(field: str) -> str | None:
    if "-" in field and "," not in field:
        first, last = (_weekday(part) for part in field.split("-"))
        if first is None or last is None:
            return None
        return f"{_DAYS[first]} to {_DAYS[last]}"
    days = [_weekday(part) for part in field.split(",")]
    if any(d is None for d in days):
        return None
    return _join([_DAYS[d] for d in days if d is not None])


def _weekday(part: str) -> int | None:
    if part.upper() in _DAY_NAMES:
        return _DAY_NAMES[part.upper()]
    if _NUMBER.fullmatch(part) and int(part) <= 7:
        return int(part) % 7
    return None


def _every(step: int, unit: str) -> str:
    return f"every {unit}" if step == 1 else f"every {step} {unit}s"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
