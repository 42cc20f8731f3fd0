"""Fuzzing ``cronfleet apply`` (issue 12): nothing a jobs file says can stop the fleet.

Hypothesis writes jobs files with valid, boundary and invalid values for every field (extreme
numbers, inf and nan, integers beyond 64 bits, wrong types, NUL and non-UTF-8 bytes, huge strings,
deep nesting, broken TOML). Each file goes through the real apply path, in process, against the
real store: it is either applied, or refused as one line ``FILE:LINE[:COL]: reason`` with the store
unchanged; never a traceback. Then no accepted job may crash anything afterwards: each can be read
back, planned, turned into a trigger the worker accepts and judged by the monitor, and a real fleet
(scheduler, worker, monitor) runs a sample of them and stays up.

The run is reproducible (the ``apply-fuzz`` profile is derandomized) and prints what it saw: run
with ``-s`` or ``-rA`` to read the counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from common.bounds import (
    EARLIEST_INSTANT,
    MAX_ARGUMENT_BYTES,
    MAX_EXPIRY_SECONDS,
    MAX_GRACE_SECONDS,
    MAX_MESSAGE_BYTES,
    MAX_TIMEOUT_SECONDS,
)
from common.catalog import apply_jobs, load_jobs
from common.cli import admin
from common.clock import utcnow
from common.errors import JobFileError
from common.jobs import JobSpec, load_jobs_file, spec_from_json
from common.messages import TRIGGER_ADAPTER, RunStatus
from common.settings import Settings
from common.store import JobRow, RunRow, Store
from monitor.health import RunFinishedInput, RunStartedInput, Tick, advance, initial_record
from tests.conftest import Counts
from tests.fleet import Fleet, eventually
from tests.integration.helpers import runs_of

settings.register_profile(
    "apply-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FUZZ = settings.get_profile("apply-fuzz")
# Some strategies hold long strings (a 70 kB header value): their repr is long, and that is fine.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FILES = 700  # examples asked of hypothesis; at least 500 distinct files must come out

# -- writing TOML -------------------------------------------------------------------------------


_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", 0x7F: "\\u007f"} | {c: f"\\u{c:04x}" for c in range(0x20)}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (control characters, NUL included, as escapes)."""
    return '"' + text.translate(_ESCAPES) + '"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_float(value: float) -> str:
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def inline_table(items: list[tuple[str, str]]) -> str:
    return "{ " + ", ".join(f"{toml_key(k)} = {v}" for k, v in items) + " }"


def array(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


# -- values: valid, at the bounds, and wrong -----------------------------------------------------
# Each field has a strategy of good values (bounds included) and one of bad ones. A file is all
# good, good but for one field, or wild (any value anywhere), so that both outcomes are common.

good_texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=24)
big = st.sampled_from([MAX_ARGUMENT_BYTES - 1, MAX_ARGUMENT_BYTES, MAX_ARGUMENT_BYTES + 1, 5000, 2**20])
good_strings = st.one_of(
    good_texts.map(toml_string),
    st.sampled_from(["", "\x01\x1b[2J", "\u2028", "é", "\U0001f600", "a\nb", "a=b", "%n%s"]).map(toml_string),
    st.just("'literal'"),
    st.just('"""multi\nline"""'),
)
bad_strings = st.one_of(
    st.sampled_from(["\x00", "a\x00b"]).map(toml_string),
    big.map(lambda n: toml_string("x" * n)),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8).map(
        lambda s: toml_string(s + "\x00")
    ),
)
WRONG_TYPES = [
    '"300"',
    '"yes"',
    "true",
    "false",
    "[1]",
    "[]",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "07:32:00",
]
wrong_types = st.sampled_from(WRONG_TYPES)
BAD_NUMBERS = [
    "0",
    "-0.0",
    "5e-324",
    "-1",
    str(MAX_TIMEOUT_SECONDS + 1),
    f"{MAX_TIMEOUT_SECONDS}.000001",
    str(MAX_EXPIRY_SECONDS + 1),
    "1e12",
    "1e400",
    "inf",
    "-inf",
    "nan",
    "+nan",
    str(2**63 - 1),
    str(2**63),
    str(-(2**63) - 1),
    str(2**64),
    "1" + "0" * 30,
    "1" + "0" * 5000,
    "0x7fffffffffffffff",
    "0xffffffffffffffffffff",
]
bad_numbers = st.one_of(
    st.sampled_from(BAD_NUMBERS),
    st.floats().map(toml_float),
    st.integers(-(2**70), 2**70).map(str),
    wrong_types,
    bad_strings,
)


def good_durations(most: int, least: float = 1e-9) -> st.SearchStrategy[str]:
    """Durations in [least, most], the bounds and TOML's spellings of them included."""
    return st.one_of(
        st.sampled_from([str(most), f"{most}.0", "1", "300", "1_000", "1e-9", "0.5", f"{least}"]),
        st.floats(min_value=least, max_value=most).map(toml_float),
        st.integers(max(1, int(least)), most).map(str),
    )


good_codes = st.one_of(st.integers(-255, 255).map(str), st.sampled_from(["0", "255", "-255"]))
bad_codes = st.sampled_from(["256", "-256", str(2**64), "1.0", '"0"', "true"])
good_statuses = st.one_of(st.integers(100, 599).map(str), st.sampled_from(["100", "599"]))
bad_statuses = st.sampled_from(["99", "600", "0", str(2**64), "200.0", '"200"'])

SCHEDULES = ["* * * * *", "*/10 * * * * *", "@daily", "@hourly", "0 0 L * *", "0 0 * * 1#2", "0 0 15W * *"]
SCHEDULES += ["30 2 * * *", "0 0 29 2 *", "0 0 * MAR,APR THU", "0 0 ? * MON", "0 12 * * L5", " 0  0 * * * "]
BAD_SCHEDULES = ["R * * * *", "0 R(0-5) * * *", "H * * * *", "", "61 * * * *", "0 0 30 2 *", "x" * 2000]
BAD_SCHEDULES += ["* * * * * * *", "@reboot", "0 0 LW * *", "\x00", "٣ * * * *", "0 0 * * 1\u00a0"]
INTERVALS = ["1s", "45s", "15m", "2h", "1d", "366d", "2w"]
BAD_INTERVALS = ["0s", "367d", "1.5s", "45", "every 5s", "-1m", ""]
JITTERS = ["1s", "30s", "24h"]
BAD_JITTERS = ["0s", "25h", "2d", "x"]
CATCHUPS = ["1m", "1h", "7d"]
BAD_CATCHUPS = ["8d", "0m", "1 hour"]
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
]
BAD_ZONES = [
    "America",
    "a" * 5000,
    "../../etc/passwd",
    "Mars/Base",
    "UTC\x00",
    "",
    "zone.tab",
    "Europe/Paris ",
]
# Accepted pools must be ones the test fixtures clean up on the shared broker.
BAD_POOLS = ["", "a b", "x" * 65, "bad/pool", "ünï"]
PROGRAMS = ["true", "echo", "/bin/true", "./no-such-program", "printf"]
ENV_NAMES = ["A", "B_1", "_under", "LANG"]
BAD_ENV_NAMES = ["A=B", "", "1A", "é", "a b"]
URLS = ["http://127.0.0.1:9/", "https://127.0.0.1:1/x?y=z", "http://[::1]:9/", "http://127.0.0.1:9/%20é"]
# Lax URL parsing keeps "a|b" as it is, and the worker's strict parsing of the trigger refuses it.
BAD_URLS = ["ftp://127.0.0.1/", "not a url", "", "http://127.0.0.1:99999/", "http://127.0.0.1:9/a b"]
BAD_URLS += ["http://127.0.0.1:9/a|b", "http://127.0.0.1:9/" + "a" * 3000]
HEADER_NAMES = ["X-A", "Accept", "x_b", "!#$%&'*+-.^_`|~"]
BAD_HEADER_NAMES = ["X A", "", "Content-Length", "transfer-encoding", "é", "X\x00", "a:b"]
HEADER_VALUES = ["v", "a\tb", "", "text/plain; q=0.5", "x" * 1000]
BAD_HEADER_VALUES = [" padded ", "a\r\nb", "é", "\x00", "\x01", "x" * 70_000]


def one_of_strings(values: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(values).map(toml_string)


Pair = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]


def action_fields() -> dict[str, Pair]:
    """Each action field's (good, bad) strategies."""

    def arg_list(items: st.SearchStrategy[str], bad_program: bool) -> st.SearchStrategy[str]:
        programs = one_of_strings(PROGRAMS)
        if bad_program:
            programs = st.one_of(programs, bad_strings, wrong_types)
        return st.tuples(programs, st.lists(items, max_size=4)).map(lambda p: array([p[0], *p[1]]))

    def table(names: list[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.lists(st.tuples(st.sampled_from(names), values), max_size=3, unique_by=lambda i: i[0]).map(
            inline_table
        )

    return {
        "argv": (
            arg_list(good_strings, False),
            st.one_of(
                arg_list(st.one_of(good_strings, bad_strings, wrong_types), True), st.just("[]"), wrong_types
            ),
        ),
        "cwd": (one_of_strings(["/tmp", "/nonexistent", "."]), one_of_strings(["", "/tmp\x00", "x" * 5000])),
        "env": (
            table(ENV_NAMES, good_strings),
            table(BAD_ENV_NAMES, good_strings) | table(ENV_NAMES, bad_strings),
        ),
        "success_exit_codes": (
            st.lists(good_codes, min_size=1, max_size=4).map(array),
            st.one_of(st.lists(bad_codes, min_size=1, max_size=2).map(array), st.just("[]"), wrong_types),
        ),
        "url": (one_of_strings(URLS), st.one_of(one_of_strings(BAD_URLS), wrong_types)),
        "method": (
            st.sampled_from(['"GET"', '"POST"', '"DELETE"']),
            st.sampled_from(['"get"', '"TRACE"', "1"]),
        ),
        "headers": (
            table(HEADER_NAMES, one_of_strings(HEADER_VALUES)),
            table(BAD_HEADER_NAMES, one_of_strings(HEADER_VALUES))
            | table(HEADER_NAMES, st.one_of(one_of_strings(BAD_HEADER_VALUES), wrong_types)),
        ),
        "body": (good_strings, st.one_of(bad_strings, wrong_types)),
        "expect_status": (
            st.lists(good_statuses, min_size=1, max_size=3).map(array),
            st.one_of(st.lists(bad_statuses, min_size=1, max_size=2).map(array), st.just("[]"), wrong_types),
        ),
    }


ACTION_FIELDS = action_fields()
JOB_FIELDS: dict[str, Pair] = {
    "schedule": (one_of_strings(SCHEDULES), st.one_of(one_of_strings(BAD_SCHEDULES), wrong_types)),
    "every": (one_of_strings(INTERVALS), st.one_of(one_of_strings(BAD_INTERVALS), wrong_types)),
    "jitter": (one_of_strings(JITTERS), st.one_of(one_of_strings(BAD_JITTERS), wrong_types)),
    "misfire": (one_of_strings(["skip", "once", "all"]), one_of_strings(["never", "ALL", ""])),
    "catchup": (one_of_strings(CATCHUPS), st.one_of(one_of_strings(BAD_CATCHUPS), wrong_types)),
    "timezone": (one_of_strings(ZONES), st.one_of(one_of_strings(BAD_ZONES), wrong_types)),
    "pool": (one_of_strings(["default", "other"]), one_of_strings(BAD_POOLS)),
    "timeout_seconds": (good_durations(MAX_TIMEOUT_SECONDS), bad_numbers),
    "expires_after_seconds": (good_durations(MAX_EXPIRY_SECONDS), bad_numbers),
    "grace_seconds": (good_durations(MAX_GRACE_SECONDS, least=0), bad_numbers),
    "enabled": (st.sampled_from(["true", "false"]), st.sampled_from(['"yes"', "1", "0", '"true"'])),
    "description": (good_strings, st.one_of(bad_strings, st.just(toml_string("d" * 4097)), wrong_types)),
}
OPTIONAL = ["timezone", "pool", "timeout_seconds", "expires_after_seconds", "grace_seconds", "enabled"]
OPTIONAL += ["description", "jitter", "misfire", "catchup"]
SHELL_FIELDS = ["cwd", "env", "success_exit_codes"]
HTTP_FIELDS = ["method", "headers", "body", "expect_status"]
good_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,12}", fullmatch=True)
bad_names = st.sampled_from(["bad name", "", "x" * 65, "abc\n", "-lead", "é"])


@st.composite
def job(draw: st.DrawFn, mode: str) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]] | None]:
    """A job's name, its fields and its action's fields (None: no action), as TOML text.

    ``mode`` is "good" (every value good), "one-bad" (one value bad) or "wild" (any value)."""

    def value(pair: Pair, bad: bool) -> str:
        good_values, bad_values = pair
        if mode == "wild":
            return str(draw(st.one_of(good_values, bad_values)))
        return str(draw(bad_values if bad else good_values))

    kind = draw(st.sampled_from(["shell"] * 4 + ["http"] * 3 + ["none"] * 2 + ["odd"]))
    when = draw(st.sampled_from(["schedule"] * 3 + ["every"]))
    chosen = [when, *draw(st.lists(st.sampled_from(OPTIONAL), unique=True, max_size=4))]
    extra = {"shell": ["argv"], "http": ["url"]}.get(kind, [])
    extra += draw(st.lists(st.sampled_from(SHELL_FIELDS if kind == "shell" else HTTP_FIELDS), unique=True))
    broken = draw(st.sampled_from([*chosen, *extra, "name", "unknown"])) if mode == "one-bad" else None
    wild_name = mode == "wild" and draw(st.integers(0, 3)) == 0
    name = draw(bad_names if broken == "name" or wild_name else good_names)
    fields = [(f, value(JOB_FIELDS[f], f == broken)) for f in chosen]
    if broken == "unknown":
        fields.append(draw(st.sampled_from([("timout_seconds", "5"), ("name", '"x"'), ("retries", "3")])))
    if kind == "none":
        return name, fields, None
    if kind == "odd":
        return name, fields, [("type", draw(st.sampled_from(['"ftp"', "1", '""'])))]
    action = [("type", f'"{kind}"')] + [(f, value(ACTION_FIELDS[f], f == broken)) for f in extra]
    return name, fields, action


@st.composite
def jobs_files(draw: st.DrawFn) -> bytes:
    """A jobs file: a few jobs written in the table styles TOML allows, then perhaps damaged."""
    mode = draw(st.sampled_from(["good", "good", "good", "one-bad", "one-bad", "wild"]))
    lines: list[str] = []
    if draw(st.booleans()):
        lines.append("# cronfleet jobs")
    jobs = draw(st.lists(job(mode), max_size=4, unique_by=lambda j: j[0]))
    for name, fields, action in jobs:
        lines.append(f"[jobs.{toml_key(name)}]")
        lines.extend(f"{toml_key(k)} = {v}" for k, v in fields)
        if action is not None and draw(st.booleans()):
            lines.append(f"[jobs.{toml_key(name)}.action]")
            lines.extend(f"{toml_key(k)} = {v}" for k, v in action)
        elif action is not None:
            lines.append(f"action = {inline_table(action)}")
    data = ("\n".join(lines) + "\n").encode()
    damage = draw(st.sampled_from(["none"] * 12 + ["bytes", "truncate", "deep", "garbage", "top-level"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b"\xed\xa0\x80", b"\r"])) + data[at:]
        )
    elif damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "deep":
        depth = draw(st.sampled_from([10, 100, 400, 1000, 5000]))
        opening, closing = draw(st.sampled_from([("[", "]"), ("{ a = ", " }"), ("[{ a = ", " }]")]))
        data += (
            f"[jobs.deep]\nschedule = '@daily'\ndescription = {opening * depth}1{closing * depth}\n".encode()
        )
    elif damage == "garbage":
        data += draw(st.sampled_from([b"[jobs.x\n", b"= 1\n", b"a = \n", b'a = "unclosed\n', b"[[jobs]]\n"]))
    elif damage == "top-level":
        data = draw(st.sampled_from([b"job = 1\n", b"jobs = 1\n", b"[jobs]\n", b"jobs = []\n"])) + data
    return data


@functools.cache
def corpus() -> list[tuple[bytes, str]]:
    """FILES generated files (distinct), each with the apply option to use, reproducibly: drawn
    once per test process, for both stores' runs."""
    found: dict[bytes, str] = {}

    @settings(FUZZ, max_examples=FILES)
    @given(jobs_files(), st.sampled_from(["", "", "", "", "--allow-empty", "--keep", "--dry-run"]))
    def collect(data: bytes, option: str) -> None:
        found.setdefault(data, option)

    collect()
    return list(found.items())


# -- what must hold of every outcome -------------------------------------------------------------

ONE_LINE = re.compile(r"(?P<file>[^\n]+?):(?P<line>\d+)(?::(?P<column>\d+))?: (?P<reason>[^\n\r]+)")
FIELD = re.compile(r"job '[^\n]*', field (?P<field>[^\n]+?): \S")
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
# Instants to plan from: the epoch, a DST night, now, a century without 29 February, far ahead.
INSTANTS = [
    EARLIEST_INSTANT,
    datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC),
    NOW,
    datetime(2100, 2, 28, 23, 59, 59, tzinfo=UTC),
    datetime(2130, 1, 1, tzinfo=UTC),
]


def reason_of(message: str, path: Path) -> str:
    """Check ``message`` is one line of the promised form; return a short reason to count it by."""
    found = ONE_LINE.fullmatch(message)
    assert found is not None and found.group("file") == str(path), message
    reason = found.group("reason")
    if found.group("column"):
        assert reason.startswith(("not valid TOML: ", "not UTF-8 text")), message
        return reason.split(":")[0]
    if reason.startswith("job '"):
        field = FIELD.match(reason)
        assert field is not None, message
        return "field " + ".".join(p for p in field.group("field").split(".")[:2] if not p.isdigit())
    return re.sub(r"\d+|'.*'", "N", reason)[:60]


async def snapshot(store: Store) -> list[tuple[Any, ...]]:
    async with store.session() as session:
        rows = (await session.execute(select(JobRow).order_by(JobRow.name))).scalars()
        return [(r.name, r.spec, r.fingerprint, r.pool, r.enabled, r.updated_at) for r in rows]


def survives(spec: JobSpec) -> None:
    """Every process can read ``spec`` back, plan it, trigger it and judge it."""
    stored = spec.canonical_json()
    assert spec_from_json(stored) == spec
    for after in INSTANTS:
        fire = spec.next_fire(after)
        assert fire > after
        assert fire <= spec.publish_at(fire) <= fire + timedelta(seconds=spec.jitter_seconds())
        if spec.action is not None:
            trigger = spec.trigger_at(fire, fire + timedelta(seconds=1))
            body = trigger.to_bytes()
            assert len(body) <= MAX_MESSAGE_BYTES
            assert TRIGGER_ADAPTER.validate_json(body, strict=True) == trigger
        # The monitor's health machine follows it: due, late, a run that sticks, fails, then down.
        record = initial_record(spec, after)
        later = fire + timedelta(days=400)
        for event, now in (
            (Tick(), fire),
            (RunStartedInput("r1", fire), fire),
            (Tick(), later),
            (RunFinishedInput("r1", RunStatus.FAILED, later, fire), later),
            (Tick(), later + timedelta(days=400)),
        ):
            record, _flips = advance(record, event, spec, now)


async def apply_file(settings: Settings, path: Path, option: str) -> JobFileError | None:
    """``cronfleet apply [OPTION] PATH`` in process: None when applied, else its refusal."""
    args = argparse.Namespace(
        file=path,
        dry_run=option == "--dry-run",
        keep=option == "--keep",
        prune=False,
        allow_empty=option == "--allow-empty",
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            await admin.apply(settings, args)
    except JobFileError as refusal:
        return refusal
    return None


# -- the fuzzer ----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(jobs_files())
def test_parsing_any_file_gives_jobs_that_survive_or_one_line(data: bytes) -> None:
    """The pure half, with hypothesis's shrinking: a failure here comes out as a minimal file."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "jobs.toml"
        path.write_bytes(data)
        try:
            specs = load_jobs_file(path)
        except JobFileError as refusal:
            reason_of(str(refusal), path)
            return
    for spec in specs:
        survives(spec)


async def test_every_jobs_file_is_applied_or_refused_in_one_line_and_none_can_stop_the_fleet(
    settings: Settings, store: Store, tmp_path: Path, counts: Counts
) -> None:
    files = corpus()
    assert len(files) >= 500, f"only {len(files)} distinct files were generated"
    outcomes: collections.Counter[str] = collections.Counter()
    accepted: list[JobSpec] = []
    for number, (data, option) in enumerate(files):
        path = tmp_path / f"jobs-{number}.toml"
        path.write_bytes(data)
        before = await snapshot(store)
        refusal = await apply_file(settings, path, option)
        after = await snapshot(store)
        if refusal is not None:
            outcomes["refused: " + reason_of(str(refusal), path)] += 1
            assert after == before, f"a refused file changed the store: {data[:300]!r}"
            continue
        specs = load_jobs_file(path)
        outcomes[f"applied{' ' + option if option else ''}"] += 1
        if option == "--dry-run":
            assert after == before
        elif option != "--keep":
            fingerprints = {row[0]: row[2] for row in after}
            assert fingerprints == {s.name: s.fingerprint() for s in specs}
        assert {s.name for s in await load_jobs(store)} >= (
            {s.name for s in specs} if option != "--dry-run" else set()
        )
        for spec in specs:
            survives(spec)
            accepted.append(spec)

    counts(f"apply fuzz: {len(files)} files, {len(accepted)} jobs accepted")
    for outcome, count in sorted(outcomes.items(), key=lambda item: (-item[1], item[0])):
        counts(f"  {count:5d}  {outcome}")
    assert sum(n for o, n in outcomes.items() if o.startswith("applied")) >= 50, outcomes
    assert sum(n for o, n in outcomes.items() if o.startswith("refused")) >= 50, outcomes

    await a_fleet_runs_them_and_stays_up(settings, store, accepted, counts)


async def a_fleet_runs_them_and_stays_up(
    settings: Settings, store: Store, accepted: list[JobSpec], counts: Counts
) -> None:
    """Apply a sample of the accepted jobs (renamed apart) and run a real fleet on them.

    Most fuzzed schedules would not fire within the run, so copies of the first jobs with an
    action fire every second (same action, durations and zone, in the pool the worker consumes).
    """
    sample: dict[str, JobSpec] = {}
    for number, spec in enumerate(accepted[:300]):
        name = f"f{number}-{spec.name}"[:64]
        sample[name] = JobSpec.model_validate({**spec.model_dump(), "name": name})
    eager = [spec for spec in accepted if spec.action is not None][:20]
    assert eager, "no accepted job has an action"
    for number, spec in enumerate(eager):
        name = f"e{number}-{spec.name}"[:64]
        changes = {"name": name, "schedule": "* * * * * *", "every": None, "jitter": None}
        changes |= {"pool": "default", "enabled": True}
        sample[name] = JobSpec.model_validate({**spec.model_dump(), **changes})
    canary = JobSpec.model_validate(
        {"name": "canary", "schedule": "* * * * * *", "action": {"type": "shell", "argv": ["true"]}}
    )
    await apply_jobs(store, [*sample.values(), canary], utcnow())
    running = Fleet(settings)
    try:
        await running.start("monitor", "worker", "scheduler")
        await eventually(lambda: jobs_that_ran(store, max(1, len(eager) // 2)), timeout=40)
        await eventually(lambda: finished_runs(store, "canary", 3), timeout=30)
        dead = [task for task in running.tasks if task.done()]
        assert not dead, [task.exception() for task in dead]
        # Reloading, while running, without them and with them again must not stop anything either.
        await apply_jobs(store, [canary], utcnow())
        await eventually(lambda: finished_runs(store, "canary", 5), timeout=30)
        await apply_jobs(store, [*sample.values(), canary], utcnow())
        await eventually(lambda: finished_runs(store, "canary", 7), timeout=30)
        dead = [task for task in running.tasks if task.done()]
        assert not dead, [task.exception() for task in dead]
        ran = await jobs_that_ran(store, 0)
    finally:
        await running.stop()
    counts(f"fleet: scheduler, worker and monitor stayed up on {len(sample)} fuzzed jobs ({ran} of them ran)")


async def jobs_that_ran(store: Store, at_least: int) -> int:
    """How many jobs other than the canary have a recorded run, when at least ``at_least``."""
    query = select(func.count(func.distinct(RunRow.job))).where(RunRow.job != "canary")
    async with store.session() as session:
        ran = await session.scalar(query) or 0
    return ran if ran >= at_least else 0


async def finished_runs(store: Store, job: str, count: int) -> bool:
    return len(await runs_of(store, job, status=RunStatus.SUCCEEDED.value)) >= count
