"""``cronfleet doctor``: check the keys, the store and the broker, and say what is wrong plainly."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

import aio_pika
from sqlalchemy import func, select

from common.bus import CONNECT_ERRORS, connect, redact
from common.catalog import read_jobs
from common.clock import utcnow
from common.errors import CronfleetError
from common.settings import Settings
from common.signing import Keyring, Role
from common.store import FireRow, Store
from common.topology import Topology

Check = Callable[[], Awaitable[str]]


async def doctor(settings: Settings, args: argparse.Namespace) -> int:
    """Print one line per check (and a WARN line per thing that works but should not stay so,
    such as a key without a role); exit 1 when any check fails."""
    pools: set[str] = {"default"}
    warnings: list[str] = []

    async def keys() -> str:
        keyring = settings.keyring(warn_legacy=False)
        for key in keyring.legacy:
            warnings.append(
                f"keys: {key.id!r} has no role, so it signs and verifies every message, triggers "
                "included: replace it with role keys (`cronfleet keys new --role ROLE`)"
            )
        return f"{len(keyring.keys)} key(s)\n    " + "\n    ".join(_role_line(keyring, role) for role in Role)

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
                channel = await connection.channel()
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

    failures = printed = 0
    for label, check in (("keys", keys), ("store", store), ("broker", broker)):
        try:
            print(f"ok    {label}: {await check()}")
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
