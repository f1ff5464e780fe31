"""Local patch aggregation and level fusion (SPEC section 2).

All functions are pure and work on NHWC arrays. Shapes for the paper's defaults:
level 2 [B, 36, 36, 512] and level 3 [B, 18, 18, 1024] -> t [B, 1296, 1536].
"""
from __future__ import annotations

from typing import Sequence

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
  taps = [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)]
  out = jnp.stack(taps, axis=-1)  # [B, H, W, C, k*k]
  return out.reshape(b, h, w, c * k * k)


def adaptive_pool_windows(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """Start and end indices of PyTorch's 1-D adaptive average pooling windows."""
  j = np.arange(out)
  start = (j * length) // out
  end = -((-(j + 1) * length) // out)  # ceil((j + 1) * L / out)
  return start, end


def adaptive_avg_pool_last(x: jax.Array, out: int) -> jax.Array:
  """1-D adaptive average pooling over the last axis (`F.adaptive_avg_pool1d`).

  Output j averages input indices [floor(j L / out), ceil((j + 1) L / out)).
  Divisible lengths use a reshape-mean; others gather the (padded) windows,
  so the cost is O(out * window) rather than a dense L x out matrix product.
  """
  length = x.shape[-1]
  if length == out:
    return x
  if length % out == 0:
    return x.reshape(*x.shape[:-1], out, length // out).mean(-1)
  start, end = adaptive_pool_windows(length, out)
  width = int((end - start).max())
  idx = start[:, None] + np.arange(width)[None, :]  # [out, width]
  valid = idx < end[:, None]
  idx = np.where(valid, idx, 0)
  gathered = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=-1)
  gathered = gathered.reshape(*x.shape[:-1], out, width)
  weights = jnp.asarray(valid / (end - start)[:, None], dtype=x.dtype)
  return (gathered * weights).sum(-1)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [B, H, W, C] with half-pixel centres.

  For upsampling this equals PyTorch `F.interpolate(mode='bilinear',
  align_corners=False)` (edge samples clamp to the border).
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size[0], size[1], c), method="linear", antialias=False)


def aggregate_patches(levels: Sequence[jax.Array], pre_embed_dim: int, embed_dim: int,
                      patch_size: int = 3) -> jax.Array:
  """Fuses backbone levels into patch features t [B, H0 * W0, embed_dim].

  levels: NHWC maps, the first one sets the grid (SPEC: level 2, stride 8).
  Per level: unfold k x k, upsample to the first level's grid, pool C*k*k to
  `pre_embed_dim`; stack level-major and pool again to `embed_dim`.

  The reference upsamples before pooling. Both are linear maps acting on
  different axes (space vs. feature vector), so pooling first is the same map
  and far cheaper (level 3 is upsampled at pre_embed_dim instead of C*k*k
  channels); tests check it against the reference order.
  """
  grid = levels[0].shape[1:3]
  pooled = []
  for feat in levels:
    f = unfold3x3(feat, patch_size)
    f = adaptive_avg_pool_last(f, pre_embed_dim)
    if f.shape[1:3] != grid:
      f = resize_bilinear(f, grid)
    pooled.append(f)
  b = pooled[0].shape[0]
  x = jnp.stack(pooled, axis=-2)  # [B, H, W, n_levels, pre]
  x = x.reshape(b, grid[0] * grid[1], len(levels) * pre_embed_dim)
  return adaptive_avg_pool_last(x, embed_dim)

