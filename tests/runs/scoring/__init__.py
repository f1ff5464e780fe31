"""Tests of cras_jax/runs/scoring/."""
