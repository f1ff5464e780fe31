"""Local patch aggregation and level fusion (docs/method.md §2).

All functions are pure and work on NHWC arrays. Shapes for the paper's defaults:
level 2 [B, 36, 36, 512] and level 3 [B, 18, 18, 1024] -> t [B, 1296, 1536].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def unfold3x3(x: jax.Array, patch_size: int = 3) -> jax.Array:
  """Every position's k x k neighbourhood (zero padding, stride 1).

  [B, H, W, C] -> [B, H, W, C * k * k], ordered channel-major, then kernel row,
  then kernel column, as PyTorch's `F.unfold` orders it.
  """
  k = patch_size
  pad = (k - 1) // 2
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
  taps = [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)]
  out = jnp.stack(taps, axis=-1)  # [B, H, W, C, k*k]
  return out.reshape(b, h, w, c * k * k)


def unfold_pool_groups(x: jax.Array, out: int, patch_size: int = 3) -> jax.Array:
  """`adaptive_avg_pool_last(unfold3x3(x, k), out)` when k k C is a multiple of `out` (equal
  groups of g = k k C / out consecutive entries, e.g. WideResNet50: 4608 -> 1536, g = 3),
  without the k x k neighbourhood stack: every output is the mean of its group's shifted
  taps, summed straight from the padded map. [B, H, W, C] -> [B, H, W, out]; nothing larger
  than the output is formed.

  Entry i = c k k + t of the unfolded vector (channel c, tap t) falls in group i // g. Over a
  block of cb = g / gcd(k k, g) channels the pattern repeats: the block's k k cb entries fill
  k k cb / g outputs, slot s taking tap t of the block's channel r when (k k r + t) // g == s.
  """
  k = patch_size
  k2, c = k * k, x.shape[-1]
  if (k2 * c) % out:
    raise ValueError(f"{k2} x {c} entries do not split into {out} equal groups")
  g = k2 * c // out
  cb = g // np.gcd(k2, g)
  slots = k2 * cb // g
  pad = (k - 1) // 2
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
  xp = xp.reshape(b, h + k - 1, w + k - 1, c // cb, cb)
  sums = [None] * slots
  for r in range(cb):
    for t in range(k2):
      i, j = divmod(t, k)
      # summed in float32 whatever x's dtype (bfloat16 levels: read and written in bfloat16,
      # the sums fused in between)
      tap = xp[:, i : i + h, j : j + w, :, r].astype(jnp.float32)  # [B, H, W, C / cb]
      s = (k2 * r + t) // g
      sums[s] = tap if sums[s] is None else sums[s] + tap
  # each slot's mean in x's dtype before the stack (the fusion then writes x's dtype)
  return jnp.stack([(v / g).astype(x.dtype) for v in sums], axis=-1).reshape(b, h, w, out)


def adaptive_pool_windows(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """Start and end indices of PyTorch's 1-D adaptive average pooling windows."""
  j = np.arange(out)
  start = (j * length) // out
  end = -((-(j + 1) * length) // out)  # ceil((j + 1) * L / out)
  return start, end


def adaptive_avg_pool_last(x: jax.Array, out: int) -> jax.Array:
  """1-D adaptive average pooling over the last axis (`F.adaptive_avg_pool1d`).

  Output j averages input indices [floor(j L / out), ceil((j + 1) L / out)).
  Divisible lengths use a reshape-mean; others a product with `adaptive_pool_matrix`
  (`aggregate_patches` folds such poolings into one matrix per level).
  """
  length = x.shape[-1]
  if length == out:
    return x
  if length % out == 0:
    return x.reshape(*x.shape[:-1], out, length // out).mean(-1)
  m = jnp.asarray(adaptive_pool_matrix(length, out), x.dtype)
  return jnp.dot(x, m, precision=jax.lax.Precision.HIGHEST)


def adaptive_avg_pool_windows(x: jax.Array, out: int) -> jax.Array:
  """`adaptive_avg_pool_last` as plain XLA ops: a gather of every window (padded to the
  widest) and a masked mean; no matrix. The "xla" kernels' form (`aggregate_patches`)."""
  length = x.shape[-1]
  if _is_reshape_mean(length, out):
    return adaptive_avg_pool_last(x, out)
  start, end = adaptive_pool_windows(length, out)
  width = int((end - start).max())
  idx = np.minimum(start[:, None] + np.arange(width)[None, :], end[:, None] - 1)
  mask = (start[:, None] + np.arange(width)[None, :] < end[:, None]).astype(np.float32)
  taps = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=-1)
  taps = taps.reshape(*x.shape[:-1], out, width)
  weights = jnp.asarray(mask / (end - start)[:, None], x.dtype)
  return (taps * weights).sum(-1)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [B, H, W, C] with half-pixel centres.

  For upsampling this equals PyTorch `F.interpolate(mode='bilinear',
  align_corners=False)` (edge samples clamp to the border).
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size[0], size[1], c), method="linear", antialias=False)


def adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
  """[length, out] float64 matrix of `F.adaptive_avg_pool1d` (x @ M pools the last axis)."""
  start, end = adaptive_pool_windows(length, out)
  m = np.zeros((length, out), np.float64)
  for j in range(out):
    m[start[j] : end[j], j] = 1.0 / (end[j] - start[j])
  return m


def _is_reshape_mean(length: int, out: int) -> bool:
  return length == out or length % out == 0


def level_projections(
    channels: Sequence[int], pre_embed_dim: int, embed_dim: int, patch_size: int = 3
) -> list[tuple[np.ndarray, int, int]]:
  """Per level, the one linear map from its unfolded patch vector to its share of t.

  Patch aggregation is linear in each level's unfolded features: the level's pooling
  (C k k -> pre_embed_dim) followed by the rows of the final pooling (n_levels * pre ->
  embed_dim) that read that level's block. Their product M_l [C k k, D] is nonzero only
  in a contiguous range of output columns [c0, c1) (the final windows that touch the
  block). Returns [(M_l[:, c0:c1] as float32, c0, c1)], products taken in float64.
  """
  final = adaptive_pool_matrix(len(channels) * pre_embed_dim, embed_dim)
  out = []
  for i, c in enumerate(channels):
    m = adaptive_pool_matrix(c * patch_size * patch_size, pre_embed_dim)
    m = m @ final[i * pre_embed_dim : (i + 1) * pre_embed_dim]
    cols = np.flatnonzero(np.abs(m).sum(0) > 0)
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    out.append((m[:, c0:c1].astype(np.float32), c0, c1))
  return out


def aggregate_patches(
    levels: Sequence[jax.Array],
    pre_embed_dim: int,
    embed_dim: int,
    patch_size: int = 3,
    form: str = "cpu_tuned",
) -> jax.Array:
  """Fuses backbone levels into patch features t [B, H0 * W0, embed_dim].

  levels: NHWC maps, the first one sets the grid (docs/method.md §2: level 2, stride 8).
  Per level: unfold k x k, upsample to the first level's grid, pool C*k*k to
  `pre_embed_dim`; stack level-major and pool again to `embed_dim`.

  The reference upsamples before pooling. Both are linear maps acting on
  different axes (space vs. feature vector), so pooling first is the same map
  and far cheaper (level 3 is upsampled at pre_embed_dim instead of C*k*k
  channels); tests check it against the reference order.

  When every pooling is a plain mean of equal consecutive groups (e.g. WideResNet50:
  4608 -> 1536 -> ...), the poolings are reshape-means. Otherwise (uneven windows, or
  pre_embed_dim above C k k as for EfficientNet-Lite levels), a pooling would be a gather,
  which XLA runs slowly on CPUs: each level's two poolings are then one small matrix
  product (`level_projections`), applied before upsampling, and the levels' shares add up.
  That matrix form is the "cpu_tuned" kernels' form (`form`, cras_jax/backbones/layers.py);
  with form="xla" uneven poolings stay window means (`adaptive_avg_pool_windows`), and equal
  groups are summed from shifted taps without forming the k x k stack (`unfold_pool_groups`:
  the largest intermediate is the pooled level, not nine copies of it; the "xla" form runs on
  GPUs and TPUs, where that stack dominated the bytes a step moves).
  """
  grid = levels[0].shape[1:3]
  b = levels[0].shape[0]
  k2 = patch_size * patch_size
  n = len(levels)
  plain = all(
      _is_reshape_mean(f.shape[-1] * k2, pre_embed_dim) for f in levels
  ) and _is_reshape_mean(n * pre_embed_dim, embed_dim)
  g2 = n * pre_embed_dim // embed_dim
  if (
      form == "xla"
      and all((f.shape[-1] * k2) % pre_embed_dim == 0 for f in levels)
      and (n * pre_embed_dim) % embed_dim == 0
      and pre_embed_dim % g2 == 0
  ):
    # Both poolings are equal groups and the final one never mixes two levels (WideResNet50:
    # 4608 -> 1536 in threes, then pairs): level l's share of t is its own columns, the mean
    # of groups of g1 g2 consecutive unfolded entries. Each level is pooled straight to that
    # share (`unfold_pool_groups`), upsampled at that width, and the shares are concatenated:
    # no [B, H, W, n_levels, pre] stack, no copy of it.
    shares = []
    for feat in levels:
      f = unfold_pool_groups(feat, pre_embed_dim // g2, patch_size)
      if f.shape[1:3] != grid:
        f = resize_bilinear(f, grid)
      shares.append(f)
    t = jnp.concatenate(shares, axis=-1).reshape(b, grid[0] * grid[1], embed_dim)
    # The GPU compiler (XLA in jaxlib 0.10.2, compile-only for H100) fails on the training step
    # when it fuses this concatenation into the adapter's gradient product ("Couldn't find
    # output tile sizes", tests/perf/test_gpu.py): t is formed as its own buffer.
    return jax.lax.optimization_barrier(t)
  if plain or form == "xla":
    pooled = []
    for feat in levels:
      if form == "xla" and (feat.shape[-1] * k2) % pre_embed_dim == 0:
        f = unfold_pool_groups(feat, pre_embed_dim, patch_size)  # no k x k stack
      else:
        f = unfold3x3(feat, patch_size)
        f = adaptive_avg_pool_windows(f, pre_embed_dim)
      if f.shape[1:3] != grid:
        f = resize_bilinear(f, grid)
      pooled.append(f)
    x = jnp.stack(pooled, axis=-2)  # [B, H, W, n_levels, pre]
    x = x.reshape(b, grid[0] * grid[1], n * pre_embed_dim)
    return adaptive_avg_pool_windows(x, embed_dim)
  projections = level_projections(
      [f.shape[-1] for f in levels], pre_embed_dim, embed_dim, patch_size
  )
  t = None
  for feat, (m, c0, c1) in zip(levels, projections):
    f = unfold3x3(feat, patch_size)
    f = jnp.dot(f, jnp.asarray(m, f.dtype), precision=jax.lax.Precision.HIGHEST)
    if f.shape[1:3] != grid:
      f = resize_bilinear(f, grid)
    f = jnp.pad(f, ((0, 0), (0, 0), (0, 0), (c0, embed_dim - c1)))
    t = f if t is None else t + f
  return t.reshape(b, grid[0] * grid[1], embed_dim)
