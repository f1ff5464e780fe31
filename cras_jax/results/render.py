"""The one heatmap renderer: an anomaly map in the "jet" colours over its image, as a uint8
array (`overlay`, `panel`) or drawn on matplotlib axes (`draw_overlay`, `draw_mask`); and the
one choice of which test images of a run get heatmaps (`heatmap_choice`).

Every map is shown on a range [lo, hi] (`heat`: values below lo are blue, above hi red). The
heatmaps of a scored test split use each class's own range (`class_range`: the minimum and
maximum of its test maps), so the pictures of one class are comparable.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CMAP = "jet"
ALPHA = 0.5  # weight of the colours over the image in heatmaps of test images


def heat(amap: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """The map scaled to [0, 1] over [lo, hi] and clipped there (the colour index)."""
  return np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def colours(amap: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """The "jet" colours of the map on [lo, hi], float [H, W, 3] in [0, 255]."""
  import matplotlib  # here only: its colour maps are needed for heatmaps alone

  return matplotlib.colormaps[CMAP](heat(amap, lo, hi))[..., :3] * 255.0


def outline(mask: np.ndarray) -> np.ndarray:
  """The boundary pixels of a binary mask (in it, with a 4-neighbour outside it)."""
  m = np.pad(mask, 1)
  inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
  return mask & ~inner


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    lo: float = 0.0,
    hi: float = 1.0,
    alpha: float = ALPHA,
    mask: np.ndarray | None = None,
    rounded: bool = True,
) -> np.ndarray:
  """uint8 image [H, W, 3] with the map's colours on [lo, hi] blended over it (weight
  `alpha`) and the outline of the binary `mask` in white -> uint8 [H, W, 3]. rounded=False
  truncates to integers instead of rounding (TensorBoard heatmaps always have)."""
  out = (1 - alpha) * image.astype(np.float32) + alpha * colours(amap, lo, hi)
  if mask is not None and mask.any():
    out[outline(mask)] = 255.0
  if rounded:
    out = np.clip(np.round(out), 0, 255)
  return out.astype(np.uint8)


def as_rgb8(image) -> np.ndarray:
  """An image as uint8 [H, W, 3] (floats in [0, 1] scaled to [0, 255]; grey repeated)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  return image


def panel(image, mask, amap, lo: float, hi: float) -> np.ndarray:
  """image | ground truth | anomaly map over the image, side by side, uint8 [H, 3W, 3]; the
  mask and map are resized (nearest) to the image's size."""
  image = as_rgb8(image)
  h, w = image.shape[:2]

  def fit(a):  # to the image's size (nearest), as [h, w] float
    a = np.asarray(a, np.float32).squeeze()
    if a.shape != (h, w):
      a = np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST))
    return a

  over = overlay(image, fit(amap), lo, hi, rounded=False)
  gt = np.repeat((np.clip(fit(mask), 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
  return np.concatenate([image, gt, over], axis=1)


def draw_overlay(ax, image, amap, lo: float, hi: float) -> None:
  """The image and the map's colours on [lo, hi] over it (weight ALPHA) on matplotlib axes."""
  ax.imshow(image)
  ax.imshow(heat(amap, lo, hi), cmap=CMAP, alpha=ALPHA, vmin=0, vmax=1)


def draw_mask(ax, mask, **kwargs) -> None:
  """A ground-truth mask in grey (0 black, 1 white) on matplotlib axes."""
  ax.imshow(mask, cmap="gray", vmin=0, vmax=1, **kwargs)


# ----------------------------------------------------------------------------- which images


def class_range(res: dict, k: int) -> tuple[float, float]:
  """(min, max) of the maps of class k's test images: the colour range of its heatmaps."""
  maps = res["maps"][res["label"] == k]
  return float(maps.min()), float(maps.max())


def heatmap_choice(
    res: dict, class_names, per_class: int, with_normal: bool = True
) -> list[tuple[int, list[int], float, float]]:
  """The test images of a scored split that get heatmaps: per class with test images,
  (class index, image indices, lo, hi). Defective images first (in order), `per_class` in
  all; with_normal: `per_class - 1` of them (at least 1) and then the first normal one."""
  chosen = []
  for k in range(len(class_names)):
    idx = np.flatnonzero(res["label"] == k)
    if idx.size == 0:
      continue
    order = sorted(idx, key=lambda i: (-res["is_anomaly"][i], i))
    if with_normal:
      pick = order[: max(per_class - 1, 1)] + [i for i in order if not res["is_anomaly"][i]][:1]
    else:
      pick = order[:per_class]
    chosen.append((k, list(dict.fromkeys(pick)), *class_range(res, k)))
  return chosen
