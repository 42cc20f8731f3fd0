"""What the scheduler, the worker and the monitor share: settings, wire messages, signing,
topology, the store and the cron maths. Imports none of the three processes."""
