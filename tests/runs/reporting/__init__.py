"""Tests of cras_jax/runs/reporting/."""
