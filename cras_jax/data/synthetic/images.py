"""One synthetic image: the classes, their defect kinds, the seeding and the renderer dispatch.

Every image is drawn from its own ``np.random.default_rng`` seeded with (seed, class, split,
defect, index), so any single image is reproducible on its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from cras_jax.data.synthetic import draw, objects, textures

TEXTURE_CLASSES: tuple[str, ...] = ("fabric", "granite")
OBJECT_CLASSES: tuple[str, ...] = ("chip", "gear")
CLASSES: tuple[str, ...] = tuple(sorted(TEXTURE_CLASSES + OBJECT_CLASSES))

DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "chip": ("bent_pin", "chipped_body", "missing_pin"),
    "fabric": ("cut", "misweave", "stain"),
    "gear": ("hole", "missing_tooth", "scratch"),
    "granite": ("crack", "pit", "worn"),
}

_SPLIT_CODE = {"train": 1, "test": 2}


def _key(name: str) -> int:
  """Stable (process-independent) integer key of a name."""
  return zlib.crc32(name.encode("utf-8"))


def _image_rng(seed: int, cls: str, split: str, defect: str | None, index: int):
  return np.random.default_rng(
      [int(seed), _key(cls), _SPLIT_CODE[split], _key(defect) if defect else 0, int(index)]
  )


_RENDERERS: dict[str, Callable] = {
    "chip": objects.render_chip,
    "fabric": textures.render_fabric,
    "gear": objects.render_gear,
    "granite": textures.render_granite,
}

_MIN_MASK_FRACTION = 0.002


def render(
    cls: str, seed: int, split: str, index: int, defect: str | None = None, image_size: int = 160
) -> tuple[np.ndarray, np.ndarray | None]:
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
  out = draw.finish(rng, img, yy, xx)
  return out, (None if defect is None else mask.astype(bool))
