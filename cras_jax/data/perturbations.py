"""Seeded perturbations of test images for the robustness evaluation (docs/method.md §11,
the paper's Table 7): pure numpy functions of uint8 images [H, W, 3].

Every image gets its own generator,
``numpy.random.default_rng([seed, perturbation id, image index in the split])``, so the
results do not depend on the batch size or the device count. The perturbations themselves
are described in ``cras_jax/robustness.py``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

PERTURBATIONS = ("noise", "jitter", "rotation")
_IDS = {"noise": 1, "jitter": 2, "rotation": 3}
FILL_MODES = {"reflect": "reflect", "constant": "grid-constant", "nearest": "nearest"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Strengths of the perturbations (defaults: the paper's Table 7)."""

  noise_std: float = 0.01  # on [0, 1]-scaled images
  brightness: float = 0.1
  contrast: float = 0.1
  saturation: float = 0.1
  hue: float = 0.1
  max_angle: float = 5.0  # degrees
  rotation_fill: str = "reflect"  # reflect | constant (black) | nearest

  def __post_init__(self):
    if self.rotation_fill not in FILL_MODES:
      raise ValueError(
          f"rotation_fill must be one of {sorted(FILL_MODES)}, not {self.rotation_fill!r}"
      )
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"hue must be in [0, 0.5], not {self.hue}")
    for name in ("noise_std", "brightness", "contrast", "saturation", "max_angle"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")


def image_rng(seed: int, perturbation: str, index: int) -> np.random.Generator:
  """The generator of one image: a pure function of (seed, perturbation, index)."""
  return np.random.default_rng([int(seed), _IDS[perturbation], int(index)])


# ----------------------------------------------------------------------------- noise


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
  """uint8 image -> uint8 image + N(0, std^2) on the [0, 1] scale (clipped, rounded)."""
  if std == 0:
    return image.copy()
  x = image.astype(np.float64) / 255.0 + rng.normal(0.0, std, size=image.shape)
  return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- colour jitter
# torchvision.transforms._functional_tensor on uint8 [..., H, W, 3] images, in float32 with the
# same truncations to uint8 (so results agree with torchvision to within one grey level).


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """torch's clamp(0, 255).to(uint8): truncation toward zero."""
  return np.clip(x, 0, 255).astype(np.uint8)


def _grayscale(img: np.ndarray) -> np.ndarray:
  x = img.astype(np.float32)
  g = np.float32(0.2989) * x[..., 0] + np.float32(0.587) * x[..., 1] + np.float32(0.114) * x[..., 2]
  return _to_uint8(g)[..., None]


def _blend(img1: np.ndarray, img2, ratio: float) -> np.ndarray:
  r = np.float32(ratio)
  out = r * img1.astype(np.float32) + np.float32(1.0 - ratio) * np.asarray(img2, np.float32)
  return _to_uint8(out)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
  return _blend(img, 0.0, factor)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
  mean = _grayscale(img).astype(np.float32).mean(axis=(-3, -2, -1), keepdims=True)
  return _blend(img, mean, factor)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
  return _blend(img, _grayscale(img), factor)


def _rgb2hsv(x: np.ndarray) -> np.ndarray:
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(axis=-1), x.min(axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  one = np.float32(1.0)
  s = cr / np.where(eqc, one, maxc)
  div = np.where(eqc, one, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  hr = (maxc == r) * (bc - gc)
  hg = ((maxc == g) & (maxc != r)) * (np.float32(2.0) + rc - bc)
  hb = ((maxc != g) & (maxc != r)) * (np.float32(4.0) + gc - rc)
  h = np.fmod((hr + hg + hb) / np.float32(6.0) + one, one)
  return np.stack([h, s, maxc], axis=-1).astype(np.float32)


def _hsv2rgb(x: np.ndarray) -> np.ndarray:
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  i = np.floor(h * np.float32(6.0))
  f = h * np.float32(6.0) - i
  i = i.astype(np.int32) % 6
  p = np.clip(v * (1 - s), 0, 1)
  q = np.clip(v * (1 - s * f), 0, 1)
  t = np.clip(v * (1 - s * (1 - f)), 0, 1)
  table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = np.zeros(x.shape, np.float32)
  for k, (rr, gg, bb) in enumerate(table):
    sel = i == k
    out[..., 0] = np.where(sel, rr, out[..., 0])
    out[..., 1] = np.where(sel, gg, out[..., 1])
    out[..., 2] = np.where(sel, bb, out[..., 2])
  return out


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
  if not -0.5 <= shift <= 0.5:
    raise ValueError(f"hue shift must be in [-0.5, 0.5], not {shift}")
  hsv = _rgb2hsv(img.astype(np.float32) / np.float32(255.0))
  hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(shift), np.float32(1.0))
  # torchvision's float -> uint8: x * (255 + 1 - 1e-3), truncated.
  return (_hsv2rgb(hsv) * np.float32(255.999)).astype(np.uint8)


def jitter_params(rng: np.random.Generator, s: Settings) -> tuple:
  """(order of the four ops, brightness, contrast, saturation, hue); None = op skipped.
  Drawn in torchvision's order: permutation first, then the four factors."""
  order = rng.permutation(4)

  def factor(v):
    return None if v == 0 else float(rng.uniform(max(0.0, 1.0 - v), 1.0 + v))

  b, c, sat = factor(s.brightness), factor(s.contrast), factor(s.saturation)
  h = None if s.hue == 0 else float(rng.uniform(-s.hue, s.hue))
  return order, b, c, sat, h


def color_jitter(img: np.ndarray, params: tuple) -> np.ndarray:
  order, b, c, sat, h = params
  ops = {
      0: (adjust_brightness, b),
      1: (adjust_contrast, c),
      2: (adjust_saturation, sat),
      3: (adjust_hue, h),
  }
  out = img
  for k in order:
    fn, v = ops[int(k)]
    if v is not None:
      out = fn(out, v)
  return out if out is not img else img.copy()


# ----------------------------------------------------------------------------- rotation


def rotate(image: np.ndarray, mask: np.ndarray | None, angle: float, fill: str = "reflect"):
  """Rotates image [H, W, C] uint8 (bilinear, rounded) and mask [H, W] (nearest-neighbour,
  same coordinates) by `angle` degrees counter-clockwise about the centre; same size."""
  if angle == 0:
    return image.copy(), None if mask is None else mask.copy()
  mode = FILL_MODES[fill]
  h, w = image.shape[:2]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  th = math.radians(angle)
  yy, xx = np.meshgrid(
      np.arange(h, dtype=np.float64) - cy, np.arange(w, dtype=np.float64) - cx, indexing="ij"
  )
  # Output pixel (y, x) reads the input at the point rotated back by -angle.
  src = np.stack(
      [cy + xx * math.sin(th) + yy * math.cos(th), cx + xx * math.cos(th) - yy * math.sin(th)]
  )
  img = np.stack(
      [
          ndimage.map_coordinates(
              image[..., ch].astype(np.float64), src, order=1, mode=mode, cval=0.0
          )
          for ch in range(image.shape[-1])
      ],
      axis=-1,
  )
  img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  if mask is None:
    return img, None
  m = ndimage.map_coordinates(mask, src, order=0, mode=mode, cval=0).astype(mask.dtype)
  return img, m


def rotation_angle(rng: np.random.Generator, s: Settings) -> float:
  return 0.0 if s.max_angle == 0 else float(rng.uniform(-s.max_angle, s.max_angle))


# ----------------------------------------------------------------------------- batches


def perturb(
    image: np.ndarray,
    mask: np.ndarray,
    index: int,
    perturbation: str,
    seed: int,
    settings: Settings = Settings(),
):
  """One uint8 image [H, W, 3] and its mask [H, W] -> perturbed (image, mask)."""
  rng = image_rng(seed, perturbation, index)
  if perturbation == "noise":
    return gaussian_noise(image, rng, settings.noise_std), mask
  if perturbation == "jitter":
    return color_jitter(image, jitter_params(rng, settings)), mask
  if perturbation == "rotation":
    return rotate(image, mask, rotation_angle(rng, settings), settings.rotation_fill)
  raise ValueError(f"unknown perturbation {perturbation!r}; known: {', '.join(PERTURBATIONS)}")


class PerturbedSource:
  """A data source (len, __getitems__) whose examples' image and mask are perturbed;
  everything else (labels, names, split metadata) is the wrapped source's."""

  def __init__(self, source, perturbation: str, seed: int, settings: Settings = Settings()):
    if perturbation not in _IDS:
      raise ValueError(f"unknown perturbation {perturbation!r}; known: {', '.join(PERTURBATIONS)}")
    self.source, self.perturbation, self.seed, self.settings = source, perturbation, seed, settings

  def __len__(self):
    return len(self.source)

  def __getattr__(self, name):  # dataset_info, split, ... (metadata of the split)
    if name == "source":
      raise AttributeError(name)
    return getattr(self.source, name)

  def _apply(self, ex, index):
    ex = dict(ex)
    ex["image"], ex["mask"] = perturb(
        np.asarray(ex["image"]),
        np.asarray(ex["mask"]),
        index,
        self.perturbation,
        self.seed,
        self.settings,
    )
    return ex

  def __getitem__(self, index):
    return self._apply(self.source[index], index)

  def __getitems__(self, indices):
    return [self._apply(ex, i) for ex, i in zip(self.source.__getitems__(list(indices)), indices)]


# ----------------------------------------------------------------------------- evaluation
