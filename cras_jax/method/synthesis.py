"""DAFS: distance-aware feature synthesis (docs/method.md §6), training only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cras_jax.base import schema

VARIANTS = schema.choices("model.dafs_variant")  # paper Table 6


def dafs_alpha(
    u: jax.Array,
    p: jax.Array,
    g: jax.Array,
    beta: float,
    variant: str = "default",
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> jax.Array:
  """Per-patch noise scale alpha [B, HW] from u, p, g [B, HW, D].

  r = ||u - p||, n = ||g||, s = n / r normalised by its mean over ALL patches
  of the batch, alpha = beta (s - 1) + 1. Variants (paper Table 6):
  "no_scaling" alpha = s; "inv_r" uses s = 1/r; "inv_g_r" s = 1/(n r), each
  mean-normalised and then mixed by beta like the default. "none" is the
  "w/o DAFS" ablation: alpha = 1, fixed-variance noise. `axis_name`: per-device code's mesh
  axis, over which the mean of s is taken (the whole batch's, as in the jit form).
  """
  if variant == "none":
    return jnp.ones(u.shape[:-1], u.dtype)
  r = jnp.maximum(jnp.linalg.norm(u - p, axis=-1), eps)
  n = jnp.linalg.norm(g, axis=-1)
  if variant == "default" or variant == "no_scaling":
    s = n / r
  elif variant == "inv_r":
    s = 1.0 / r
  elif variant == "inv_g_r":
    s = 1.0 / jnp.maximum(n * r, eps)
  else:
    raise ValueError(f"unknown DAFS variant {variant!r}; choose one of {VARIANTS}")
  mean = jnp.mean(s)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  s = s / mean
  if variant == "no_scaling":
    return s
  return beta * (s - 1.0) + 1.0


def dafs_offset(
    u: jax.Array,
    p: jax.Array,
    g: jax.Array,
    beta: float,
    variant: str = "default",
    axis_name: str | None = None,
) -> jax.Array:
  """alpha * g, the step from u to the synthetic anomaly; it carries no gradient."""
  alpha = jax.lax.stop_gradient(dafs_alpha(u, p, g, beta, variant, axis_name=axis_name))
  return alpha[..., None] * jax.lax.stop_gradient(g)


def dafs(
    u: jax.Array, p: jax.Array, g: jax.Array, beta: float, variant: str = "default"
) -> jax.Array:
  """Synthetic anomaly v = u + alpha * g; alpha and g carry no gradient."""
  return u + dafs_offset(u, p, g, beta, variant)
