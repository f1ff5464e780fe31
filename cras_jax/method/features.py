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


# Input channels per group of the "xla" form's pooling convolution where its inputs are
# float32 (each product then costs several passes of the matrix units: TPUs run float32 at
# HIGHEST precision as six bfloat16 passes). Fewer groups multiply more zeros, more groups cost
# bytes (the TPU compiler re-lays out small groups). 16-bit levels with 0/1 weights run in one
# group: the zeros cost less than the bytes of any split. TPU v5e compile, WideResNet50 at
# 288 px, batch 32 per chip (docs/performance.md "The aggregation as a convolution").
FLOAT32_GROUP_CHANNELS = 64


def pooling_kernel(
    m: np.ndarray, channels: int, patch_size: int = 3, group_channels: int | None = None
) -> tuple[np.ndarray, int, int | None]:
  """A level's projection M_l [C k k, n] (`level_projections`) as a convolution kernel.

  Entry (channel c, tap i k + j) of the unfolded vector is x[y + i - pad, x + j - pad, c], so
  M_l reshaped to [k, k, C, n] is the kernel of a stride-1, zero-padded cross-correlation
  that unfolds and pools in one operation. Returns (kernel [k, k, C / G, n] HWIO, G, div):
  G feature groups (1 when `group_channels` is None; else the fewest equal blocks of M_l's
  block-diagonal structure with at most `group_channels` input channels each, or the most
  there are); div, when every nonzero weight is the same 1 / div (equal-group means:
  WideResNet50's 1/6 and 1/12), with the kernel's weights 1 so that they are exact in any
  float dtype, else None (weights as they are, float32)."""
  k = patch_size
  n = m.shape[1]
  w = np.asarray(m, np.float64).reshape(channels, k, k, n).transpose(1, 2, 0, 3)

  def blocks(g: int) -> bool:
    ci, co = channels // g, n // g
    inside = np.zeros(w.shape, bool)
    for q in range(g):
      inside[:, :, q * ci : (q + 1) * ci, q * co : (q + 1) * co] = True
    return not np.any(w[~inside])

  groups = 1
  if group_channels is not None:
    shared = np.gcd(channels, n)
    valid = [g for g in range(1, shared + 1) if shared % g == 0 and blocks(g)]
    small = [g for g in valid if channels // g <= group_channels]
    groups = min(small) if small else max(valid)
  ci, co = channels // groups, n // groups
  kernel = np.concatenate(
      [w[:, :, q * ci : (q + 1) * ci, q * co : (q + 1) * co] for q in range(groups)], axis=-1
  )
  div = _mean_size(kernel)
  if div is not None:
    kernel = (kernel != 0).astype(np.float64)
  return kernel.astype(np.float32), groups, div


def _mean_size(w: np.ndarray) -> int | None:
  """g when every nonzero weight of `w` is the same 1 / g (a mean of g entries), else None."""
  nonzero = w[w != 0]
  if not nonzero.size or np.any(w < 0) or np.ptp(nonzero) != 0:
    return None
  inv = 1.0 / nonzero[0]
  if abs(inv - round(inv)) < 1e-5 * inv:  # m is float32: 1 / float32(1 / 6) is 6 - 4e-8
    return int(round(inv))
  return None


def pool_conv(x: jax.Array, m: np.ndarray, patch_size: int = 3, dtype=None) -> jax.Array:
  """`unfold3x3(x) @ m` as one convolution (`pooling_kernel`), summed in float32:
  [B, H, W, C] -> [B, H, W, n] in `dtype` (default x's). Nothing larger than the output is
  formed. With 0/1 weights the products are exact in x's dtype (bfloat16 levels are read as
  they are; one group) and the sums are divided by the group size in float32; other weights,
  and float32 levels, run in float32 in groups of at most `FLOAT32_GROUP_CHANNELS` channels."""
  out_dtype = x.dtype if dtype is None else dtype
  one_group = _mean_size(m) is not None and jnp.dtype(x.dtype).itemsize <= 2
  group_channels = None if one_group else FLOAT32_GROUP_CHANNELS
  kernel, groups, div = pooling_kernel(m, x.shape[-1], patch_size, group_channels)
  if div is None:
    x = x.astype(jnp.float32)
  pad = (patch_size - 1) // 2
  y = jax.lax.conv_general_dilated(
      x,
      jnp.asarray(kernel, x.dtype),
      (1, 1),
      ((pad, patch_size - 1 - pad),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
  )
  if div is not None:
    y = y / div
  return y.astype(out_dtype)


def aggregate_patches(
    levels: Sequence[jax.Array],
    pre_embed_dim: int,
    embed_dim: int,
    patch_size: int = 3,
    form: str = "cpu_tuned",
    dtype=None,
) -> jax.Array:
  """Fuses backbone levels into patch features t [B, H0 * W0, embed_dim] in `dtype` (default:
  the levels' dtype).

  levels: NHWC maps, the first one sets the grid (docs/method.md §2: level 2, stride 8).
  Per level: unfold k x k, upsample to the first level's grid, pool C*k*k to
  `pre_embed_dim`; stack level-major and pool again to `embed_dim`.

  The reference upsamples before pooling. Both are linear maps acting on
  different axes (space vs. feature vector), so pooling first is the same map
  and far cheaper (level 3 is upsampled at pre_embed_dim instead of C*k*k
  channels); tests check it against the reference order.

  Each level's two poolings are one linear map of its unfolded vector (`level_projections`).
  Forms (`form`, the kernels of cras_jax/backbones/layers.py):
  - "xla" (GPUs, TPUs): per level, that map as one grouped convolution (`pool_conv`), which
    unfolds and pools without forming the k x k stack and runs on the matrix units; the
    shares are upsampled at their width and concatenated (or added where a final window
    spans two levels).
  - "cpu_tuned": when every pooling is a plain mean of equal consecutive groups (e.g.
    WideResNet50: 4608 -> 1536 -> ...), unfold and reshape-means; otherwise (uneven windows,
    or pre_embed_dim above C k k as for EfficientNet-Lite levels) unfold and one small matrix
    product per level, whose shares add up.
  """
  grid = levels[0].shape[1:3]
  b = levels[0].shape[0]
  k2 = patch_size * patch_size
  n = len(levels)
  if form == "xla":
    projections = level_projections(
        [f.shape[-1] for f in levels], pre_embed_dim, embed_dim, patch_size
    )
    out_dtype = levels[0].dtype if dtype is None else dtype
    shares = []
    for feat, (m, _, _) in zip(levels, projections):
      f = pool_conv(feat, m, patch_size, out_dtype)
      if f.shape[1:3] != grid:
        f = resize_bilinear(f, grid)
      shares.append(f)
    spans = [(c0, c1) for _, c0, c1 in projections]
    if all(a[1] == b_[0] for a, b_ in zip(spans, spans[1:])) and spans[-1][1] == embed_dim:
      t = jnp.concatenate(shares, axis=-1)  # the levels' columns side by side (WideResNet50)
    else:
      t = sum(
          jnp.pad(f, ((0, 0), (0, 0), (0, 0), (c0, embed_dim - c1)))
          for f, (c0, c1) in zip(shares, spans)
      )
    t = t.reshape(b, grid[0] * grid[1], embed_dim)
    # The GPU compiler (XLA in jaxlib 0.10.2, compile-only for H100) fails on the training step
    # when it fuses this concatenation into the adapter's gradient product ("Couldn't find
    # output tile sizes", tests/perf/test_gpu.py): t is formed as its own buffer.
    return jax.lax.optimization_barrier(t)
  if dtype is not None:
    levels = [f.astype(dtype) for f in levels]
  plain = all(
      _is_reshape_mean(f.shape[-1] * k2, pre_embed_dim) for f in levels
  ) and _is_reshape_mean(n * pre_embed_dim, embed_dim)
  if plain:
    pooled = []
    for feat in levels:
      f = adaptive_avg_pool_last(unfold3x3(feat, patch_size), pre_embed_dim)
      if f.shape[1:3] != grid:
        f = resize_bilinear(f, grid)
      pooled.append(f)
    x = jnp.stack(pooled, axis=-2)  # [B, H, W, n_levels, pre]
    x = x.reshape(b, grid[0] * grid[1], n * pre_embed_dim)
    return adaptive_avg_pool_last(x, embed_dim)
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
