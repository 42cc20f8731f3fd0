"""A worker drops its keys from its environment and makes itself non-dumpable, so that a job
running under the worker's own (non-root) account cannot read ``/proc/<worker>/environ`` or its
memory. Checked in a child process: it changes the process it runs in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes, os
from worker.hardening import protect_secrets
made = protect_secrets()
print(made, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), "CRONFLEET_KEYS" in os.environ)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_DUMPABLE) is Linux's")
def test_protect_secrets_drops_the_keys_and_makes_the_process_non_dumpable() -> None:
    environment = {**os.environ, "CRONFLEET_KEYS": "event:e1:a-secret-of-the-worker-0123"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=environment, capture_output=True, text=True, timeout=60, check=True
    )
    # protect_secrets succeeded; PR_GET_DUMPABLE (3) now answers 0; the keys are gone from os.environ.
    assert done.stdout.split() == ["True", "0", "False"], done.stdout + done.stderr
