"""The worker: consumes its pool's triggers, verifies them, runs their actions, reports runs."""
