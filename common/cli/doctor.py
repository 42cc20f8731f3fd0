"""``cronfleet doctor``: check the keys, the store and the broker, and say what is wrong plainly.

``--quick`` is the container health check: it only asks whether the keys parse (and, with
``--role``, fit that process), the store answers at this code's schema and the broker accepts a
connection, each within ``--timeout``; it reads no job and inspects no queue.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
from sqlalchemy import func, select

from common.catalog import read_jobs
from common.clock import utcnow
from common.connection import CONNECT_ERRORS, connect, open_channel, redact
from common.errors import BrokerUnavailable, ConfigError, CronfleetError
from common.settings import Settings, amqp_urls
from common.signing import Keyring, Role
from common.store import FireRow, Store
from common.topology import Topology

Check = Callable[[], Awaitable[str]]

# What each process's keys must do (see each service's start): the roles it signs, and the
# roles it must be able to verify. A process missing one of them stops at start, or (worker,
# monitor) refuses every message it receives.
ROLE_KEYS: dict[str, tuple[tuple[Role, ...], tuple[Role, ...]]] = {
    "scheduler": ((Role.TRIGGER, Role.EVENT), ()),
    "worker": ((Role.EVENT,), (Role.TRIGGER,)),
    "monitor": ((), (Role.EVENT,)),
    "run": ((Role.TRIGGER, Role.EVENT), (Role.TRIGGER, Role.EVENT)),
}
DEFAULT_TIMEOUT = 10.0


def add_parser_options(parser: argparse.ArgumentParser) -> None:
    """``doctor``'s options: ``--quick``, ``--role``, ``--timeout``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only: keys parse, the store answers at this schema, the broker accepts a connection "
        "(a container's health check; reads no job, inspects no queue)",
    )
    parser.add_argument(
        "--role",
        choices=sorted(ROLE_KEYS),
        help="fail unless the keys can do what this process does "
        "(sign its messages, verify what it receives)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"each check fails if it has no answer within this (default: {DEFAULT_TIMEOUT:g})",
    )


async def doctor(settings: Settings, args: argparse.Namespace) -> int:
    """Print one line per check (and a WARN line per thing that works but should not stay so,
    such as a key without a role); exit 1 when any check fails or takes longer than
    ``--timeout``. With ``--quick`` only reachability and the schema are checked (see the
    module's docstring); with ``--role`` the keys must fit that process."""
    pools: set[str] = {"default"}
    warnings: list[str] = []
    quick: bool = getattr(args, "quick", False)
    role: str | None = getattr(args, "role", None)
    timeout: float = getattr(args, "timeout", DEFAULT_TIMEOUT)

    async def keys() -> str:
        keyring = settings.keyring(warn_legacy=False)
        for key in keyring.legacy:
            warnings.append(
                f"keys: {key.id!r} has no role, so it signs and verifies every message, triggers "
                "included: replace it with role keys (`cronfleet keys new --role ROLE`)"
            )
        if role is not None:
            _require_role_keys(keyring, role)
        if quick:
            return f"{len(keyring.keys)} key(s)" + (f", fit for a {role}" if role else "")
        return f"{len(keyring.keys)} key(s)\n    " + "\n    ".join(_role_line(keyring, each) for each in Role)

    async def store_reachable() -> str:
        opened = await Store.open(settings.database_url, settings.database_schema)
        try:
            revision = (await opened.schema_version()).revision
        finally:
            await opened.close()
        return f"{opened.dialect} at {opened.where}, schema {revision} (head)"

    async def broker_reachable() -> str:
        # A plain connection: a robust one cancelled mid-handshake keeps reconnecting behind us.
        # A cluster's nodes (several URLs) are tried in turn: one that answers is enough.
        failures = []
        for url in amqp_urls(settings.amqp_url):
            try:
                connection = await aio_pika.connect(
                    url, client_properties={"connection_name": "cronfleet-doctor"}, timeout=timeout
                )
            except TimeoutError:
                raise
            except CONNECT_ERRORS as exc:
                failures.append(f"{redact(url)}: {exc or type(exc).__name__}")
                continue
            await connection.close()
            return f"RabbitMQ at {redact(url)} accepts a connection"
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {'; nor at '.join(failures)}")

    async def store() -> str:
        opened = await Store.open(settings.database_url, settings.database_schema)
        try:
            revision = (await opened.schema_version()).revision
            stored = await read_jobs(opened)
            specs = stored.specs
            async with opened.session() as session:
                pending = await session.scalar(
                    select(func.count())
                    .select_from(FireRow)
                    .where(FireRow.published_at.is_(None), FireRow.expires_at > utcnow())
                )
        finally:
            await opened.close()
        pools.update(s.pool for s in specs if s.enabled and s.action is not None)
        if stored.unreadable:
            name, why = next(iter(stored.unreadable.items()))
            raise CronfleetError(
                f"{len(stored.unreadable)} job(s) stored with a spec this cronfleet refuses, "
                f"first {name!r} ({why}): fix the jobs file and apply it again"
            )
        enabled = sum(s.enabled for s in specs)
        note = f"; {pending} fire(s) waiting to be published" if pending else ""
        where = opened.engine.url.render_as_string(hide_password=True)
        return (
            f"{opened.dialect} at {where}, schema {revision} (head): "
            f"{len(specs)} job(s), {enabled} enabled{note}"
        )

    async def broker() -> str:
        connection = await connect(settings.amqp_url, "cronfleet-doctor", wait=False)
        topology = Topology(settings.namespace)
        notes = []
        try:
            for name in [
                *(topology.pool_queue(p) for p in sorted(pools)),
                topology.monitor_queue,
                topology.dead_queue,
            ]:
                channel = await open_channel(connection)
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    result = queue.declaration_result
                    notes.append(
                        f"{name}: {result.message_count} message(s), {result.consumer_count} consumer(s)"
                    )
                except aio_pika.exceptions.ChannelClosed:
                    notes.append(f"{name}: not declared yet (start the process that consumes it)")
                finally:
                    if not channel.is_closed:
                        await channel.close()
        finally:
            await connection.close()
        return f"RabbitMQ at {redact(settings.amqp_url)}\n    " + "\n    ".join(notes)

    checks: tuple[tuple[str, Check], ...] = (
        (("keys", keys), ("store", store_reachable), ("broker", broker_reachable))
        if quick
        else (("keys", keys), ("store", store), ("broker", broker))
    )
    failures = printed = 0
    for label, check in checks:
        try:
            # The broker check bounds its own handshake by ``timeout``; this is the backstop.
            async with asyncio.timeout(timeout + 1):
                print(f"ok    {label}: {await check()}")
        except TimeoutError:
            failures += 1
            print(f"FAIL  {label}: no answer within {timeout:g} s")
        except (CronfleetError, *CONNECT_ERRORS) as exc:
            failures += 1
            print(f"FAIL  {label}: {exc}")
        for warning in warnings[printed:]:
            print(f"WARN  {warning}")
        printed = len(warnings)
    if failures:
        print(f"{failures} problem(s) found")
    else:
        print("all good" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 1 if failures else 0


def _require_role_keys(keyring: Keyring, process: str) -> None:
    """Raise ConfigError, in one line, unless ``keyring`` signs and verifies what ``process`` does."""
    signs, verifies = ROLE_KEYS[process]
    keyring.require(signs, who=f"a {process}")
    for role in verifies:
        if not any(key.serves(role) for key in keyring.keys):
            enough = " (an ed25519-public key is enough)" if role is Role.TRIGGER else ""
            raise ConfigError(
                f"a {process} verifies {role.value} messages and no key here does: add the "
                f"fleet's {role.value} key to CRONFLEET_KEYS{enough}"
            )


def _role_line(keyring: Keyring, role: Role) -> str:
    """Which key signs ``role``'s messages here, and which keys verify them."""
    try:
        signer = keyring.signer(role)
        signs = f"signed with {signer.describe()}"
    except CronfleetError:
        signs = "no key here can sign (fine for a process that does not send them)"
    verifiers = [key.describe() for key in keyring.keys if key.serves(role)]
    if role is Role.PING:
        verifiers += [key.describe() for key in keyring.keys if key.role is Role.EVENT]
    accepted = "; ".join(verifiers) if verifiers else "none"
    return f"{role.value}: {signs}; {len(verifiers)} verify: {accepted}"
