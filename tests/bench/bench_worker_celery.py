"""The Celery reference of ``bench_worker.py``: a no-op task on RabbitMQ, no result backend."""

from __future__ import annotations

import os

from celery import Celery  # type: ignore[import-not-found, import-untyped, unused-ignore]

app = Celery("bench", broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.task_default_queue = os.environ.get("BENCH_CELERY_QUEUE", "benchw-celery")
app.conf.worker_prefetch_multiplier = 64
app.conf.task_ignore_result = True


@app.task(name="bench.noop")  # type: ignore[untyped-decorator, unused-ignore]
def noop() -> None:
    """Nothing."""


def fill(n: int) -> None:
    """Publish ``n`` no-op tasks to the queue."""
    with app.producer_pool.acquire(block=True) as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
