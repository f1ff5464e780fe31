"""Tests of cras_jax/training/."""
