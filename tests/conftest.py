"""Fixtures shared by every test: keys, and for integration tests a private namespace on the real
broker and a private store (a temp SQLite file, and a PostgreSQL schema when one is configured)."""

from __future__ import annotations

from common.signing import Keyring

TEST_KEYS = "k1:test-secret-number-one-0123456789,k0:test-secret-number-zero-0123456789"


def keyring() -> Keyring:
    """The keyring every test fleet uses."""
    return Keyring.parse(TEST_KEYS)
