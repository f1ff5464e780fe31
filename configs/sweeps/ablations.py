"""Sweep file, defined in cras_jax/configs/sweeps/ablations.py (see there)."""

from cras_jax.configs.sweeps.ablations import *  # noqa: F403
