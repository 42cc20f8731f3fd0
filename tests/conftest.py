"""Fixtures shared by every suite: keys, and for tests that need them a private namespace on the
real broker, a private store (a temp SQLite file, and a PostgreSQL schema when
CRONFLEET_TEST_DATABASE_URL names one) and a fleet of real processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import text

from common.settings import Settings, normalise_database_url
from common.signing import Keyring
from common.store import Store
from common.topology import Topology
from tests.fleet import Fleet, end_leftover_tasks

# One key of each role signs (t1, e1, p1); a second of each verifies too, as after a rotation.
TEST_KEYS = ",".join(
    [
        "trigger:t1:test-trigger-secret-one-0123456789",
        "event:e1:test-event-secret-one-0123456789",
        "ping:p1:test-ping-secret-one-0123456789",
        "trigger:t0:test-trigger-secret-zero-0123456789",
        "event:e0:test-event-secret-zero-0123456789",
        "ping:p0:test-ping-secret-zero-0123456789",
    ]
)


def keyring() -> Keyring:
    """The keyring every test fleet uses."""
    return Keyring.parse(TEST_KEYS)


AMQP_URL = os.environ.get("CRONFLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get("CRONFLEET_TEST_DATABASE_URL", "")
STORES = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that depends on the store runs on every store of STORES: one that uses the ``store``
    fixture or is marked ``both_stores`` (it starts a monitor or scheduler, or runs a command that
    reads or writes the store). Every other test that uses ``settings`` runs on SQLite alone, and
    a test that parametrizes ``settings`` itself keeps its own choice."""
    if "settings" not in metafunc.fixturenames or _parametrizes(metafunc, "settings"):
        return
    if "store" in metafunc.fixturenames or metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("settings", STORES, indirect=True)


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [part.strip() for part in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store migrated to the newest schema once per session: each test's store is a copy
    of it (migrations themselves are tested in tests/integration/test_migrations.py)."""
    path = tmp_path_factory.mktemp("template") / "cronfleet.db"

    async def upgrade() -> None:
        await (await Store.open(f"sqlite+aiosqlite:///{path}", upgrade=True)).close()

    asyncio.run(upgrade())
    return path


# The schema name in ``postgres_template``'s SQL, replaced by each test's own.
_TEMPLATE_SCHEMA = f"t_template_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def postgres_template() -> str | None:
    """The SQL that creates a PostgreSQL schema at the newest revision (tables, indexes, the rows
    the migrations seed), dumped from one schema migrated once per test process: a test's schema
    is this replayed under its own name, not fifteen migrations run again (0.7 s a test). None
    without PostgreSQL or pg_dump: each test then migrates its own schema."""
    if not POSTGRES_URL or shutil.which("pg_dump") is None:
        return None
    database_url = normalise_database_url(POSTGRES_URL)

    async def upgrade() -> None:
        await (await Store.open(database_url, _TEMPLATE_SCHEMA, upgrade=True)).close()

    async def drop() -> None:
        connection = await asyncpg.connect(_libpq_url(POSTGRES_URL))
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{_TEMPLATE_SCHEMA}" CASCADE')
        finally:
            await connection.close()

    asyncio.run(upgrade())
    try:
        dumped = subprocess.run(
            [
                *("pg_dump", "--schema", _TEMPLATE_SCHEMA, "--inserts", "--no-owner", "--no-privileges"),
                *("--dbname", _libpq_url(POSTGRES_URL)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        asyncio.run(drop())
    if dumped.returncode != 0:
        return None
    # psql's meta-commands (the \restrict guard of newer pg_dumps) are not SQL.
    return "\n".join(line for line in dumped.stdout.splitlines() if not line.startswith("\\"))


def _libpq_url(url: str) -> str:
    """``url`` as libpq (pg_dump, asyncpg) reads it: no SQLAlchemy driver in its scheme."""
    return "postgresql://" + url.split("://", 1)[1]


async def _create_schema(database_url: str, schema: str, template: str | None) -> None:
    """``schema`` at the newest revision: ``template`` replayed under its name, or migrated."""
    if template is None:
        await (await Store.open(database_url, schema, upgrade=True)).close()
        return
    connection = await asyncpg.connect(_libpq_url(POSTGRES_URL))
    try:
        await connection.execute(template.replace(_TEMPLATE_SCHEMA, schema))
    finally:
        await connection.close()


@pytest.fixture
async def settings(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path, postgres_template: str | None
) -> AsyncIterator[Settings]:
    """Settings of a private fleet: its own namespace on the broker and its own store (SQLite,
    unless pytest_generate_tests chose another)."""
    suffix = uuid.uuid4().hex[:10]
    namespace = f"test-{suffix}"
    schema = None
    if getattr(request, "param", "sqlite") == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'cronfleet.db'}"
    else:
        database_url = normalise_database_url(POSTGRES_URL)
        schema = f"t_{suffix}"
    value = Settings(
        amqp_url=AMQP_URL,
        database_url=database_url,
        database_schema=schema,
        keys=TEST_KEYS,
        namespace=namespace,
        heartbeat_seconds=0.5,
        jobs_reload_seconds=0.3,
        drain_seconds=5,
        claim_lease_seconds=3,
        allow_commands="*",
    )
    # Every process of the fleet refuses a store that is not at the newest schema.
    if schema is None:
        shutil.copyfile(sqlite_template, tmp_path / "cronfleet.db")
    else:
        await _create_schema(database_url, schema, postgres_template)
    yield value
    await _delete_namespace(namespace)
    if schema is not None:
        store = await Store.connect(database_url)
        async with store.engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()


async def _delete_namespace(namespace: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await Topology(namespace).delete(channel, pools=["default", "other"])


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """The test fleet's store, open."""
    opened = await Store.open(settings.database_url, settings.database_schema)
    yield opened
    await opened.close()


@pytest.fixture(autouse=True)
async def _tasks_end_with_their_test() -> AsyncIterator[None]:
    """Once every other fixture of the test has ended, no task of its loop is left running:
    each is cancelled, and one that does not end soon after fails the test with its stack
    (``end_leftover_tasks``)."""
    yield
    await end_leftover_tasks()


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    """A plain connection to the shared broker, for publishing and inspecting by hand."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


Start = Callable[..., Awaitable[None]]


@pytest.fixture
async def fleet(settings: Settings) -> AsyncIterator[Start]:
    """``await fleet("monitor", "worker", ...)`` starts real processes as tasks and waits until
    each is consuming. They are cancelled and awaited when the test ends."""
    running = Fleet(settings)
    yield running.start
    await running.stop()


Counts = Callable[[str], None]


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> Counts:
    """``counts(line)``: a figure of this run (fuzz, chaos), printed again in the closing summary
    so that it shows in CI's log whether the test passed or not (also under pytest-xdist: the
    lines travel in the test's report)."""

    def say(line: str) -> None:
        print(line)
        request.node.user_properties.append(("counts", line.rstrip()))

    return say


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the ``counts`` lines of each finished test for the closing summary."""
    if report.when != "call":
        return
    lines = [str(value) for name, value in report.user_properties if name == "counts"]
    if lines:
        _REPORTED.setdefault(report.nodeid.split("::")[-1], []).extend(lines)


_REPORTED: dict[str, list[str]] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every figure the tests reported with ``counts``."""
    if _REPORTED:
        terminalreporter.section("counts")
        for test, lines in _REPORTED.items():
            terminalreporter.write_line(test)
            for line in lines:
                terminalreporter.write_line(f"  {line}")
