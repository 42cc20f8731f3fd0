"""Which shell commands a worker agrees to run: ``CRONFLEET_ALLOW_COMMANDS``.

A worker runs only what its own configuration allows, whatever a validly signed trigger asks:
anyone who can define a job (a writer API key, the jobs file) or sign a trigger should not be
able to run any program on every worker. Unset, a worker runs no shell command at all.

The setting is a list of patterns (commas or new lines): an absolute path (``/usr/local/bin/backup``),
a glob (``/opt/jobs/*``), a bare program name (``pg_dump``, as ``argv[0]`` may give it and as it is
found on the worker's ``PATH``) or ``*`` for any program. Allowing a shell (``sh``, ``bash``) or an
interpreter allows whatever it is told to run.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class CommandAllowList:
    """The patterns a shell action's program must match (none: no shell action runs)."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> CommandAllowList:
        """The allow list of ``CRONFLEET_ALLOW_COMMANDS``; ConfigError for an empty pattern list
        that was meant to hold one (only separators)."""
        if text is None:
            return cls()
        patterns = tuple(p.strip() for p in text.replace("\n", ",").split(",") if p.strip())
        if not patterns and text.strip():
            raise ConfigError("CRONFLEET_ALLOW_COMMANDS holds no pattern")
        return cls(patterns)

    def refusal(self, program: str) -> str | None:
        """Why ``program`` (a shell action's ``argv[0]``) may not run here, or None."""
        if not self.patterns:
            return (
                f"this worker runs no shell command ({program!r} asked): set "
                "CRONFLEET_ALLOW_COMMANDS to the programs it may run (e.g. /usr/local/bin/*, or * for any)"
            )
        # A path is matched as it resolves (/opt/jobs/../../bin/sh is /bin/sh); a bare name as
        # written, else as found on the worker's PATH (looked up only then: it costs a stat of
        # each PATH directory, at every run).
        written = os.path.normpath(program) if "/" in program else program
        if self._matches(written):
            return None
        if "/" not in program and (found := shutil.which(program)) is not None and self._matches(found):
            return None
        return f"{program!r} is not in this worker's CRONFLEET_ALLOW_COMMANDS"

    def _matches(self, candidate: str) -> bool:
        return any(fnmatch.fnmatchcase(candidate, pattern) for pattern in self.patterns)
