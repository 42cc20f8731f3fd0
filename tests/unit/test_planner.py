"""The timer heap: each fire once, in order, re-planned on change, settled by the misfire policy
when reached too late."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from common.jobs import JobSpec, parse_jobs
from scheduler.planner import Planner

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
JOBS = """
[jobs.fast]
schedule = "*/10 * * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.slow]
schedule = "* * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.pinged]
schedule = "* * * * *"

[jobs.paused]
schedule = "* * * * * *"
enabled = false
action = { type = "shell", argv = ["true"] }
"""


def _drain(
    planner: Planner, until: datetime, step: timedelta = timedelta(seconds=1)
) -> list[tuple[str, datetime]]:
    fired, now = [], T0
    while now <= until:
        fired += [(f.job.name, f.scheduled_at) for f in planner.pop_due(now)]
        now += step
    return fired


def test_only_enabled_jobs_with_an_action_are_planned() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    assert len(planner) == 2
    assert planner.next_wakeup() == T0 + timedelta(seconds=10)


def test_every_fire_comes_once_and_in_order() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    fired = _drain(planner, T0 + timedelta(minutes=2))
    assert [t for name, t in fired if name == "fast"] == [
        T0 + timedelta(seconds=10 * i) for i in range(1, 13)
    ]
    assert [t for name, t in fired if name == "slow"] == [
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=2),
    ]
    times = [t for _, t in fired]
    assert times == sorted(times)


def test_a_tick_a_little_late_catches_up_on_every_fire() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    planner.pop_due(T0 + timedelta(seconds=10))
    due = planner.pop_due(T0 + timedelta(seconds=24))  # 4 s late: late, not missed
    assert [f.scheduled_at for f in due] == [T0 + timedelta(seconds=20)]
    assert planner.take_misfires() == []


def test_after_downtime_the_missed_fires_are_settled_by_the_misfire_policy() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    now = T0 + timedelta(hours=1, seconds=3)
    planner.started_at = now  # a scheduler starting after an hour without one
    due = planner.pop_due(now)
    # The default policy, once: the latest missed instant goes out, flagged; a fire due less
    # than START_TOLERANCE before the start is late, not missed, and goes out as usual.
    assert sorted((f.job.name, f.scheduled_at, f.caught_up) for f in due) == [
        ("fast", T0 + timedelta(seconds=3590), True),
        ("fast", T0 + timedelta(seconds=3600), False),
        ("slow", T0 + timedelta(seconds=3540), True),
        ("slow", T0 + timedelta(seconds=3600), False),
    ]
    skipped = {m.job: (m.skipped, m.first_missed, m.last_missed) for m in planner.take_misfires()}
    assert skipped == {
        "fast": (358, T0 + timedelta(seconds=10), T0 + timedelta(seconds=3590)),
        "slow": (58, T0 + timedelta(minutes=1), T0 + timedelta(seconds=3540)),
    }
    assert planner.take_misfires() == []
    assert planner.next_wakeup() == T0 + timedelta(hours=1, seconds=10)


def test_a_live_scheduler_far_behind_sends_what_has_not_expired_and_settles_the_rest() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    planner.started_at = T0
    now = T0 + timedelta(minutes=10)  # stalled ten minutes (the store was out); expiry is 5
    due = [(f.scheduled_at - T0).total_seconds() for f in planner.pop_due(now) if f.job.name == "fast"]
    assert due == [300.0, *range(310, 601, 10)]  # the latest expired one once, then every other
    [fast] = [m for m in planner.take_misfires() if m.job == "fast"]
    assert (fast.skipped, fast.fire) == (29, (T0 + timedelta(seconds=300),))


def test_changing_or_removing_a_job_replans_it() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    changed = JOBS.replace('"*/10 * * * * *"', '"*/15 * * * * *"')
    planner.sync(parse_jobs(changed), T0 + timedelta(seconds=1))
    fired = _drain(planner, T0 + timedelta(seconds=31))
    assert [t for name, t in fired if name == "fast"] == [
        T0 + timedelta(seconds=15),
        T0 + timedelta(seconds=30),
    ]
    planner.sync([j for j in parse_jobs(JOBS) if j.name != "fast"], T0 + timedelta(seconds=32))
    assert all(name != "fast" for name, _ in _drain(planner, T0 + timedelta(minutes=1)))


def test_removing_and_re_adding_a_job_does_not_double_its_fires() -> None:
    planner = Planner()
    jobs = parse_jobs(JOBS)
    planner.sync(jobs, T0)
    planner.sync([], T0)
    planner.sync(jobs, T0)
    fired = _drain(planner, T0 + timedelta(seconds=30))
    fast = [t for name, t in fired if name == "fast"]
    assert fast == sorted(set(fast))


def test_editing_a_job_as_it_falls_due_does_not_drop_the_fire() -> None:
    planner = Planner()
    planner.sync(parse_jobs(JOBS), T0)
    edited = JOBS.replace(
        'schedule = "* * * * *"\naction', 'schedule = "* * * * *"\ndescription = "edited"\naction', 1
    )
    planner.sync(parse_jobs(edited), T0 + timedelta(minutes=1, milliseconds=200))
    due = planner.pop_due(T0 + timedelta(minutes=1, milliseconds=300))
    assert (T0 + timedelta(minutes=1)) in [f.scheduled_at for f in due if f.job.name == "slow"]
    assert [f.job.description for f in due if f.job.name == "slow"] == ["edited"]


def test_jobs_planned_by_name_are_parsed_only_when_they_fall_due() -> None:
    jobs = {job.name: job for job in parse_jobs(JOBS)}
    planner = Planner()
    planner.plan("fast", T0 + timedelta(seconds=10), 1)
    planner.plan("slow", T0 + timedelta(minutes=1), 1)
    assert len(planner) == 2 and planner.specs_held == 0
    assert planner.next_wakeup() == T0 + timedelta(seconds=10)
    assert planner.wanted_specs(T0 + timedelta(seconds=5)) == []
    # Due but not parsed yet: it stays due until its spec is given.
    assert planner.pop_due(T0 + timedelta(seconds=10)) == []
    assert planner.wanted_specs(T0 + timedelta(seconds=10)) == ["fast"]
    planner.learn([jobs["fast"]], T0 + timedelta(seconds=10), ["fast"])
    due = planner.pop_due(T0 + timedelta(seconds=10))
    assert [(f.job.name, f.scheduled_at, f.plan, f.next_at) for f in due] == [
        ("fast", T0 + timedelta(seconds=10), 1, T0 + timedelta(seconds=20))
    ]
    assert planner.specs_held == 1  # fires again soon: kept


def test_a_job_planned_by_name_without_an_instant_is_planned_from_its_spec() -> None:
    jobs = {job.name: job for job in parse_jobs(JOBS)}
    planner = Planner()
    planner.plan("slow", None, 3)
    assert planner.next_wakeup() is None
    assert planner.wanted_specs(T0) == ["slow"]
    planner.learn([jobs["slow"]], T0, ["slow"])
    assert planner.next_wakeup() == T0 + timedelta(minutes=1)


def test_a_new_version_replaces_the_plan_and_unreadable_or_unrunnable_jobs_are_dropped() -> None:
    jobs = {job.name: job for job in parse_jobs(JOBS)}
    planner = Planner()
    planner.plan("fast", T0 + timedelta(seconds=10), 1)
    planner.plan("fast", T0 + timedelta(seconds=30), 2)
    assert planner.next_wakeup() == T0 + timedelta(seconds=30)
    planner.plan("paused", T0 + timedelta(seconds=1), 1)
    planner.plan("gone", T0 + timedelta(seconds=1), 1)
    asked = planner.wanted_specs(T0 + timedelta(seconds=1))
    assert asked == ["gone", "paused"]
    planner.learn([jobs["paused"]], T0 + timedelta(seconds=1), asked)
    assert len(planner) == 1
    assert planner.pop_due(T0 + timedelta(seconds=1)) == []
    planner.drop("fast")
    assert len(planner) == 0 and planner.next_wakeup() is None


def test_a_job_that_fires_rarely_is_not_kept_parsed() -> None:
    jobs = {job.name: job for job in parse_jobs(JOBS)}
    planner = Planner()
    planner.plan("slow", T0 + timedelta(minutes=1), 1)
    planner.learn([jobs["slow"]], T0 + timedelta(minutes=1), planner.wanted_specs(T0 + timedelta(minutes=1)))
    hourly = jobs["slow"].model_copy(update={"schedule": "0 * * * *"})
    planner.plan("slow", T0 + timedelta(hours=1), 2)
    planner.learn([hourly], T0 + timedelta(hours=1), planner.wanted_specs(T0 + timedelta(hours=1)))
    assert [f.next_at for f in planner.pop_due(T0 + timedelta(hours=1))] == [T0 + timedelta(hours=2)]
    assert planner.specs_held == 0


SCHEDULES: list[dict[str, str]] = [
    {"schedule": "*/7 * * * * *"},
    {"schedule": "*/10 * * * * *"},
    {"schedule": "30 * * * * *"},
    {"schedule": "* * * * *"},
    {"schedule": "*/2 * * * *"},
    {"schedule": "15,45 * * * * *"},
    {"every": "7s"},
    {"every": "20s", "jitter": "15s"},
    {"schedule": "* * * * *", "jitter": "30s", "misfire": "all"},
    {"every": "3s", "misfire": "skip"},
]


@settings(max_examples=60, deadline=None)
@given(
    chosen=st.lists(st.sampled_from(SCHEDULES), min_size=1, max_size=6),
    steps=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
)
def test_planning_by_name_fires_exactly_what_planning_by_spec_fires(
    chosen: list[dict[str, str]], steps: list[int]
) -> None:
    action = {"type": "shell", "argv": ["true"]}
    specs = [
        JobSpec.model_validate({"name": f"j{i}", **fields, "action": action})
        for i, fields in enumerate(chosen)
    ]
    by_spec, by_name = Planner(), Planner()
    by_spec.sync(specs, T0)
    for version, spec in enumerate(specs):
        by_name.plan(spec.name, spec.next_fire(T0), version)
    known = {spec.name: spec for spec in specs}
    now, fired_by_spec, fired_by_name = T0, [], []
    for step in steps:  # ticks at irregular intervals, as a loaded event loop gives them
        now += timedelta(seconds=step)
        due = by_spec.pop_due(now)
        # Never before it is due to go out (a backlog caught up after downtime goes at once).
        assert all(f.caught_up or f.job.publish_at(f.scheduled_at) <= now for f in due)
        fired_by_spec += sorted((f.job.name, f.scheduled_at, f.caught_up) for f in due)
        wanted = by_name.wanted_specs(now)
        by_name.learn([known[name] for name in wanted], now, wanted)
        fired_by_name += sorted((f.job.name, f.scheduled_at, f.caught_up) for f in by_name.pop_due(now))
        # Planned by name, a jittered job wakes at its instant and learns its offset then.
        spec_wakeup, name_wakeup = by_spec.next_wakeup(), by_name.next_wakeup()
        assert spec_wakeup is not None and name_wakeup is not None and name_wakeup <= spec_wakeup
    assert fired_by_name == fired_by_spec
    assert len({(name, at) for name, at, _ in fired_by_spec}) == len(fired_by_spec)  # each once


def test_a_jittered_fire_waits_for_its_offset_and_keeps_its_instant() -> None:
    spec = JobSpec.model_validate(
        {"name": "spread", "every": "1m", "jitter": "30s", "action": {"type": "shell", "argv": ["true"]}}
    )
    nominal = T0 + timedelta(minutes=1)
    out = spec.publish_at(nominal)
    assert nominal < out < nominal + timedelta(seconds=30)
    planner = Planner()
    planner.sync([spec], T0)
    assert planner.next_wakeup() == out
    assert planner.pop_due(out - timedelta(microseconds=1)) == []
    assert [(f.scheduled_at, f.caught_up) for f in planner.pop_due(out)] == [(nominal, False)]
    # Planned by name (from the store's next fire, the nominal instant): the offset is applied
    # once the spec is read, and the fire waits for it.
    named = Planner()
    named.plan("spread", nominal, 4)
    assert named.next_wakeup() == nominal
    named.learn([spec], nominal, named.wanted_specs(nominal))
    assert named.pop_due(nominal) == []
    assert named.next_wakeup() == out
    assert [f.scheduled_at for f in named.pop_due(out)] == [nominal]
