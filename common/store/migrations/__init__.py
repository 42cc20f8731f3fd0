"""Alembic migrations of the cronfleet store: one revision per schema change, from the baseline."""
