"""Tests of cras_jax/data/."""
