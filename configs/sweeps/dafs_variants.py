"""Sweep file, defined in cras_jax/configs/sweeps/dafs_variants.py (see there)."""

from cras_jax.configs.sweeps.dafs_variants import *  # noqa: F403
