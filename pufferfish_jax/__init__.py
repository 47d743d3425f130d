"""Pufferfish-JAX: train the best small Llama-style language model a wall-clock budget allows."""
