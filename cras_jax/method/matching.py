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


def local_match(
    u: jax.Array, centre: jax.Array, hpi: bool = True, centre_unit: jax.Array | None = None
):
  """One image. u [HW, D], centre [HW, D] -> (index [HW], p [HW, D]).

  index[n] = argmax_m cos(u_n, c_m). The factor 1 / |u_n| is the same positive
  number for every m, so the argmax is taken over u_n . c_m / |c_m| without
  normalising u (the same index; on CPUs it also keeps XLA from fusing two
  normalisations into the matrix product, which made that product 4x slower at
  the paper's sizes). centre_unit: `unit_centres(centre)` when precomputed.
  hpi=False is the "w/o HPI" ablation: each patch takes the centre vector at
  its own position.
  """
  if not hpi:
    idx = jnp.arange(u.shape[0])
    return idx, centre
  if centre_unit is None:
    centre_unit = jax.lax.optimization_barrier(_normalise(centre))
  sim = jnp.einsum("nd,md->nm", u, centre_unit, precision=_HIGHEST)
  idx = jnp.argmax(sim, axis=-1)
  return idx, centre[idx]


def class_rows(x: jax.Array, k: jax.Array) -> jax.Array:
  """x[k], each image's slice of a per-class array (x [K, ...], k [B] -> [B, ...]), as the
  product of k's one-hot matrix with x: exact (every output is one entry of x times 1 plus
  zeros; x finite, as checkpoints are checked to be). The "xla" kernels' form: on TPUs the
  gather of whole [HW, D] slices compiles to a loop of dynamic slices whose result is written
  and copied, the product to one pass over x."""
  oh = jax.nn.one_hot(k, x.shape[0], dtype=x.dtype)
  return jnp.einsum("bk,k...->b...", oh, x, precision=_HIGHEST)


def match_known(
    u: jax.Array,
    centres: jax.Array,
    labels: jax.Array,
    hpi: bool = True,
    centres_unit: jax.Array | None = None,
    one_hot: bool = False,
):
  """Training matching. u [B, HW, D], centres [K, HW, D], labels [B] -> (idx, p).

  centres_unit: `unit_centres(centres)` when precomputed (scoring). one_hot: the classes'
  centres taken by `class_rows`' product, normalised once for all classes (the "xla" form);
  else gathered per image and normalised there (fewer bytes when the batch holds fewer images
  than there are classes, as on CPUs)."""
  if not one_hot:
    if centres_unit is None:
      return jax.vmap(lambda ui, k: local_match(ui, centres[k], hpi))(u, labels)
    return jax.vmap(lambda ui, k: local_match(ui, centres[k], hpi, centres_unit[k]))(u, labels)
  b, hw, d = u.shape
  if not hpi:
    return jnp.broadcast_to(jnp.arange(hw), (b, hw)), class_rows(centres, labels)
  cu = unit_centres(centres) if centres_unit is None else centres_unit
  sim = jnp.einsum("bnd,bmd->bnm", u, class_rows(cu, labels), precision=_HIGHEST)
  idx = jnp.argmax(sim, axis=-1)
  return idx, matched_rows(centres, labels, idx)


def matched_rows(centres: jax.Array, k: jax.Array, idx: jax.Array) -> jax.Array:
  """centres[k_b, idx_b[n]] for every image b and patch n: [K, HW, D], k [B], idx [B, HW] ->
  [B, HW, D], one gather from the flattened centres (no per-image [HW, D] slice)."""
  kk, hw, d = centres.shape
  return centres.reshape(kk * hw, d)[k[:, None] * hw + idx]


def global_match(u: jax.Array, centres: jax.Array) -> jax.Array:
  """k* = argmax_k cos(vec(u_b), vec(c_k)) per image. u [B, HW, D] -> [B].

  1 / |vec(u_b)| is the same positive factor for every k: the argmax is taken over
  vec(u_b) . vec(c_k) / |vec(c_k)|, without a normalised copy of u."""
  cn = jnp.linalg.norm(centres.reshape(centres.shape[0], -1), axis=-1)
  dots = jnp.einsum(
      "bd,kd->bk",
      u.reshape(u.shape[0], -1),
      centres.reshape(centres.shape[0], -1),
      precision=_HIGHEST,
  )
  return jnp.argmax(dots / jnp.maximum(cn, 1e-8), axis=-1)


def batch_mode_class(k: jax.Array, num_classes: int, axis_name: str | None = None) -> jax.Array:
  """The reference's batch mode: the most frequent k* of the batch for all images
  (`axis_name`: per-device code's mesh axis, over which the batch's counts are summed)."""
  counts = jnp.zeros((num_classes,), jnp.int32).at[k].add(1)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return jnp.full_like(k, jnp.argmax(counts))


def match_infer(
    u: jax.Array,
    centres: jax.Array,
    hpi: bool = True,
    per_image: bool = True,
    one_hot: bool = False,
):
  """Inference matching -> (class k* [B], idx [B, HW], p [B, HW, D])."""
  k = global_match(u, centres)
  if not per_image:
    k = batch_mode_class(k, centres.shape[0])
  idx, p = match_known(u, centres, k, hpi, one_hot=one_hot)
  return k, idx, p
