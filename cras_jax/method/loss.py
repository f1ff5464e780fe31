"""The CRD loss (docs/method.md §7): BCE(D(y), 0) + BCE(D(z), 1) on logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The discriminator's input per CRD mode (paper Table 6): the parts concatenated, each
# "raw" (u) or "residual" (u - p). heads.crd_first_layer and HeadsConfig read it too.
CRD_MODES = {
    "raw_residual": ("raw", "residual"),
    "raw": ("raw",),
    "residual": ("residual",),
    "raw_raw": ("raw", "raw"),
    "residual_residual": ("residual", "residual"),
}


def crd_parts(mode: str) -> tuple[str, ...]:
  if mode not in CRD_MODES:
    raise ValueError(f"unknown CRD input mode {mode!r}; choose one of {sorted(CRD_MODES)}")
  return CRD_MODES[mode]


def crd_inputs(u: jax.Array, p: jax.Array, mode: str = "raw_residual") -> jax.Array:
  """The discriminator's input from features and matched centres.

  Modes (paper Table 6): raw_residual [u | u - p] (default), raw [u],
  residual [u - p], raw_raw [u | u], residual_residual [u - p | u - p].
  """
  values = {"raw": u, "residual": u - p}
  return jnp.concatenate([values[part] for part in crd_parts(mode)], axis=-1)


def bce_losses(logits_true: jax.Array, logits_fake: jax.Array):
  """Mean BCE of normals against 0 and of synthetic anomalies against 1."""
  loss_true = jnp.mean(jax.nn.softplus(logits_true))  # -log(1 - sigmoid(x))
  loss_fake = jnp.mean(jax.nn.softplus(-logits_fake))  # -log(sigmoid(x))
  return loss_true, loss_fake
