"""Tests of cras_jax/base/."""
