"""Tests of cras_jax/method/."""
