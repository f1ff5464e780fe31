"""Sweep file, defined in cras_jax/configs/sweeps/params.py (see there)."""

from cras_jax.configs.sweeps.params import *  # noqa: F403
