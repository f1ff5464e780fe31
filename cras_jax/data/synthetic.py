"""Deterministic synthetic multi-class industrial anomaly dataset (MVTec AD layout).

The generator produces a small dataset that is good enough to exercise the whole
CRAS pipeline (training on normal images of several classes with one model,
image- and pixel-level AUROC evaluation) in a few minutes on a CPU:

* two texture classes (``fabric``: plain-weave cloth, ``granite``: granular
  stone with random grains) and two object classes (``gear``: a spur gear with
  lightening holes on a plain background, ``chip``: an IC package with gull-wing
  pins on a PCB);
* normal variation: object position/rotation jitter, texture phase/orientation
  jitter, per-image gain / contrast / white balance, a smooth illumination
  gradient and sensor noise;
* 3 defect kinds per class with pixel-accurate masks.  Defects are made of
  colours that also occur in normal images (a cut shows the weave's own dark
  gaps, a missing tooth shows the background, a worn patch of stone has the
  stone's mean colour, ...), so that a per-pixel colour threshold does not solve
  the pixel-level task, while the local *structure* clearly differs.

Layout written under ``root``::

    <root>/<class>/train/good/000.png
    <root>/<class>/test/good/000.png
    <root>/<class>/test/<defect>/000.png
    <root>/<class>/ground_truth/<defect>/000_mask.png   (0/255, same size)
    <root>/synthetic_manifest.json

Every image is drawn from its own ``np.random.default_rng`` seeded with
(seed, class, split, defect, index), so any single image is reproducible on its
own.  ``generate`` is idempotent: when the manifest in ``root`` matches the
requested parameters nothing is written; otherwise the dataset is generated into
a temporary sibling directory which is then renamed into place (an interrupted
generation never leaves a complete-looking tree behind).

Command line::

    python -m cras_jax.data.synthetic --root=DIR [--seed=0] [--image-size=160]
        [--contact-sheet=sheet.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "CLASSES",
    "TEXTURE_CLASSES",
    "OBJECT_CLASSES",
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "generate",
    "render",
    "make_contact_sheet",
    "main",
]

# Bump whenever the rendered pixels change: a cached tree with an older version in its
# manifest is then regenerated instead of being silently reused.
GENERATOR_VERSION = 3
MANIFEST_NAME = "synthetic_manifest.json"

TEXTURE_CLASSES: Tuple[str, ...] = ("fabric", "granite")
OBJECT_CLASSES: Tuple[str, ...] = ("chip", "gear")
CLASSES: Tuple[str, ...] = tuple(sorted(TEXTURE_CLASSES + OBJECT_CLASSES))

DEFECT_TYPES: Dict[str, Tuple[str, ...]] = {
    "chip": ("bent_pin", "chipped_body", "missing_pin"),
    "fabric": ("cut", "misweave", "stain"),
    "gear": ("hole", "missing_tooth", "scratch"),
    "granite": ("crack", "pit", "worn"),
}

_SPLIT_CODE = {"train": 1, "test": 2}

Array = np.ndarray


# ----------------------------------------------------------------------------
# seeding
# ----------------------------------------------------------------------------


def _key(name: str) -> int:
    """Stable (process-independent) integer key of a name."""
    return zlib.crc32(name.encode("utf-8"))


def _image_rng(seed: int, cls: str, split: str, defect: Optional[str], index: int):
    return np.random.default_rng(
        [int(seed), _key(cls), _SPLIT_CODE[split], _key(defect) if defect else 0, int(index)]
    )


# ----------------------------------------------------------------------------
# small drawing helpers (all vectorised numpy on an S x S grid)
# ----------------------------------------------------------------------------


def _grid(size: int) -> Tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _smooth_noise(rng, size: int, sigma) -> Array:
    """Zero-mean, unit-std Gaussian-filtered white noise."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _cov(sd: Array, soft: float = 1.0) -> Array:
    """Anti-aliased coverage from a signed distance (negative inside)."""
    return np.clip(0.5 - sd / soft, 0.0, 1.0)


def _blob_sd(rng, yy, xx, cx, cy, radius, irregularity=0.2, aspect=1.0, angle=0.0) -> Array:
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


def _polyline_distance(pts: Array, yy: Array, xx: Array) -> Tuple[Array, Array]:
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


def _stroke(pts: Array, yy: Array, xx: Array, halfwidth: float, taper: float = 0.5) -> Array:
    """Anti-aliased coverage of a thick stroke along a polyline, tapered at the ends."""
    dist, param = _polyline_distance(pts, yy, xx)
    hw = halfwidth * (taper + (1.0 - taper) * np.sin(np.pi * param) ** 0.5)
    return _cov(dist - hw)


def _bezier(p0, p1, p2, n=40) -> Array:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _random_walk(rng, start, heading, n_steps, step, wiggle) -> Array:
    pts = [np.asarray(start, dtype=np.float64)]
    h = heading
    for _ in range(n_steps):
        h += rng.normal(0.0, wiggle)
        pts.append(pts[-1] + step * np.array([np.cos(h), np.sin(h)]))
    return np.stack(pts)


def _box_sd(u: Array, v: Array, hu: float, hv: float, radius: float = 0.0) -> Array:
    """Signed distance to an axis-aligned (rounded) box centred at the origin."""
    qu = np.abs(u) - (hu - radius)
    qv = np.abs(v) - (hv - radius)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    inside = np.minimum(np.maximum(qu, qv), 0.0)
    return outside + inside - radius


def _finish(rng, img: Array, yy: Array, xx: Array) -> Array:
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


def _as_rgb(col) -> Array:
    return np.asarray(col, dtype=np.float64)[None, None, :]


# ----------------------------------------------------------------------------
# fabric: plain weave cloth; defects: cut, misweave (float thread), stain
# ----------------------------------------------------------------------------


def _weave(rng, yy, xx, s):
    theta = rng.uniform(-0.14, 0.14)
    period = 11.0 * s * rng.uniform(0.96, 1.04)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, 2 * period)
    v = -xx * np.sin(theta) + yy * np.cos(theta) + rng.uniform(0, 2 * period)
    return u, v, period, theta


def _render_fabric(rng, size, defect):
    s = size / 160.0
    yy, xx = _grid(size)
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

    warp_col = _as_rgb((0.38, 0.44, 0.55))
    weft_col = _as_rgb((0.47, 0.49, 0.54))
    fibre = 0.03 * _smooth_noise(rng, size, 0.6 * s)
    # fibre streaks running along each thread
    streak_warp = _smooth_noise(rng, size, (3.0 * s, 0.5 * s))
    streak_weft = _smooth_noise(rng, size, (0.5 * s, 3.0 * s))
    warp_h = prof(fu) * (0.78 + 0.22 * prof(fv))
    weft_h = prof(fv) * (0.78 + 0.22 * prof(fu))
    h = np.where(warp_on_top, warp_h, weft_h)
    jit = np.where(warp_on_top, jit_u[iu % 64], jit_v[iv % 64])
    col = np.where(warp_on_top[..., None], warp_col, weft_col)
    streak = np.where(warp_on_top, streak_warp, streak_weft)
    shade = (0.5 + 0.5 * h) * jit * (1.0 + fibre + 0.06 * streak)
    img = col * shade[..., None]
    low = 1.0 + 0.04 * _smooth_noise(rng, size, 12 * s)
    img = img * low[..., None]
    mask = None

    if defect == "cut":
        # a slit through the cloth showing the (dark) gaps behind, frayed edges
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(45, 70) * s
        d = np.array([np.cos(ang), np.sin(ang)]) * length / 2
        ctrl = np.array([cx, cy]) + rng.normal(0, 10 * s, 2)
        pts = _bezier(np.array([cx, cy]) - d, ctrl, np.array([cx, cy]) + d)
        hw = rng.uniform(3.8, 5.0) * s
        dist, param = _polyline_distance(pts, yy, xx)
        hw_map = hw * (0.45 + 0.55 * np.sin(np.pi * param) ** 0.5)
        fray = 1.2 * s * _smooth_noise(rng, size, 0.8 * s)
        c = _cov(dist - hw_map - fray)
        core = _cov(dist - 0.5 * hw_map - 0.5 * fray)
        rim = (c - core)[..., None]
        gap = col * (0.42 + 0.1 * h[..., None]) * (1.0 + 0.12 * _smooth_noise(rng, size, 0.7 * s))[..., None]
        # frayed thread ends at the edges of the slit, catching the light
        frayed = col * (0.9 + 0.12 * _smooth_noise(rng, size, 0.6 * s))[..., None]
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
        c = _cov(sd, 1.0)
        fb = np.clip(1 - (b / bw) ** 2, 0, 1) ** 0.5
        twist = 0.9 + 0.1 * np.sin(a / (2.2 * s) + 2.0 * b / bw)
        float_col = weft_col * ((0.6 + 0.45 * fb) * twist * (1.0 + fibre))[..., None]
        img = img * (1 - c[..., None]) + float_col * c[..., None]
        mask = c > 0.5
    elif defect == "stain":
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(13, 19) * s
        sd = _blob_sd(rng, yy, xx, cx, cy, r, 0.3, rng.uniform(1.0, 1.6), rng.uniform(0, np.pi))
        c = _cov(sd, 3.0 * s)
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


def _render_granite(rng, size, defect):
    s = size / 160.0
    yy, xx = _grid(size)
    base = _as_rgb((0.57, 0.53, 0.49))
    dark = _as_rgb((0.27, 0.26, 0.28))
    light = _as_rgb((0.78, 0.74, 0.68))
    red = _as_rgb((0.55, 0.39, 0.34))
    img = base * (1.0 + 0.06 * _smooth_noise(rng, size, 6 * s))[..., None]
    img = img * (1.0 + 0.05 * _smooth_noise(rng, size, 1.0 * s))[..., None]
    for col, sig, thr in ((red, 1.6, 1.5), (light, 2.0, 1.2), (dark, 1.6, 1.25)):
        n = _smooth_noise(rng, size, sig * s)
        c = np.clip((n - thr) * 3.0, 0, 1)[..., None]
        img = img * (1 - c) + col * (1.0 + 0.05 * n[..., None]) * c
    img = img * (1.0 + 0.04 * rng.standard_normal((size, size)))[..., None]
    mask = None

    if defect == "crack":
        start = rng.uniform(0.2, 0.8, 2) * size
        heading = rng.uniform(0, 2 * np.pi)
        n_steps = int(rng.integers(14, 20))
        pts = _random_walk(rng, start, heading, n_steps, 4.0 * s, 0.35)
        pts = np.clip(pts, 2, size - 2)
        dist, param = _polyline_distance(pts, yy, xx)
        hw = rng.uniform(3.0, 4.0) * s * (0.4 + 0.6 * np.sin(np.pi * param) ** 0.5)
        c = _cov(dist - hw)
        core = _cov(dist - 0.45 * hw)
        rim = (c - core)[..., None]
        shade = (1.0 + 0.1 * _smooth_noise(rng, size, 0.8 * s))[..., None]
        crack = dark * 0.95 * shade * core[..., None] + light * 0.95 * shade * rim
        img = img * (1 - c[..., None]) + crack
        mask = c > 0.5
    elif defect == "pit":
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(7.0, 10.0) * s
        sd = _blob_sd(rng, yy, xx, cx, cy, r, 0.15)
        c = _cov(sd)[..., None]
        la = rng.uniform(0, 2 * np.pi)
        proj = ((xx - cx) * np.cos(la) + (yy - cy) * np.sin(la)) / r
        # concave: lit from one side, shadowed on the other, rough bottom
        t = np.clip(0.5 + 0.5 * proj, 0, 1)[..., None]
        bottom = dark * (1 - t) + base * t
        bottom = bottom * (1.0 + 0.12 * _smooth_noise(rng, size, 0.8 * s))[..., None]
        rim = np.clip(1 - np.abs(sd + 1.5 * s) / (1.5 * s), 0, 1)[..., None]
        bottom = bottom * (1 - rim) + light * rim
        img = img * (1 - c) + bottom * c
        mask = c[..., 0] > 0.5
    elif defect == "worn":
        # polished / abraded patch: grains smeared to the stone's mean colour
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(14, 19) * s
        sd = _blob_sd(rng, yy, xx, cx, cy, r, 0.25, rng.uniform(1.0, 1.5), rng.uniform(0, np.pi))
        c = _cov(sd, 2.0 * s)[..., None]
        smooth = ndimage.gaussian_filter(img, (4 * s, 4 * s, 0), mode="reflect")
        smooth = smooth * (1.0 + 0.03 * _smooth_noise(rng, size, 1.0 * s))[..., None]
        img = img * (1 - c) + smooth * c
        mask = c[..., 0] > 0.5
    return img, mask, yy, xx


# ----------------------------------------------------------------------------
# gear: spur gear on a plain background; defects: missing_tooth, scratch, hole
# ----------------------------------------------------------------------------


def _render_gear(rng, size, defect):
    s = size / 160.0
    yy, xx = _grid(size)
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
        sd = np.maximum(sd, -_box_sd(ku - r_bore, kv, 4 * s, 3 * s))
        hole = np.full_like(r, np.inf)
        for i in range(n_holes):
            a = rot + (i + 0.5) * 2 * np.pi / n_holes
            hole = np.minimum(hole, np.hypot(xx - cx - r_hc * np.cos(a), yy - cy - r_hc * np.sin(a)) - r_h)
        for hx, hy, hr in extra:
            hole = np.minimum(hole, np.hypot(xx - hx, yy - hy) - hr)
        return sd, hole

    def gear_cov(sd_t, extra=()):
        sd = np.minimum(r - r_root, sd_t)
        bore_sd, hole = holes_sd(extra)
        sd = np.maximum(sd, bore_sd)
        sd = np.maximum(sd, -hole)
        return _cov(sd)

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
        scratch = _stroke(_bezier(p0, pc, p2), yy, xx, rng.uniform(3.0, 4.0) * s, 0.4)
        scratch = scratch * (cov > 0.5)
        mask = scratch > 0.5

    # metal: turned surface with anisotropic reflection, hub groove, bevelled edges
    light_ang = rng.uniform(-0.4, 0.4)
    metal = _as_rgb((0.70, 0.69, 0.66))
    aniso = 0.84 + 0.13 * np.cos(2 * (phi_img - light_ang))
    rings = 0.035 * np.sin(2 * np.pi * r / (2.4 * s) + 0.8 * _smooth_noise(rng, size, 2 * s))
    hub = np.where(r < r_hub, 1.05, 1.0) * (1 - 0.45 * np.exp(-(((r - r_hub) / (1.4 * s)) ** 2)))
    shade = aniso * (1 + rings) * hub
    shade = shade * (1 + 0.03 * _smooth_noise(rng, size, 0.7 * s))
    if scratch is not None:
        streak = 1.0 + 0.15 * _smooth_noise(rng, size, 0.6 * s)
        shade = shade * (1 - scratch * (1 - rng.uniform(0.5, 0.62) * streak))
    edge = np.clip(cov_def - ndimage.gaussian_filter(cov_def, 1.3 * s), 0, 0.5)
    shade = shade * (1 - 1.1 * edge)
    bg_col = _as_rgb((0.20, 0.22, 0.25))
    bg_var = 1 + 0.06 * _smooth_noise(rng, size, 10 * s) + 0.03 * _smooth_noise(rng, size, 1.0 * s)
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


def _render_chip(rng, size, defect):
    s = size / 160.0
    yy, xx = _grid(size)
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
        return _box_sd(pu_, pv_ - pl / 2 + 1.0 * s, pw / 2, pl / 2 + 1.0 * s, 0.6 * s)

    def pin_shade(pu_, pv_):
        t = np.clip(pv_ / pl, 0, 1)
        sh = 0.74 + 0.3 * np.exp(-(((t - 0.28) / 0.12) ** 2)) - 0.2 * np.exp(-(((t - 0.5) / 0.07) ** 2))
        return sh * (0.85 + 0.15 * np.cos(np.pi * np.clip(pu_ / pw, -0.5, 0.5)))

    # board: green solder mask, copper traces under it, tinned pads, white silkscreen
    board = _as_rgb((0.20, 0.35, 0.26)) * (1 + 0.05 * _smooth_noise(rng, size, 10 * s))[..., None]
    trace = _cov(np.maximum(np.abs(pu) - 1.8 * s, pl - pv))
    board = board * (1 + 0.22 * trace)[..., None]
    silk_col = _as_rgb((0.80, 0.81, 0.77))
    ends = np.abs(np.abs(u) - (body_l / 2 + 6 * s)) - 1.0 * s
    silk = _cov(np.maximum(ends, np.abs(v) - (body_w / 2 + 0.4 * pl)))
    silk = np.maximum(silk, _cov(np.hypot(u + body_l / 2 + 6 * s, v + body_w / 2 + pl + 5 * s) - 2.2 * s))
    ref_text = _glyph_ink(u - body_l / 2 - 4 * s, v - body_w / 2 - pl - 10 * s, _SILK_TEXT, 2.0 * s, s)
    silk = np.maximum(silk, ref_text)
    silk = np.clip(silk, 0, 1)[..., None]
    board = board * (1 - silk) + silk_col * silk
    pad = _cov(_box_sd(pu, pv - (foot0 + pl + 2 * s) / 2, pw / 2 + 2 * s, (pl + 2 * s - foot0) / 2, 1.0 * s))
    pad_col = _as_rgb((0.55, 0.53, 0.46)) * (1 + 0.05 * _smooth_noise(rng, size, 1.2 * s))[..., None]
    img = board * (1 - pad[..., None]) + pad_col * pad[..., None]

    # pins
    sd_pins = pin_sd(pu, pv)
    normal_pins = _cov(sd_pins)
    shade = pin_shade(pu, pv)
    mask = None
    body_sd = _box_sd(u, v, body_l / 2, body_w / 2, 3 * s)
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
        frac_sd = _blob_sd(rng, v, u, bx, by, r, 0.3)  # in body coordinates
        notch_sd = frac_sd + 0.3 * r
        old_body = _cov(body_sd)
        body_sd = np.maximum(body_sd, -notch_sd)
        fracture = _cov(frac_sd) * _cov(body_sd)
    pin_cov = _cov(sd_pins)
    silver = _as_rgb((0.74, 0.74, 0.72))
    pin_img = silver * (shade * (1 + 0.03 * _smooth_noise(rng, size, 0.7 * s)))[..., None]
    img = img * (1 - pin_cov[..., None]) + pin_img * pin_cov[..., None]

    # body: black epoxy with bevelled top edge, pin-1 dot and printed marking
    bc = _cov(body_sd)
    body = _as_rgb((0.15, 0.15, 0.16)) * (1 + 0.05 * _smooth_noise(rng, size, 0.8 * s))[..., None]
    bevel = np.exp(-(((body_sd + 2.0 * s) / (1.2 * s)) ** 2))
    body = body * (1 + 0.8 * bevel)[..., None]
    dot = _cov(np.hypot(u + body_l / 2 - 8 * s, v - body_w / 2 + 8 * s) - 3.2 * s)
    body = body * (1 - 0.35 * dot)[..., None]
    ink = _glyph_ink(u, v, _MARKING, 1.7 * s, s)[..., None]
    body = body * (1 - ink) + _as_rgb((0.55, 0.55, 0.53)) * ink
    if defect == "chipped_body":
        rough = 1.0 + 0.25 * _smooth_noise(rng, size, 0.7 * s) + 0.1 * _smooth_noise(rng, size, 2.0 * s)
        fcol = _as_rgb((0.21, 0.21, 0.22)) * rough[..., None]
        body = body * (1 - fracture[..., None]) + fcol * fracture[..., None]
    # shadow of the body on the board
    sh = ndimage.gaussian_filter(ndimage.shift(bc, (2.5 * s, 2.5 * s), order=1), 2.5 * s)
    img = img * (1 - 0.4 * sh * (1 - pin_cov))[..., None]
    img = img * (1 - bc[..., None]) + body * bc[..., None]

    if defect in ("missing_pin", "bent_pin"):
        mask = ndimage.binary_dilation(np.abs(normal_pins - pin_cov) > 0.5, iterations=1)
        mask &= bc < 0.5
    elif defect == "chipped_body":
        mask = (old_body > 0.5) & (_cov(frac_sd) > 0.5)
    return img, mask, yy, xx


_RENDERERS: Dict[str, Callable] = {
    "chip": _render_chip,
    "fabric": _render_fabric,
    "gear": _render_gear,
    "granite": _render_granite,
}

_MIN_MASK_FRACTION = 0.002


def render(cls: str, seed: int, split: str, index: int, defect: Optional[str] = None,
           image_size: int = 160) -> Tuple[Array, Optional[Array]]:
    """Render one image (H, W, 3) uint8 and its bool mask (None for good images).

    Depends only on its arguments, so every image is reproducible on its own.
    """
    if cls not in _RENDERERS:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if defect is not None and defect not in DEFECT_TYPES[cls]:
        raise ValueError(f"unknown defect {defect!r} for class {cls!r}")
    rng = _image_rng(seed, cls, split, defect, index)
    for _ in range(20):
        img, mask, yy, xx = _RENDERERS[cls](rng, image_size, defect)
        if defect is None or mask.mean() >= _MIN_MASK_FRACTION:
            break
    else:  # pragma: no cover - extremely unlikely
        raise RuntimeError(f"could not place a visible {defect} on {cls}")
    out = _finish(rng, img, yy, xx)
    return out, (None if defect is None else mask.astype(bool))


# ----------------------------------------------------------------------------
# dataset generation
# ----------------------------------------------------------------------------


def _manifest(seed, image_size, n_train, n_test_good, n_test_defect_per_type) -> dict:
    return {
        "generator": "cras_jax.data.synthetic",
        "version": GENERATOR_VERSION,
        "params": {
            "seed": int(seed),
            "image_size": int(image_size),
            "n_train": int(n_train),
            "n_test_good": int(n_test_good),
            "n_test_defect_per_type": int(n_test_defect_per_type),
        },
        "classes": list(CLASSES),
        "defect_types": {c: list(DEFECT_TYPES[c]) for c in CLASSES},
    }


def _read_manifest(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, MANIFEST_NAME), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fname(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def _expected_files(manifest: dict) -> List[str]:
    p = manifest["params"]
    files = []
    for cls in manifest["classes"]:
        for i in range(p["n_train"]):
            files.append(os.path.join(cls, "train", "good", _fname(i, p["n_train"]) + ".png"))
        for i in range(p["n_test_good"]):
            files.append(os.path.join(cls, "test", "good", _fname(i, p["n_test_good"]) + ".png"))
        n = p["n_test_defect_per_type"]
        for d in manifest["defect_types"][cls]:
            for i in range(n):
                files.append(os.path.join(cls, "test", d, _fname(i, n) + ".png"))
                files.append(os.path.join(cls, "ground_truth", d, _fname(i, n) + "_mask.png"))
    return files


def _is_complete(root: str, manifest: dict) -> bool:
    if _read_manifest(root) != manifest:
        return False
    return all(os.path.isfile(os.path.join(root, f)) for f in _expected_files(manifest))


def _save_png(path: str, arr: Array) -> None:
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=1)


def _write_tree(out: str, manifest: dict) -> None:
    p = manifest["params"]
    seed, size = p["seed"], p["image_size"]
    for cls in manifest["classes"]:
        jobs = [("train", None, p["n_train"]), ("test", None, p["n_test_good"])]
        jobs += [("test", d, p["n_test_defect_per_type"]) for d in manifest["defect_types"][cls]]
        for split, defect, n in jobs:
            sub = os.path.join(out, cls, split, defect or "good")
            os.makedirs(sub, exist_ok=True)
            if defect is not None:
                os.makedirs(os.path.join(out, cls, "ground_truth", defect), exist_ok=True)
            for i in range(n):
                img, mask = render(cls, seed, split, i, defect, size)
                _save_png(os.path.join(sub, _fname(i, n) + ".png"), img)
                if mask is not None:
                    _save_png(
                        os.path.join(out, cls, "ground_truth", defect, _fname(i, n) + "_mask.png"),
                        mask.astype(np.uint8) * 255,
                    )
    # the manifest is written last: its presence marks a complete tree
    with open(os.path.join(out, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def generate(root: str, seed: int = 0, image_size: int = 160, n_train: int = 40,
             n_test_good: int = 12, n_test_defect_per_type: int = 6) -> List[str]:
    """Generate (or reuse) the synthetic dataset under ``root``; return the class names.

    If ``root`` holds a manifest equal to the requested parameters (and all files are
    present) nothing is written.  Otherwise the dataset is written to a temporary
    sibling directory and renamed to ``root``, replacing an earlier generated tree.
    A non-empty ``root`` that was not made by this generator is never deleted.
    """
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if image_size < 32:
        raise ValueError("image_size must be >= 32")
    if min(n_train, n_test_good, n_test_defect_per_type) < 0:
        raise ValueError("image counts must be >= 0")
    manifest = _manifest(seed, image_size, n_train, n_test_good, n_test_defect_per_type)
    root = os.path.abspath(os.fspath(root))
    if _is_complete(root, manifest):
        return list(CLASSES)
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise FileExistsError(f"{root} exists and is not a directory")
        if os.listdir(root) and not os.path.exists(os.path.join(root, MANIFEST_NAME)):
            raise FileExistsError(
                f"{root} is a non-empty directory without {MANIFEST_NAME}; refusing to overwrite it"
            )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(root)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        _write_tree(tmp, manifest)
        old = None
        if os.path.exists(root):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(root, os.path.join(old, base))
        try:
            os.rename(tmp, root)
        except OSError:
            # someone else (e.g. a concurrent process) put a tree there meanwhile
            if not _is_complete(root, manifest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return list(CLASSES)


# ----------------------------------------------------------------------------
# contact sheet / CLI
# ----------------------------------------------------------------------------


def make_contact_sheet(root: str, out_path: str, n_good: int = 2, n_per_defect: int = 1) -> str:
    """Write a PNG grid: one row per class, good images then defect images with the
    mask outline drawn in red next to the raw defect image."""
    manifest = _read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}")
    rows = []
    for cls in manifest["classes"]:
        tiles = []
        for split in ("train", "test"):
            d = os.path.join(root, cls, split, "good")
            for f in sorted(os.listdir(d))[:n_good]:
                tiles.append(np.asarray(Image.open(os.path.join(d, f)).convert("RGB")))
        for defect in manifest["defect_types"][cls]:
            d = os.path.join(root, cls, "test", defect)
            for f in sorted(os.listdir(d))[:n_per_defect]:
                img = np.asarray(Image.open(os.path.join(d, f)).convert("RGB"))
                m = np.asarray(Image.open(os.path.join(
                    root, cls, "ground_truth", defect, f[:-4] + "_mask.png"))) > 127
                edge = m & ~ndimage.binary_erosion(m, iterations=1)
                over = img.copy()
                over[edge] = (255, 0, 0)
                tiles += [img, over]
        sep = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        row = []
        for t in tiles:
            row += [t, sep]
        rows.append(np.concatenate(row[:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    sheet = np.concatenate(rows, axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    Image.fromarray(sheet).save(out_path)
    return out_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="output directory (MVTec AD layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", "--image_size", type=int, default=160)
    ap.add_argument("--n-train", "--n_train", type=int, default=40)
    ap.add_argument("--n-test-good", "--n_test_good", type=int, default=12)
    ap.add_argument("--n-test-defect-per-type", "--n_test_defect_per_type", type=int, default=6)
    ap.add_argument("--contact-sheet", "--contact_sheet", default=None,
                    help="optionally also write a PNG overview to this path")
    a = ap.parse_args(argv)
    t0 = time.time()
    classes = generate(a.root, a.seed, a.image_size, a.n_train, a.n_test_good,
                       a.n_test_defect_per_type)
    print(f"synthetic dataset at {a.root}: classes={classes} ({time.time() - t0:.1f}s)")
    if a.contact_sheet:
        print("contact sheet:", make_contact_sheet(a.root, a.contact_sheet))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
