"""What a worker does at start so that the jobs it runs cannot read its signing keys.

A job runs as a child of the worker. Without this, it could read the worker's keys from
``/proc/<worker>/environ`` (the environment the worker was started with, whatever the worker
later removes from ``os.environ``) or ``/proc/<worker>/mem``, and sign triggers that any pool
then runs. So the worker:

- drops ``CRONFLEET_KEYS`` from its environment once read (children never inherit it; prefer
  ``CRONFLEET_KEYS_FILE``, a file only the worker's account can read);
- makes itself non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): its ``/proc`` files then belong to
  root, and a job running under another account, or under the same non-root account, cannot
  open them. A job running as root can still read everything: a root worker should run its
  jobs as another account (``run_as``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("cronfleet.worker")

_PR_SET_DUMPABLE = 4


def protect_secrets() -> bool:
    """Drop the keys from the environment and make this process non-dumpable; whether the
    latter worked (Linux only)."""
    if os.environ.pop("CRONFLEET_KEYS", None) is not None:
        log.info(
            "CRONFLEET_KEYS read and dropped from the environment (CRONFLEET_KEYS_FILE keeps them off it)"
        )
    if sys.platform != "linux":
        log.warning("cannot make the worker non-dumpable on %s: jobs may read its memory", sys.platform)
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_DUMPABLE, 0) failed (errno %d): jobs may read the worker's keys", ctypes.get_errno()
        )
        return False
    if os.geteuid() == 0:
        log.warning(
            "this worker runs as root: a job that also runs as root can read its keys; "
            'give shell jobs run_as = "an-account"'
        )
    return True
