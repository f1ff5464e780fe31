"""The training loop (feature pass, centres, steps, checkpoints, evaluation)."""
