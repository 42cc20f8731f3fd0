"""Does a RabbitMQ (or PostgreSQL) answer at this URL? Exit 0 if it does, 1 if not.

Used by ``deploy/dev`` before anything else is installed, so it needs only the standard
library for PostgreSQL and aio-pika (already in the virtualenv) for RabbitMQ.

    python deploy/check_service.py amqp URL [--wait SECONDS]
    python deploy/check_service.py postgres URL
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


async def _amqp_answers(url: str) -> str | None:
    import aio_pika

    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:  # any failure means "not answering"; the reason is printed
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None


async def _postgres_answers(url: str) -> str | None:
    import asyncpg

    try:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    except Exception as exc:  # any failure means "not answering"
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["amqp", "postgres"])
    parser.add_argument("url")
    parser.add_argument("--wait", type=float, default=0.0, help="keep trying this long")
    args = parser.parse_args()
    probe = _amqp_answers if args.kind == "amqp" else _postgres_answers
    deadline = time.monotonic() + args.wait
    while True:
        problem = asyncio.run(probe(args.url))
        if problem is None:
            return 0
        if time.monotonic() >= deadline:
            print(problem, file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
