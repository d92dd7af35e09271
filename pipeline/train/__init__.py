"""The one training engine: Method (what to learn), Updater (how parameters change), Trainer (time)."""
