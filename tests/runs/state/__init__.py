"""Tests of cras_jax/runs/state/."""
