"""Who may sign what: the one table of which key role each message needs.

A trigger needs a ``trigger`` key; run events and process heartbeats an ``event`` key; a job
heartbeat an ``event`` key or a ``ping`` key (one limited to some jobs only for those); a batch of
run events and worker heartbeats an ``event`` key. A legacy
key (no role) passes everywhere. So whoever can ping cannot make a worker run anything.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.messages import (
    EventBatch,
    JobHeartbeat,
    JobsChanged,
    RunFinished,
    RunStarted,
    SchedulerHeartbeat,
    Trigger,
    WorkerHeartbeat,
)
from common.signing import Key, Role

SIGNED_BY: Mapping[type, frozenset[Role]] = {
    Trigger: frozenset({Role.TRIGGER}),
    RunStarted: frozenset({Role.EVENT}),
    RunFinished: frozenset({Role.EVENT}),
    WorkerHeartbeat: frozenset({Role.EVENT}),
    SchedulerHeartbeat: frozenset({Role.EVENT}),
    JobHeartbeat: frozenset({Role.EVENT, Role.PING}),
    # A worker's run events and heartbeats of one pool, together: what signs each of them.
    EventBatch: frozenset({Role.EVENT}),
    # Whoever changes jobs: ``cronfleet apply`` (a trigger key), the HTTP API (a monitor's).
    JobsChanged: frozenset({Role.TRIGGER, Role.EVENT}),
}


def signing_role(message: object) -> Role:
    """The role whose key cronfleet signs ``message`` with: triggers with the trigger key, job
    heartbeats with the ping key (``Keyring.signer`` falls back to the event key), the rest with
    the event key."""
    match message:
        case Trigger():
            return Role.TRIGGER
        case JobHeartbeat():
            return Role.PING
    return Role.EVENT


def role_refusal(key: Key, message: object) -> str | None:
    """None when ``key`` may sign ``message``; else why not, in one line naming the key's id and
    role and the message's type (never a secret)."""
    if key.role is None:
        return None
    allowed = SIGNED_BY.get(type(message), frozenset())
    kind = getattr(message, "type", type(message).__name__)
    if key.role not in allowed:
        needed = " or ".join(sorted(role.value for role in allowed)) or "no"
        return (
            f"key {key.id!r} is {with_article(key.role.value)} key; "
            f"{with_article(kind)} must be signed by {with_article(needed)} key"
        )
    job = getattr(message, "job", None)
    if key.jobs is not None and job not in key.jobs:
        jobs = ", ".join(sorted(key.jobs))
        return f"ping key {key.id!r} may sign a {kind} of {jobs} only, not of job {job!r}"
    return None


def with_article(word: str) -> str:
    """``word`` after its indefinite article: ``an event``, ``a run.started``."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
