"""Sweep file, defined in cras_jax/configs/sweeps/crd_inputs.py (see there)."""

from cras_jax.configs.sweeps.crd_inputs import *  # noqa: F403
