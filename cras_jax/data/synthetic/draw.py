"""Drawing primitives of the synthetic images: vectorised numpy on an S x S pixel grid.

Signed distances (negative inside) and their anti-aliased coverage, noise fields, strokes
along polylines, and the global lighting and sensor noise every image gets last.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Array = np.ndarray


def grid(size: int) -> tuple[Array, Array]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  return yy + 0.5, xx + 0.5


def smooth_noise(rng, size: int, sigma) -> Array:
  """Zero-mean, unit-std Gaussian-filtered white noise."""
  n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
  return (n - n.mean()) / (n.std() + 1e-8)


def cov(sd: Array, soft: float = 1.0) -> Array:
  """Anti-aliased coverage from a signed distance (negative inside)."""
  return np.clip(0.5 - sd / soft, 0.0, 1.0)


def blob_sd(rng, yy, xx, cx, cy, radius, irregularity=0.2, aspect=1.0, angle=0.0) -> Array:
  """Signed distance (approx.) of an irregular blob with a wobbly boundary."""
  dx, dy = xx - cx, yy - cy
  c, s = np.cos(angle), np.sin(angle)
  u = (dx * c + dy * s) / aspect
  v = -dx * s + dy * c
  ang = np.arctan2(v, u)
  dist = np.hypot(u, v)
  rad = np.ones_like(ang)
  for k in range(2, 6):
    rad += rng.normal(0.0, irregularity / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
  return (dist - radius * np.clip(rad, 0.5, 1.6)) * min(aspect, 1.0)


def polyline_distance(pts: Array, yy: Array, xx: Array) -> tuple[Array, Array]:
  """Distance of every pixel to a polyline ``pts`` (K, 2) given as (x, y).

  Returns (distance, arclength parameter in [0, 1] of the nearest point).
  """
  a = pts[:-1]
  b = pts[1:]
  ab = b - a
  l2 = np.maximum((ab**2).sum(-1), 1e-9)
  px = xx.reshape(-1, 1)
  py = yy.reshape(-1, 1)
  t = ((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / l2
  t = np.clip(t, 0.0, 1.0)
  qx = a[:, 0] + t * ab[:, 0]
  qy = a[:, 1] + t * ab[:, 1]
  d2 = (px - qx) ** 2 + (py - qy) ** 2
  k = np.argmin(d2, axis=1)
  rows = np.arange(d2.shape[0])
  dist = np.sqrt(d2[rows, k]).reshape(yy.shape)
  param = ((k + t[rows, k]) / len(a)).reshape(yy.shape)
  return dist, param


def stroke(pts: Array, yy: Array, xx: Array, halfwidth: float, taper: float = 0.5) -> Array:
  """Anti-aliased coverage of a thick stroke along a polyline, tapered at the ends."""
  dist, param = polyline_distance(pts, yy, xx)
  hw = halfwidth * (taper + (1.0 - taper) * np.sin(np.pi * param) ** 0.5)
  return cov(dist - hw)


def bezier(p0, p1, p2, n=40) -> Array:
  t = np.linspace(0.0, 1.0, n)[:, None]
  p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def random_walk(rng, start, heading, n_steps, step, wiggle) -> Array:
  pts = [np.asarray(start, dtype=np.float64)]
  h = heading
  for _ in range(n_steps):
    h += rng.normal(0.0, wiggle)
    pts.append(pts[-1] + step * np.array([np.cos(h), np.sin(h)]))
  return np.stack(pts)


def box_sd(u: Array, v: Array, hu: float, hv: float, radius: float = 0.0) -> Array:
  """Signed distance to an axis-aligned (rounded) box centred at the origin."""
  qu = np.abs(u) - (hu - radius)
  qv = np.abs(v) - (hv - radius)
  outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
  inside = np.minimum(np.maximum(qu, qv), 0.0)
  return outside + inside - radius


def finish(rng, img: Array, yy: Array, xx: Array) -> Array:
  """Global lighting (gain, contrast, white balance, gradient) + sensor noise."""
  size = img.shape[0]
  gain = rng.uniform(0.84, 1.16)
  contrast = rng.uniform(0.88, 1.12)
  wb = 1.0 + rng.uniform(-0.04, 0.04, size=3)
  ang = rng.uniform(0.0, 2.0 * np.pi)
  amp = rng.uniform(0.0, 0.16)
  grad = 1.0 + amp * ((xx - size / 2) * np.cos(ang) + (yy - size / 2) * np.sin(ang)) / size
  mean = img.mean()
  img = (img - mean) * contrast + mean
  img = img * (gain * wb)[None, None, :] * grad[..., None]
  img = img + rng.normal(0.0, rng.uniform(0.008, 0.016), size=img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def as_rgb(col) -> Array:
  return np.asarray(col, dtype=np.float64)[None, None, :]
