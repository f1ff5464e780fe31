"""Tests of cras_jax/engine/."""
