"""The machine a benchmark ran on, in the line every bench prints first: its figures are only
comparable with figures of the same machine (a stop's machine may be half as fast as the last's)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def processor() -> str:
    """The processor's model as the kernel names it ("AMD EPYC"), or "unknown processor"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return "unknown processor"


def machine() -> str:
    """Cores, architecture, processor model and Python: "2 cpu(s) (x86_64, AMD EPYC), Python 3.11.7"."""
    return (
        f"{os.cpu_count()} cpu(s) ({platform.machine()}, {processor()}), Python {platform.python_version()}"
    )
