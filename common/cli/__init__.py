"""The ``cronfleet`` command line."""

from common.cli.main import main

__all__ = ["main"]
