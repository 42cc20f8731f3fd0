"""Cron evaluation: ``common.cron.next_fire`` next to croniter and cronsim, in one run.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/python tests/bench/bench_cron.py --jobs 20000 --rounds 3

It builds ``--jobs`` jobs with diverse expressions (every one distinct, as a large fleet's are
mostly) in 12 zones, and an ``after`` instant for each. Then, in ``--rounds`` interleaved rounds,
it times one pass over every job for:

- **croniter, parse + next**: ``croniter(expression, after in the zone).get_next(datetime)``, which
  is what ``common.cron`` did for every fire before (plus its own checks);
- **cronsim, parse + next**: ``next(CronSim(expression, after in the zone))``, when cronsim is
  installed (``pip install cronsim``; it is not a dependency of cronfleet);
- **cronfleet, parse + next**: ``parse_schedule`` then ``next_fire`` with both caches emptied
  first, so that every schedule is parsed, validated and compiled again;
- **cronfleet, next only**: ``next_fire`` on parsed schedules (its result cache bypassed), what a
  scheduler pays at each fire of a job it has already loaded.

Each figure is the median round, in microseconds per job. It also reports how often cronsim and
croniter gave the same instant as cronfleet (they differ on daylight-saving nights and on cron's
day-field rule; see docs/scheduling.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from croniter import croniter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import cron

try:
    import cronsim
except ImportError:  # optional: only for the comparison
    cronsim = None  # type: ignore[assignment]

Jobs = list[tuple[str, ZoneInfo, datetime]]

ZONES = [
    "UTC",
    "America/New_York",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Moscow",
    "Asia/Kolkata",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Auckland",
]


def expression(pick: random.Random, index: int) -> str:
    """A distinct 5-field expression of a kind a fleet holds: fixed times, steps, ranges, lists."""
    minute = pick.choice([str(index % 60), f"*/{pick.randint(2, 30)}", f"{index % 60},{(index + 30) % 60}"])
    hour = pick.choice(["*", str(pick.randint(0, 23)), f"{pick.randint(0, 8)}-{pick.randint(9, 23)}", "*/2"])
    day = pick.choice(["*", "*", "*", str(pick.randint(1, 28)), "1,15"])
    month = pick.choice(["*", "*", "*", "*", f"{pick.randint(1, 6)}-{pick.randint(7, 12)}"])
    weekday = pick.choice(["*", "*", "1-5", str(pick.randint(0, 6)), "0,6"])
    return f"{minute} {hour} {day} {month} {weekday}"


def build(jobs: int, seed: int) -> Jobs:
    pick = random.Random(seed)
    found: dict[str, tuple[str, ZoneInfo, datetime]] = {}
    index = 0
    while len(found) < jobs:
        text = expression(pick, index)
        index += 1
        if text in found:
            continue
        try:
            cron.parse_schedule(text)
        except ValueError:
            continue
        after = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=pick.randrange(365 * 86_400))
        found[text] = (text, ZoneInfo(pick.choice(ZONES)), after)
    return list(found.values())


def clear_caches() -> None:
    cron.parse_schedule.cache_clear()
    cron.next_fire.cache_clear()
    cron._plain_field.cache_clear()
    cron._month_days.cache_clear()


def croniter_pass(jobs: Jobs) -> list[datetime]:
    return [croniter(text, after.astimezone(zone)).get_next(datetime) for text, zone, after in jobs]


def cronsim_pass(jobs: Jobs) -> list[datetime]:
    assert cronsim is not None
    return [next(cronsim.CronSim(text, after.astimezone(zone))) for text, zone, after in jobs]


def cronfleet_cold_pass(jobs: Jobs) -> list[datetime]:
    clear_caches()
    found = []
    for text, zone, after in jobs:
        cron.parse_schedule(text)
        found.append(cron.next_fire.__wrapped__(text, zone, after))
    return found


def cronfleet_next_pass(jobs: Jobs) -> list[datetime]:
    return [cron.next_fire.__wrapped__(text, zone, after) for text, zone, after in jobs]


def timed(run: Callable[[Jobs], list[datetime]], jobs: Jobs) -> tuple[float, list[datetime]]:
    started = time.perf_counter()
    found = run(jobs)
    return (time.perf_counter() - started) / len(jobs) * 1e6, found


def describe() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"code: {root} at {head}; Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=16)
    options = parser.parse_args()
    print(describe())
    jobs = build(options.jobs, options.seed)
    # Warm every zone's table of offsets once: a scheduler keeps them for its life.
    cronfleet_next_pass(jobs[: len(ZONES) * 10])
    passes: dict[str, Callable[[Jobs], list[datetime]]] = {
        "croniter, parse + next": croniter_pass,
        "cronfleet, parse + next": cronfleet_cold_pass,
        "cronfleet, next only": cronfleet_next_pass,
    }
    if cronsim is not None:
        passes["cronsim, parse + next"] = cronsim_pass
    figures: dict[str, list[float]] = {name: [] for name in passes}
    results: dict[str, list[datetime]] = {}
    for _ in range(options.rounds):
        for name, run in passes.items():
            micros, found = timed(run, jobs)
            figures[name].append(micros)
            results[name] = found
    reference = results["cronfleet, next only"]
    print(f"{len(jobs)} jobs, {options.rounds} rounds, median round, microseconds per job:")
    print("| path | us per job (median) | rounds | faster than croniter | same instant as cronfleet |")
    print("| --- | ---: | --- | ---: | ---: |")
    base = statistics.median(figures["croniter, parse + next"])
    for name, values in figures.items():
        # In UTC: Python never finds an instant of a repeated hour equal to one in another zone.
        same = sum(a.astimezone(UTC) == b for a, b in zip(results[name], reference, strict=True))
        rounds = " / ".join(f"{v:.1f}" for v in values)
        median = statistics.median(values)
        print(
            f"| {name} | {median:.1f} | {rounds} | {base / median:.1f}x | {same} ({same / len(jobs):.1%}) |"
        )


if __name__ == "__main__":
    main()
