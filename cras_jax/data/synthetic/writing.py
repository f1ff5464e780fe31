"""The synthetic dataset on disk: its manifest, writing the tree atomically, a contact sheet.

Layout written under ``root``::

    <root>/<class>/train/good/000.png
    <root>/<class>/test/good/000.png
    <root>/<class>/test/<defect>/000.png
    <root>/<class>/ground_truth/<defect>/000_mask.png   (0/255, same size)
    <root>/synthetic_manifest.json

``generate`` is idempotent: when the manifest in ``root`` matches the requested parameters
nothing is written; otherwise the dataset is generated into a temporary sibling directory which
is then renamed into place (an interrupted generation never leaves a complete-looking tree
behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from cras_jax.data.synthetic import images

# Bump whenever the rendered pixels change: a cached tree with an older version in its
# manifest is then regenerated instead of being silently reused.
GENERATOR_VERSION = 3
MANIFEST_NAME = "synthetic_manifest.json"


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
      "classes": list(images.CLASSES),
      "defect_types": {c: list(images.DEFECT_TYPES[c]) for c in images.CLASSES},
  }


def read_manifest(root: str, name: str = MANIFEST_NAME) -> dict | None:
  """A generated tree's manifest (`name` in `root`), or None when absent or unreadable."""
  try:
    with open(os.path.join(root, name), "r", encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_manifest(out: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
  """Writes a tree's manifest, last: its presence marks the tree complete."""
  with open(os.path.join(out, name), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")


def _fname(i: int, n: int) -> str:
  return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def _expected_files(manifest: dict) -> list[str]:
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
  if read_manifest(root) != manifest:
    return False
  return all(os.path.isfile(os.path.join(root, f)) for f in _expected_files(manifest))


def _save_png(path: str, arr: np.ndarray) -> None:
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
        img, mask = images.render(cls, seed, split, i, defect, size)
        _save_png(os.path.join(sub, _fname(i, n) + ".png"), img)
        if mask is not None:
          _save_png(
              os.path.join(out, cls, "ground_truth", defect, _fname(i, n) + "_mask.png"),
              mask.astype(np.uint8) * 255,
          )
  write_manifest(out, manifest)  # last: its presence marks a complete tree


def generate(
    root: str,
    seed: int = 0,
    image_size: int = 160,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect_per_type: int = 6,
) -> list[str]:
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
    return list(images.CLASSES)
  write_in_place(
      root,
      MANIFEST_NAME,
      lambda out: _write_tree(out, manifest),
      lambda: _is_complete(root, manifest),
  )
  return list(images.CLASSES)


def write_in_place(
    root: str,
    manifest_name: str,
    write_tree: Callable[[str], None],
    is_complete: Callable[[], bool],
) -> None:
  """``write_tree(tmp)`` into a temporary sibling of ``root`` (an absolute path), renamed to
  ``root`` once complete, replacing a tree an earlier generation left there. A non-empty
  ``root`` without ``manifest_name`` (not made by a generator) is never touched
  (``FileExistsError``); a tree another process renamed into place meanwhile is kept when
  ``is_complete()``."""
  if os.path.exists(root):
    if not os.path.isdir(root):
      raise FileExistsError(f"{root} exists and is not a directory")
    if os.listdir(root) and not os.path.exists(os.path.join(root, manifest_name)):
      raise FileExistsError(
          f"{root} is a non-empty directory without {manifest_name}; refusing to overwrite it"
      )
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(root)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    write_tree(tmp)
    old = None
    if os.path.exists(root):
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(root, os.path.join(old, base))
    try:
      os.rename(tmp, root)
    except OSError:
      # someone else (e.g. a concurrent process) put a tree there meanwhile
      if not is_complete():
        raise
      shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------
# contact sheet
# ----------------------------------------------------------------------------


def make_contact_sheet(root: str, out_path: str, n_good: int = 2, n_per_defect: int = 1) -> str:
  """Write a PNG grid: one row per class, good images then defect images with the
  mask outline drawn in red next to the raw defect image."""
  manifest = read_manifest(root)
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
        m = (
            np.asarray(
                Image.open(os.path.join(root, cls, "ground_truth", defect, f[:-4] + "_mask.png"))
            )
            > 127
        )
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
