"""The scheduler: plans every enabled job's next fire, claims it once, publishes its trigger."""
