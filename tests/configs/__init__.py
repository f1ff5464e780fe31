"""Tests of cras_jax/configs/."""
