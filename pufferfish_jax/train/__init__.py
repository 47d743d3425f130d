"""Training's bottom layer: optimizer state, the pure jitted step, checkpoints, evaluation and
metrics. It imports no planner; the deadline-driven loop above it is `pufferfish_jax.loop`."""
