"""Anomaly maps and image scores (docs/method.md §9), computed on the device.

The map is bilinear upsampling (half-pixel centres, PyTorch align_corners=False)
followed by SciPy's `gaussian_filter(sigma, mode='reflect', truncate=4)`. Both
are linear and separable, so each axis is one small matrix built here in NumPy
and the whole map is two matrix products: map = Ry @ s @ Rx^T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] operator of PyTorch's 1-D linear interpolation, align_corners=False."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
  """SciPy 'reflect' (d c b a | a b c d | d c b a), any distance outside."""
  period = 2 * n
  i = np.mod(i, period)
  return np.where(i < n, i, period - 1 - i)


def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """[size, size] operator of scipy.ndimage.gaussian_filter1d with mode='reflect'."""
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  w /= w.sum()
  m = np.zeros((size, size), np.float64)
  rows = np.repeat(np.arange(size), x.size)
  cols = _reflect_index(np.arange(size)[:, None] + x[None, :], size).reshape(-1)
  np.add.at(m, (rows, cols), np.tile(w, size))
  return m


@functools.lru_cache(maxsize=16)
def map_operator(out_size: int, in_size: int, sigma: float) -> np.ndarray:
  """Upsample then smooth, for one axis: [out, in] float32."""
  m = bilinear_matrix(out_size, in_size)
  if sigma > 0:
    m = gaussian_matrix(out_size, sigma) @ m
  return m.astype(np.float32)


def anomaly_map(
    patch_scores: jax.Array, out_size: tuple[int, int], sigma: float = 4.0
) -> jax.Array:
  """[B, h, w] patch scores -> [B, H, W] smoothed map at image resolution."""
  _, h, w = patch_scores.shape
  ry = jnp.asarray(map_operator(out_size[0], h, sigma))
  rx = jnp.asarray(map_operator(out_size[1], w, sigma))
  return jnp.einsum("yh,bhw,xw->byx", ry, patch_scores, rx, precision=jax.lax.Precision.HIGHEST)


def image_score(
    patch_scores: jax.Array, smoothed_map: jax.Array, mode: str = "reference"
) -> jax.Array:
  """Image score: max of raw patch scores ("reference") or of the map ("paper", Eq. 10)."""
  if mode == "reference":
    return patch_scores.reshape(patch_scores.shape[0], -1).max(-1)
  if mode == "paper":
    return smoothed_map.reshape(smoothed_map.shape[0], -1).max(-1)
  raise ValueError(f"unknown image score mode {mode!r}; use 'reference' or 'paper'")
