"""The object classes: ``gear`` (a spur gear with lightening holes on a plain background;
defects hole, missing_tooth, scratch) and ``chip`` (an IC package with gull-wing pins on a PCB;
defects bent_pin, chipped_body, missing_pin).

A renderer takes (rng, size, defect) and returns (float RGB image in [0, 1], bool mask or None,
yy, xx); ``images.render`` adds the lighting and noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cras_jax.data.synthetic import draw

# ----------------------------------------------------------------------------
# gear: spur gear on a plain background; defects: missing_tooth, scratch, hole
# ----------------------------------------------------------------------------


def render_gear(rng, size, defect):
  # One drawing recipe, read top to bottom (so longer than ~80 lines): the order of its random
  # draws fixes the generated images, so splitting it must keep that order exactly.
  s = size / 160.0
  yy, xx = draw.grid(size)
  cx, cy = size / 2 + rng.uniform(-7, 7, 2) * s
  rot = rng.uniform(-0.1, 0.1)  # an aligned part with some rotation jitter (about 6 degrees)
  n_teeth = 10
  r_out, r_root = 0.42 * size, 0.34 * size
  r_bore, r_hub = 0.08 * size, 0.155 * size
  n_holes, r_h = 5, 0.055 * size
  r_hc = 0.5 * (r_hub + r_root)
  dx, dy = xx - cx, yy - cy
  r = np.hypot(dx, dy)
  phi_img = np.arctan2(dy, dx)
  phi = phi_img - rot
  pitch = 2 * np.pi / n_teeth
  k = np.round(phi / pitch)
  delta = phi - k * pitch
  k = k.astype(np.int64) % n_teeth
  # trapezoidal tooth: half-width (in px) shrinking from root to tip
  t = np.clip((r - r_root) / (r_out - r_root), 0, 1)
  half_w = (8.5 - 3.5 * t) * s
  sd_tooth = np.maximum(np.maximum(r - r_out, np.abs(delta) * r - half_w), r_root - 2 * s - r)

  def holes_sd(extra=()):
    sd = r_bore - r
    # keyway
    kc, ks = np.cos(rot), np.sin(rot)
    ku = dx * kc + dy * ks
    kv = -dx * ks + dy * kc
    sd = np.maximum(sd, -draw.box_sd(ku - r_bore, kv, 4 * s, 3 * s))
    hole = np.full_like(r, np.inf)
    for i in range(n_holes):
      a = rot + (i + 0.5) * 2 * np.pi / n_holes
      hole = np.minimum(
          hole, np.hypot(xx - cx - r_hc * np.cos(a), yy - cy - r_hc * np.sin(a)) - r_h
      )
    for hx, hy, hr in extra:
      hole = np.minimum(hole, np.hypot(xx - hx, yy - hy) - hr)
    return sd, hole

  def gear_cov(sd_t, extra=()):
    sd = np.minimum(r - r_root, sd_t)
    bore_sd, hole = holes_sd(extra)
    sd = np.maximum(sd, bore_sd)
    sd = np.maximum(sd, -hole)
    return draw.cov(sd)

  cov = gear_cov(sd_tooth)
  cov_def = cov
  mask = None
  scratch = None
  if defect == "missing_tooth":
    n_miss = 1 if rng.uniform() < 0.6 else 2
    k0 = int(rng.integers(n_teeth))
    missing = np.isin(k, [(k0 + j) % n_teeth for j in range(n_miss)])
    # broken off at a ragged line near the root
    r_break = r_root + rng.uniform(0.0, 0.25) * (r_out - r_root)
    r_break = r_break + 1.2 * s * np.sin(delta * r / (2.5 * s) + rng.uniform(0, 6.3))
    sd_t = np.where(missing, np.maximum(sd_tooth, r - r_break), sd_tooth)
    cov_def = gear_cov(sd_t)
    mask = (cov > 0.5) & (cov_def < 0.5)
  elif defect == "hole":
    for _ in range(100):
      rr = rng.uniform(r_hub + 6 * s, r_root - 6 * s)
      aa = rng.uniform(0, 2 * np.pi)
      hr = rng.uniform(5.5, 7.0) * s
      hx, hy = cx + rr * np.cos(aa), cy + rr * np.sin(aa)
      ok = True
      for i in range(n_holes):
        a = rot + (i + 0.5) * 2 * np.pi / n_holes
        if np.hypot(hx - cx - r_hc * np.cos(a), hy - cy - r_hc * np.sin(a)) < r_h + hr + 3 * s:
          ok = False
      if ok:
        break
    cov_def = gear_cov(sd_tooth, extra=((hx, hy, hr),))
    mask = (cov > 0.5) & (cov_def < 0.5)
  elif defect == "scratch":
    rr0, rr1 = rng.uniform(r_hub + 3 * s, r_root - 3 * s, 2)
    a0 = rng.uniform(0, 2 * np.pi)
    a1 = a0 + rng.choice([-1, 1]) * rng.uniform(0.9, 1.4)
    p0 = np.array([cx + rr0 * np.cos(a0), cy + rr0 * np.sin(a0)])
    p2 = np.array([cx + rr1 * np.cos(a1), cy + rr1 * np.sin(a1)])
    pc = 0.5 * (p0 + p2) + rng.normal(0, 6 * s, 2)
    scratch = draw.stroke(draw.bezier(p0, pc, p2), yy, xx, rng.uniform(3.0, 4.0) * s, 0.4)
    scratch = scratch * (cov > 0.5)
    mask = scratch > 0.5

  # metal: turned surface with anisotropic reflection, hub groove, bevelled edges
  light_ang = rng.uniform(-0.4, 0.4)
  metal = draw.as_rgb((0.70, 0.69, 0.66))
  aniso = 0.84 + 0.13 * np.cos(2 * (phi_img - light_ang))
  rings = 0.035 * np.sin(2 * np.pi * r / (2.4 * s) + 0.8 * draw.smooth_noise(rng, size, 2 * s))
  hub = np.where(r < r_hub, 1.05, 1.0) * (1 - 0.45 * np.exp(-(((r - r_hub) / (1.4 * s)) ** 2)))
  shade = aniso * (1 + rings) * hub
  shade = shade * (1 + 0.03 * draw.smooth_noise(rng, size, 0.7 * s))
  if scratch is not None:
    streak = 1.0 + 0.15 * draw.smooth_noise(rng, size, 0.6 * s)
    shade = shade * (1 - scratch * (1 - rng.uniform(0.5, 0.62) * streak))
  edge = np.clip(cov_def - ndimage.gaussian_filter(cov_def, 1.3 * s), 0, 0.5)
  shade = shade * (1 - 1.1 * edge)
  bg_col = draw.as_rgb((0.20, 0.22, 0.25))
  bg_var = (
      1 + 0.06 * draw.smooth_noise(rng, size, 10 * s) + 0.03 * draw.smooth_noise(rng, size, 1.0 * s)
  )
  bg = bg_col * bg_var[..., None]
  sh = ndimage.gaussian_filter(ndimage.shift(cov_def, (3 * s, 3 * s), order=1), 3 * s)
  bg = bg * (1 - 0.45 * sh)[..., None]
  img = metal * shade[..., None] * cov_def[..., None] + bg * (1 - cov_def[..., None])
  if mask is not None and defect != "scratch":
    mask = ndimage.binary_dilation(mask, iterations=1)
  return img, mask, yy, xx


# ----------------------------------------------------------------------------
# chip: IC package with gull-wing pins on a PCB; defects: bent_pin, missing_pin,
# chipped_body
# ----------------------------------------------------------------------------

_GLYPH_RNG = np.random.default_rng(20240611)
_MARKING = _GLYPH_RNG.random((2, 8, 5, 3)) < 0.55  # fixed package marking (2 lines x 8 chars)
_SILK_TEXT = _GLYPH_RNG.random((1, 3, 5, 3)) < 0.6  # fixed reference designator


def _glyph_ink(u, v, glyphs, cell, s):
  """Soft ink coverage of a block-font text ``glyphs`` (lines, chars, 5, 3) centred at u=v=0."""
  n_lines, n_chars = glyphs.shape[:2]
  gx = np.floor((u + n_chars * 4 * cell / 2) / cell).astype(np.int64)
  gy = np.floor((v + n_lines * 6 * cell / 2) / cell).astype(np.int64)
  line, row = np.divmod(gy, 6)
  char, colm = np.divmod(gx, 4)
  valid = (gx >= 0) & (gy >= 0) & (line < n_lines) & (char < n_chars) & (row < 5) & (colm < 3)
  ink = np.zeros(u.shape, dtype=np.float64)
  ink[valid] = glyphs[line[valid], char[valid], row[valid], colm[valid]]
  return ndimage.gaussian_filter(ink, 0.5 * s)


def render_chip(rng, size, defect):
  # One drawing recipe, read top to bottom (so longer than ~80 lines): the order of its random
  # draws fixes the generated images, so splitting it must keep that order exactly.
  s = size / 160.0
  yy, xx = draw.grid(size)
  cx, cy = size / 2 + rng.uniform(-7, 7, 2) * s
  theta = rng.uniform(-0.1, 0.1)
  dx, dy = xx - cx, yy - cy
  u = dx * np.cos(theta) + dy * np.sin(theta)
  v = -dx * np.sin(theta) + dy * np.cos(theta)
  body_l, body_w = 0.62 * size, 0.34 * size
  n_pins = 5
  pitch = body_l / n_pins
  pw, pl = 8.5 * s, 21.0 * s
  foot0 = 0.62 * pl  # the foot (soldered onto the pad) starts here

  # nearest pin of every pixel
  side = np.where(v >= 0, 1.0, -1.0)
  k = np.clip(np.round(u / pitch + (n_pins - 1) / 2), 0, n_pins - 1)
  pid = (k + n_pins * (side > 0)).astype(np.int64)
  pu = u - (k - (n_pins - 1) / 2) * pitch  # across the pin
  pv = side * v - body_w / 2  # outwards from the body edge

  def pin_sd(pu_, pv_):
    return draw.box_sd(pu_, pv_ - pl / 2 + 1.0 * s, pw / 2, pl / 2 + 1.0 * s, 0.6 * s)

  def pin_shade(pu_, pv_):
    t = np.clip(pv_ / pl, 0, 1)
    sh = 0.74 + 0.3 * np.exp(-(((t - 0.28) / 0.12) ** 2)) - 0.2 * np.exp(-(((t - 0.5) / 0.07) ** 2))
    return sh * (0.85 + 0.15 * np.cos(np.pi * np.clip(pu_ / pw, -0.5, 0.5)))

  # board: green solder mask, copper traces under it, tinned pads, white silkscreen
  board = (
      draw.as_rgb((0.20, 0.35, 0.26)) * (1 + 0.05 * draw.smooth_noise(rng, size, 10 * s))[..., None]
  )
  trace = draw.cov(np.maximum(np.abs(pu) - 1.8 * s, pl - pv))
  board = board * (1 + 0.22 * trace)[..., None]
  silk_col = draw.as_rgb((0.80, 0.81, 0.77))
  ends = np.abs(np.abs(u) - (body_l / 2 + 6 * s)) - 1.0 * s
  silk = draw.cov(np.maximum(ends, np.abs(v) - (body_w / 2 + 0.4 * pl)))
  silk = np.maximum(
      silk, draw.cov(np.hypot(u + body_l / 2 + 6 * s, v + body_w / 2 + pl + 5 * s) - 2.2 * s)
  )
  ref_text = _glyph_ink(
      u - body_l / 2 - 4 * s, v - body_w / 2 - pl - 10 * s, _SILK_TEXT, 2.0 * s, s
  )
  silk = np.maximum(silk, ref_text)
  silk = np.clip(silk, 0, 1)[..., None]
  board = board * (1 - silk) + silk_col * silk
  pad = draw.cov(
      draw.box_sd(
          pu, pv - (foot0 + pl + 2 * s) / 2, pw / 2 + 2 * s, (pl + 2 * s - foot0) / 2, 1.0 * s
      )
  )
  pad_col = (
      draw.as_rgb((0.55, 0.53, 0.46))
      * (1 + 0.05 * draw.smooth_noise(rng, size, 1.2 * s))[..., None]
  )
  img = board * (1 - pad[..., None]) + pad_col * pad[..., None]

  # pins
  sd_pins = pin_sd(pu, pv)
  normal_pins = draw.cov(sd_pins)
  shade = pin_shade(pu, pv)
  mask = None
  body_sd = draw.box_sd(u, v, body_l / 2, body_w / 2, 3 * s)
  if defect == "missing_pin":
    missing = int(rng.integers(2 * n_pins))
    sd_pins = np.where(pid == missing, np.inf, sd_pins)
  elif defect == "bent_pin":
    bent = int(rng.integers(2 * n_pins))
    bside = 1.0 if bent >= n_pins else -1.0
    bu = u - (bent % n_pins - (n_pins - 1) / 2) * pitch
    bv = bside * v - body_w / 2
    ang = rng.choice([-1, 1]) * rng.uniform(0.45, 0.75)
    ru = bu * np.cos(ang) - bv * np.sin(ang)
    rv = bu * np.sin(ang) + bv * np.cos(ang)
    sd_bent = pin_sd(ru, rv)
    sd_pins = np.where(pid == bent, np.inf, sd_pins)
    use_bent = sd_bent < sd_pins
    shade = np.where(use_bent, pin_shade(ru, rv), shade)
    sd_pins = np.minimum(sd_pins, sd_bent)
  elif defect == "chipped_body":
    # a chunk broken off the package edge: notch + rough fracture surface
    if rng.uniform() < 0.5:
      bx, by = rng.choice([-1, 1]) * body_l / 2, rng.choice([-1, 1]) * body_w / 2
    else:
      bx, by = rng.uniform(-0.4, 0.4) * body_l, rng.choice([-1, 1]) * body_w / 2
    bx, by = bx + rng.normal(0, 1.5 * s), by + rng.normal(0, 1.5 * s)
    r = rng.uniform(12.0, 15.0) * s
    frac_sd = draw.blob_sd(rng, v, u, bx, by, r, 0.3)  # in body coordinates
    notch_sd = frac_sd + 0.3 * r
    old_body = draw.cov(body_sd)
    body_sd = np.maximum(body_sd, -notch_sd)
    fracture = draw.cov(frac_sd) * draw.cov(body_sd)
  pin_cov = draw.cov(sd_pins)
  silver = draw.as_rgb((0.74, 0.74, 0.72))
  pin_img = silver * (shade * (1 + 0.03 * draw.smooth_noise(rng, size, 0.7 * s)))[..., None]
  img = img * (1 - pin_cov[..., None]) + pin_img * pin_cov[..., None]

  # body: black epoxy with bevelled top edge, pin-1 dot and printed marking
  bc = draw.cov(body_sd)
  body = (
      draw.as_rgb((0.15, 0.15, 0.16))
      * (1 + 0.05 * draw.smooth_noise(rng, size, 0.8 * s))[..., None]
  )
  bevel = np.exp(-(((body_sd + 2.0 * s) / (1.2 * s)) ** 2))
  body = body * (1 + 0.8 * bevel)[..., None]
  dot = draw.cov(np.hypot(u + body_l / 2 - 8 * s, v - body_w / 2 + 8 * s) - 3.2 * s)
  body = body * (1 - 0.35 * dot)[..., None]
  ink = _glyph_ink(u, v, _MARKING, 1.7 * s, s)[..., None]
  body = body * (1 - ink) + draw.as_rgb((0.55, 0.55, 0.53)) * ink
  if defect == "chipped_body":
    rough = (
        1.0
        + 0.25 * draw.smooth_noise(rng, size, 0.7 * s)
        + 0.1 * draw.smooth_noise(rng, size, 2.0 * s)
    )
    fcol = draw.as_rgb((0.21, 0.21, 0.22)) * rough[..., None]
    body = body * (1 - fracture[..., None]) + fcol * fracture[..., None]
  # shadow of the body on the board
  sh = ndimage.gaussian_filter(ndimage.shift(bc, (2.5 * s, 2.5 * s), order=1), 2.5 * s)
  img = img * (1 - 0.4 * sh * (1 - pin_cov))[..., None]
  img = img * (1 - bc[..., None]) + body * bc[..., None]

  if defect in ("missing_pin", "bent_pin"):
    mask = ndimage.binary_dilation(np.abs(normal_pins - pin_cov) > 0.5, iterations=1)
    mask &= bc < 0.5
  elif defect == "chipped_body":
    mask = (old_body > 0.5) & (draw.cov(frac_sd) > 0.5)
  return img, mask, yy, xx
