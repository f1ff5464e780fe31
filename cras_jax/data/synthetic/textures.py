"""The texture classes: ``fabric`` (plain-weave cloth; defects cut, misweave, stain) and
``granite`` (granular stone; defects crack, pit, worn).

A renderer takes (rng, size, defect) and returns (float RGB image in [0, 1], bool mask or None,
yy, xx); ``images.render`` adds the lighting and noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cras_jax.data.synthetic import draw

# ----------------------------------------------------------------------------
# fabric: plain weave cloth; defects: cut, misweave (float thread), stain
# ----------------------------------------------------------------------------


def _weave(rng, yy, xx, s):
  theta = rng.uniform(-0.14, 0.14)
  period = 11.0 * s * rng.uniform(0.96, 1.04)
  u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, 2 * period)
  v = -xx * np.sin(theta) + yy * np.cos(theta) + rng.uniform(0, 2 * period)
  return u, v, period, theta


def render_fabric(rng, size, defect):
  # One drawing recipe, read top to bottom (so longer than ~80 lines): the order of its random
  # draws fixes the generated images, so splitting it must keep that order exactly.
  s = size / 160.0
  yy, xx = draw.grid(size)
  u, v, period, theta = _weave(rng, yy, xx, s)
  iu, fu = np.divmod(u / period, 1.0)
  iv, fv = np.divmod(v / period, 1.0)
  iu = iu.astype(np.int64)
  iv = iv.astype(np.int64)
  warp_on_top = (iu + iv) % 2 == 0
  jit_u = 1.0 + 0.05 * rng.standard_normal(64)
  jit_v = 1.0 + 0.05 * rng.standard_normal(64)

  def prof(f):
    return np.sin(np.pi * np.clip(f, 0, 1)) ** 0.6

  warp_col = draw.as_rgb((0.38, 0.44, 0.55))
  weft_col = draw.as_rgb((0.47, 0.49, 0.54))
  fibre = 0.03 * draw.smooth_noise(rng, size, 0.6 * s)
  # fibre streaks running along each thread
  streak_warp = draw.smooth_noise(rng, size, (3.0 * s, 0.5 * s))
  streak_weft = draw.smooth_noise(rng, size, (0.5 * s, 3.0 * s))
  warp_h = prof(fu) * (0.78 + 0.22 * prof(fv))
  weft_h = prof(fv) * (0.78 + 0.22 * prof(fu))
  h = np.where(warp_on_top, warp_h, weft_h)
  jit = np.where(warp_on_top, jit_u[iu % 64], jit_v[iv % 64])
  col = np.where(warp_on_top[..., None], warp_col, weft_col)
  streak = np.where(warp_on_top, streak_warp, streak_weft)
  shade = (0.5 + 0.5 * h) * jit * (1.0 + fibre + 0.06 * streak)
  img = col * shade[..., None]
  low = 1.0 + 0.04 * draw.smooth_noise(rng, size, 12 * s)
  img = img * low[..., None]
  mask = None

  if defect == "cut":
    # a slit through the cloth showing the (dark) gaps behind, frayed edges
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    ang = rng.uniform(0, np.pi)
    length = rng.uniform(45, 70) * s
    d = np.array([np.cos(ang), np.sin(ang)]) * length / 2
    ctrl = np.array([cx, cy]) + rng.normal(0, 10 * s, 2)
    pts = draw.bezier(np.array([cx, cy]) - d, ctrl, np.array([cx, cy]) + d)
    hw = rng.uniform(3.8, 5.0) * s
    dist, param = draw.polyline_distance(pts, yy, xx)
    hw_map = hw * (0.45 + 0.55 * np.sin(np.pi * param) ** 0.5)
    fray = 1.2 * s * draw.smooth_noise(rng, size, 0.8 * s)
    c = draw.cov(dist - hw_map - fray)
    core = draw.cov(dist - 0.5 * hw_map - 0.5 * fray)
    rim = (c - core)[..., None]
    gap = (
        col
        * (0.42 + 0.1 * h[..., None])
        * (1.0 + 0.12 * draw.smooth_noise(rng, size, 0.7 * s))[..., None]
    )
    # frayed thread ends at the edges of the slit, catching the light
    frayed = col * (0.9 + 0.12 * draw.smooth_noise(rng, size, 0.6 * s))[..., None]
    img = img * (1 - c[..., None]) + gap * core[..., None] + frayed * rim
    mask = c > 0.5
  elif defect == "misweave":
    # a thread floating over the weave (no crossings) for a long stretch
    along = theta + np.pi / 2 + rng.uniform(-0.06, 0.06)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    length = rng.uniform(55, 85) * s
    du, dv = xx - cx, yy - cy
    a = du * np.cos(along) + dv * np.sin(along)
    b = -du * np.sin(along) + dv * np.cos(along)
    half_w = 0.5 * period * rng.uniform(0.85, 1.0)
    bw = half_w * (1.0 + 0.08 * np.sin(a / (4 * s)))
    sd = np.maximum(np.abs(b) - bw, np.abs(a) - length / 2)
    c = draw.cov(sd, 1.0)
    fb = np.clip(1 - (b / bw) ** 2, 0, 1) ** 0.5
    twist = 0.9 + 0.1 * np.sin(a / (2.2 * s) + 2.0 * b / bw)
    float_col = weft_col * ((0.6 + 0.45 * fb) * twist * (1.0 + fibre))[..., None]
    img = img * (1 - c[..., None]) + float_col * c[..., None]
    mask = c > 0.5
  elif defect == "stain":
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(13, 19) * s
    sd = draw.blob_sd(rng, yy, xx, cx, cy, r, 0.3, rng.uniform(1.0, 1.6), rng.uniform(0, np.pi))
    c = draw.cov(sd, 3.0 * s)
    if rng.uniform() < 0.5:  # dark, warm (oil / dirt)
      tint = np.array([0.92, 0.86, 0.76]) * rng.uniform(0.82, 0.9)
    else:  # bleached: lighter and less blue
      tint = np.array([1.3, 1.27, 1.17]) * rng.uniform(0.97, 1.03)
    # dye pulled along the threads: stain is stronger where the cloth is raised
    fac = 1.0 - c[..., None] * (1.0 - tint)[None, None, :]
    img = img * fac
    mask = c > 0.5
  return img, mask, yy, xx


# ----------------------------------------------------------------------------
# granite: granular stone; defects: crack, pit, worn (polished-smooth patch)
# ----------------------------------------------------------------------------


def render_granite(rng, size, defect):
  s = size / 160.0
  yy, xx = draw.grid(size)
  base = draw.as_rgb((0.57, 0.53, 0.49))
  dark = draw.as_rgb((0.27, 0.26, 0.28))
  light = draw.as_rgb((0.78, 0.74, 0.68))
  red = draw.as_rgb((0.55, 0.39, 0.34))
  img = base * (1.0 + 0.06 * draw.smooth_noise(rng, size, 6 * s))[..., None]
  img = img * (1.0 + 0.05 * draw.smooth_noise(rng, size, 1.0 * s))[..., None]
  for col, sig, thr in ((red, 1.6, 1.5), (light, 2.0, 1.2), (dark, 1.6, 1.25)):
    n = draw.smooth_noise(rng, size, sig * s)
    c = np.clip((n - thr) * 3.0, 0, 1)[..., None]
    img = img * (1 - c) + col * (1.0 + 0.05 * n[..., None]) * c
  img = img * (1.0 + 0.04 * rng.standard_normal((size, size)))[..., None]
  mask = None

  if defect == "crack":
    start = rng.uniform(0.2, 0.8, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    n_steps = int(rng.integers(14, 20))
    pts = draw.random_walk(rng, start, heading, n_steps, 4.0 * s, 0.35)
    pts = np.clip(pts, 2, size - 2)
    dist, param = draw.polyline_distance(pts, yy, xx)
    hw = rng.uniform(3.0, 4.0) * s * (0.4 + 0.6 * np.sin(np.pi * param) ** 0.5)
    c = draw.cov(dist - hw)
    core = draw.cov(dist - 0.45 * hw)
    rim = (c - core)[..., None]
    shade = (1.0 + 0.1 * draw.smooth_noise(rng, size, 0.8 * s))[..., None]
    crack = dark * 0.95 * shade * core[..., None] + light * 0.95 * shade * rim
    img = img * (1 - c[..., None]) + crack
    mask = c > 0.5
  elif defect == "pit":
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(7.0, 10.0) * s
    sd = draw.blob_sd(rng, yy, xx, cx, cy, r, 0.15)
    c = draw.cov(sd)[..., None]
    la = rng.uniform(0, 2 * np.pi)
    proj = ((xx - cx) * np.cos(la) + (yy - cy) * np.sin(la)) / r
    # concave: lit from one side, shadowed on the other, rough bottom
    t = np.clip(0.5 + 0.5 * proj, 0, 1)[..., None]
    bottom = dark * (1 - t) + base * t
    bottom = bottom * (1.0 + 0.12 * draw.smooth_noise(rng, size, 0.8 * s))[..., None]
    rim = np.clip(1 - np.abs(sd + 1.5 * s) / (1.5 * s), 0, 1)[..., None]
    bottom = bottom * (1 - rim) + light * rim
    img = img * (1 - c) + bottom * c
    mask = c[..., 0] > 0.5
  elif defect == "worn":
    # polished / abraded patch: grains smeared to the stone's mean colour
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(14, 19) * s
    sd = draw.blob_sd(rng, yy, xx, cx, cy, r, 0.25, rng.uniform(1.0, 1.5), rng.uniform(0, np.pi))
    c = draw.cov(sd, 2.0 * s)[..., None]
    smooth = ndimage.gaussian_filter(img, (4 * s, 4 * s, 0), mode="reflect")
    smooth = smooth * (1.0 + 0.03 * draw.smooth_noise(rng, size, 1.0 * s))[..., None]
    img = img * (1 - c) + smooth * c
    mask = c[..., 0] > 0.5
  return img, mask, yy, xx
