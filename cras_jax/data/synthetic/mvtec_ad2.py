"""The synthetic demo drawn into MVTec AD 2's folders, at a small size (the tests' AD 2 data,
and `python -m cras_jax.synthetic --layout=mvtec_ad2`).

Layout written under ``root`` (``data/mvtec_ad2.py`` reads it as it reads the release)::

    <root>/<class>/train/good/000_regular.png
    <root>/<class>/validation/good/000_regular.png
    <root>/<class>/test_public/good/000_regular.png
    <root>/<class>/test_public/bad/000_regular.png
    <root>/<class>/test_public/ground_truth/bad/000_regular_mask.png   (0/255)
    <root>/<class>/test_private/000_regular.png          normal and defective, no masks
    <root>/<class>/test_private_mixed/000_mixed.png      the same, some under another light
    <root>/synthetic_ad2_manifest.json

The classes are MVTec AD 2's eight scenario names (or any given names); each is drawn by one
of the demo's four renderers (``images.render``: fabric, granite, gear, chip), the second class
of each renderer with its colour channels reversed so that no two classes look alike. Images
are ``height`` x round(``height`` x ``aspect``) (wider than high, like the release's), the
centre rows of a square rendering; a defect cut away by that crop is drawn again. Defective
test images cycle through the renderer's three defect kinds. File names follow the release's
(``NNN_regular.png``, ``NNN_mixed.png`` in test_private_mixed), which the submission's names
repeat. Written like ``writing.generate``: into a temporary sibling, renamed into place, reused
when the manifest matches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cras_jax.base import registry
from cras_jax.data.synthetic import images, writing

MANIFEST_NAME = "synthetic_ad2_manifest.json"
VERSION = 1
# renderer of each class, by position: a class's renderer is RENDERERS[i % 4], reversed
# colours for i >= 4
RENDERERS = ("chip", "fabric", "gear", "granite")
_PRIVATE_MIXED_GAIN = (0.6, 1.4)  # the "unseen lighting" of test_private_mixed


def _manifest(classes, seed, height, aspect, counts: dict) -> dict:
  return {
      "generator": "cras_jax.data.synthetic.mvtec_ad2",
      "version": VERSION,
      "renderer_version": writing.GENERATOR_VERSION,
      "classes": list(classes),
      "params": {"seed": int(seed), "height": int(height), "aspect": float(aspect), **counts},
  }


def _name(i: int, suffix: str = "regular") -> str:
  return f"{i:03d}_{suffix}"


def _draw(cls_index: int, seed: int, split: str, index: int, defect, height: int, width: int):
  """One image (height, width, 3) and its mask (None for a normal image)."""
  renderer = RENDERERS[cls_index % len(RENDERERS)]
  side = max(height, width)
  top, left = (side - height) // 2, (side - width) // 2
  for attempt in range(50):  # a defect the crop cut away: the next drawing of it
    img, mask = images.render(
        renderer, seed + cls_index, split, index + 100_000 * attempt, defect, side
    )
    img = img[top : top + height, left : left + width]
    if mask is not None:
      mask = mask[top : top + height, left : left + width]
      if mask.sum() < 4:
        continue
    break
  else:  # pragma: no cover - practically never
    raise RuntimeError(f"could not draw a visible {defect} at {height}x{width}")
  if cls_index >= len(RENDERERS):
    img = np.ascontiguousarray(img[..., ::-1])
  return img, mask


def _write_tree(out: str, manifest: dict) -> None:
  p = manifest["params"]
  seed, h = p["seed"], p["height"]
  w = int(round(h * p["aspect"]))
  rng = np.random.default_rng(seed)
  for k, cls in enumerate(manifest["classes"]):
    kinds = images.DEFECT_TYPES[RENDERERS[k % len(RENDERERS)]]

    def put(folder, name, img, mask=None, mask_folder=None):
      os.makedirs(folder, exist_ok=True)
      writing._save_png(os.path.join(folder, name + ".png"), img)
      if mask is not None:
        os.makedirs(mask_folder, exist_ok=True)
        writing._save_png(
            os.path.join(mask_folder, name + "_mask.png"), mask.astype(np.uint8) * 255
        )

    cdir = os.path.join(out, cls)
    for i in range(p["n_train"]):
      put(os.path.join(cdir, "train", "good"), _name(i), _draw(k, seed, "train", i, None, h, w)[0])
    for i in range(p["n_validation"]):
      img = _draw(k, seed, "train", 50_000 + i, None, h, w)[0]
      put(os.path.join(cdir, "validation", "good"), _name(i), img)
    for i in range(p["n_test_good"]):
      img = _draw(k, seed, "test", i, None, h, w)[0]
      put(os.path.join(cdir, "test_public", "good"), _name(i), img)
    for i in range(p["n_test_bad"]):
      img, mask = _draw(k, seed, "test", i, kinds[i % len(kinds)], h, w)
      gt = os.path.join(cdir, "test_public", "ground_truth", "bad")
      put(os.path.join(cdir, "test_public", "bad"), _name(i), img, mask, gt)
    for split, suffix, offset in (
        ("test_private", "regular", 20_000),
        ("test_private_mixed", "mixed", 30_000),
    ):
      for i in range(p["n_private"]):
        defect = kinds[i % len(kinds)] if i % 2 else None
        img = _draw(k, seed, "test", offset + i, defect, h, w)[0]
        if suffix == "mixed" and i % 3 == 0:
          gain = rng.uniform(*_PRIVATE_MIXED_GAIN)
          img = np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        put(os.path.join(cdir, split), _name(i, suffix), img)
  writing.write_manifest(out, manifest, MANIFEST_NAME)  # last: marks a complete tree


def _read_manifest(root: str) -> dict | None:
  return writing.read_manifest(root, MANIFEST_NAME)


def generate(
    root: str,
    classes: Sequence[str] = registry.MVTEC_AD2_CLASSES,
    seed: int = 0,
    height: int = 40,
    aspect: float = 1.25,
    n_train: int = 6,
    n_validation: int = 3,
    n_test_good: int = 2,
    n_test_bad: int = 3,
    n_private: int = 4,
) -> list[str]:
  """Write (or reuse) the synthetic MVTec AD 2 tree under ``root``; returns its classes.

  An existing ``root`` holding the same manifest is reused as it is; one made by this
  generator with other parameters is replaced; a non-empty folder without the manifest is
  never touched (``FileExistsError``).
  """
  classes = list(classes)
  if not classes or len(set(classes)) != len(classes):
    raise ValueError(f"classes must be distinct names, got {classes}")
  if len(classes) > 2 * len(RENDERERS):
    raise ValueError(f"at most {2 * len(RENDERERS)} classes (two per renderer)")
  if height < 16 or not 1.0 <= aspect <= 4.0:
    raise ValueError("height must be >= 16 and aspect within [1, 4]")
  counts = {
      "n_train": n_train,
      "n_validation": n_validation,
      "n_test_good": n_test_good,
      "n_test_bad": n_test_bad,
      "n_private": n_private,
  }
  if min(counts.values()) < 1:
    raise ValueError(f"image counts must be >= 1, got {counts}")
  manifest = _manifest(classes, seed, height, aspect, counts)
  root = os.path.abspath(os.fspath(root))
  if _read_manifest(root) == manifest:
    return classes
  writing.write_in_place(
      root,
      MANIFEST_NAME,
      lambda out: _write_tree(out, manifest),
      lambda: _read_manifest(root) == manifest,
  )
  return classes
