"""Deterministic jitter: a fire goes out at its scheduled instant plus an offset that depends only
on the job's name and that instant, so every scheduler publishes it at the same moment and the
monitor can tell when to expect it. Pure; no clock, no randomness."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from common.messages import format_instant


def jitter_offset(job: str, scheduled_at: datetime, jitter_seconds: float) -> timedelta:
    """The delay of ``job``'s fire at ``scheduled_at``: a stable value in ``[0, jitter_seconds)``,
    in whole microseconds, spread evenly (blake2b of the trigger id). Zero without jitter."""
    window = int(jitter_seconds * 1_000_000)
    if window <= 0:
        return timedelta(0)
    key = f"{job}@{format_instant(scheduled_at)}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"cf-jitter").digest(), "big")
    return timedelta(microseconds=digest % window)
