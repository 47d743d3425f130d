"""Training: optimizer state, the pure jitted step, checkpoints, metrics and the deadline-driven loop."""
