"""The monitor: records every run event and heartbeat once, and keeps each job's state."""
