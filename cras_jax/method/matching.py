"""Hierarchical prototype matching, HPI (docs/method.md §5).

Training knows each image's class: every patch vector u[h, w] is matched to the
most cosine-similar vector among all HW positions of its class centre. At
inference the class is unknown: the centre is chosen globally per image
(cosine of the whole flattened map), then the same local search runs.
Per-image functions are written for one image and vmapped over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _normalise(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def unit_centres(centres: jax.Array) -> jax.Array:
  """Centre vectors scaled to unit length (what local matching compares against)."""
  return _normalise(centres)


def match_known(
    u: jax.Array,
    centres: jax.Array,
    labels: jax.Array,
    hpi: bool = True,
    centres_unit: jax.Array | None = None,
):
  """Matching to known classes. u [B, HW, D], centres [K, HW, D], labels [B] -> (idx [B, HW],
  p [B, HW, D]): each patch n of image b takes the patch m of its class's centre c with
  idx[b, n] = argmax_m cos(u_bn, c_m), and p[b, n] = c_idx.

  The factor 1 / |u_bn| is the same positive number for every m, so the argmax is taken over
  u_bn . c_m / |c_m| without normalising u (the same index; on CPUs it also keeps XLA from
  fusing two normalisations into the matrix product, which made that product 4x slower at
  the paper's sizes). hpi=False is the "w/o HPI" ablation: each patch takes the centre vector
  at its own position.

  Batched rather than per image: the unit centres are gathered by class ([B, HW, D], the
  similarity's operand) and p is gathered straight from the centres at (class, index), so
  the chosen centre itself is never formed per image (on a TPU that per-image gather was a
  loop carrying all the centres, the largest writes of the scoring step).
  centres_unit: `unit_centres(centres)` when precomputed (scoring)."""
  if not hpi:
    idx = jnp.broadcast_to(jnp.arange(u.shape[1]), u.shape[:2])
    return idx, centres[labels]
  if centres_unit is None:
    centres_unit = jax.lax.optimization_barrier(unit_centres(centres))
  sim = jnp.einsum("bnd,bmd->bnm", u, centres_unit[labels], precision=_HIGHEST)
  idx = jnp.argmax(sim, axis=-1)
  return idx, centres[labels[:, None], idx]


def global_match(u: jax.Array, centres: jax.Array) -> jax.Array:
  """k* = argmax_k cos(vec(u_b), vec(c_k)) per image. u [B, HW, D] -> [B]."""
  uf = _normalise(u.reshape(u.shape[0], -1))
  cf = _normalise(centres.reshape(centres.shape[0], -1))
  return jnp.argmax(jnp.einsum("bd,kd->bk", uf, cf, precision=_HIGHEST), axis=-1)


def batch_mode_class(k: jax.Array, num_classes: int, axis_name: str | None = None) -> jax.Array:
  """The reference's batch mode: the most frequent k* of the batch for all images
  (`axis_name`: per-device code's mesh axis, over which the batch's counts are summed)."""
  counts = jnp.zeros((num_classes,), jnp.int32).at[k].add(1)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return jnp.full_like(k, jnp.argmax(counts))


def match_infer(u: jax.Array, centres: jax.Array, hpi: bool = True, per_image: bool = True):
  """Inference matching -> (class k* [B], idx [B, HW], p [B, HW, D])."""
  k = global_match(u, centres)
  if not per_image:
    k = batch_mode_class(k, centres.shape[0])
  idx, p = match_known(u, centres, k, hpi)
  return k, idx, p
