"""The taskiq reference of ``bench_worker.py``: a no-op async task on RabbitMQ (taskiq-aio-pika,
its quorum queue), no result backend."""

from __future__ import annotations

import asyncio
import os

from taskiq_aio_pika import AioPikaBroker  # type: ignore[import-not-found, unused-ignore]
from taskiq_aio_pika.exchange import Exchange  # type: ignore[import-not-found, unused-ignore]
from taskiq_aio_pika.queue import Queue  # type: ignore[import-not-found, unused-ignore]

QUEUE = os.environ.get("BENCH_TASKIQ_QUEUE", "benchw-taskiq")
# Prefetch: the tasks run at once (the bench's --concurrency, as cronfleet's worker is given).
QOS = int(os.environ.get("BENCH_TASKIQ_QOS", "64"))
FILL_BATCH = 500

broker = AioPikaBroker(
    os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    qos=QOS,
    exchange=Exchange(name=QUEUE),
    task_queues=[Queue(name=QUEUE)],
    dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter"),
    delay_queue=Queue(name=f"{QUEUE}.delay"),
)


@broker.task(task_name="bench.noop")  # type: ignore[untyped-decorator, misc, unused-ignore]
async def noop() -> None:
    """Nothing."""


async def _fill(n: int) -> None:
    await broker.startup()
    try:
        for first in range(0, n, FILL_BATCH):
            await asyncio.gather(*(noop.kiq() for _ in range(first, min(n, first + FILL_BATCH))))
    finally:
        await broker.shutdown()


def fill(n: int) -> None:
    """Publish ``n`` no-op tasks to the queue."""
    asyncio.run(_fill(n))
