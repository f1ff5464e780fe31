"""Tests of cras_jax/backbones/."""
