"""MVTec AD 2's evaluation-server format: the folders and file names MVTec's checker expects
(`anomaly_images/<class>/<split>/<stem>.tiff` float16 maps, `anomaly_images_thresholded/...png`
0/255 masks), the checks of a written folder, and the inverse of the preprocessing that brings
a map from the crop back to each image's original size (`to_original`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cras_jax.data import layout, mvtec_ad2, preprocess

MAPS_DIR, MASKS_DIR = "anomaly_images", "anomaly_images_thresholded"
PRIVATE_SPLITS = ("test_private", "test_private_mixed")
# MVTecAD2_public_code_utils/utils.py OBJECT_FILE_COUNTER: images per class in each private
# split, what the checker requires of a complete submission.
OFFICIAL_FILE_COUNTS = {
    "can": 321,
    "fabric": 314,
    "fruit_jelly": 255,
    "rice": 277,
    "sheet_metal": 142,
    "vial": 276,
    "wallplugs": 232,
    "walnuts": 228,
}
FLOAT16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------- inverse mapping


@dataclasses.dataclass(frozen=True)
class Axis:
  """One axis of the preprocessing: `n` original pixels resized to `resized`, of which the
  crop keeps `crop` from `offset` on (negative: the crop is padded before the image)."""

  n: int
  resized: int
  crop: int
  offset: int

  @classmethod
  def of(cls, n: int, resized: int, crop: int) -> Axis:
    # preprocess._center_crop: torchvision's CenterCrop, zero padding when the crop is larger
    off = int(round((resized - crop) / 2.0)) if resized >= crop else -((crop - resized) // 2)
    return cls(n, resized, crop, off)

  def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, weight, inside) per original pixel: the crop pixels its centre falls between
    (centres mapped as PIL's resize maps them: x_resized = (x + 0.5) * resized / n - 0.5),
    the weight of i1, and whether the centre lies within the crop's extent."""
    y = (np.arange(self.n) + 0.5) * (self.resized / self.n) - 0.5 - self.offset
    inside = (y >= -0.5) & (y <= self.crop - 0.5)
    y = np.clip(y, 0.0, self.crop - 1)
    i0 = np.floor(y).astype(np.int64)
    i1 = np.minimum(i0 + 1, self.crop - 1)
    return i0, i1, (y - i0).astype(np.float32), inside


def window(height: int, width: int, resize: int, crop: int) -> tuple[Axis, Axis]:
  """The (row, column) axes of `preprocess.resize_and_crop_image` on a height x width image."""
  rh, rw = preprocess.resized_size(height, width, resize)
  return Axis.of(height, rh, crop), Axis.of(width, rw, crop)


def to_original(
    crop_map: np.ndarray, height: int, width: int, resize: int, crop: int
) -> tuple[np.ndarray, np.ndarray]:
  """A map on the preprocessed crop [crop, crop] -> (map [height, width] float32, inside
  [height, width] bool) on the original image's pixels: the inverse of the resize (shorter
  side to `resize`) and centre crop, bilinear between the crop's pixel centres (edge values
  held up to the crop's border). Pixels outside the crop's extent (the sides a centre crop
  removes) were never seen: they get the map's lowest value and `inside` False."""
  m = np.asarray(crop_map, np.float32)
  if m.shape != (crop, crop):
    raise ValueError(f"map of shape {m.shape}, expected ({crop}, {crop})")
  rows, cols = window(height, width, resize, crop)
  r0, r1, rw, rin = rows.sample()
  c0, c1, cw, cin = cols.sample()
  by_rows = m[r0] * (1.0 - rw)[:, None] + m[r1] * rw[:, None]  # [height, crop]
  out = by_rows[:, c0] * (1.0 - cw)[None, :] + by_rows[:, c1] * cw[None, :]
  inside = rin[:, None] & cin[None, :]
  if not inside.all():
    out[~inside] = m.min()
  return out, inside


# ----------------------------------------------------------------------------- the folder


def map_path(out: str, cls: str, split: str, stem: str) -> str:
  return os.path.join(out, MAPS_DIR, cls, split, stem + ".tiff")


def mask_path(out: str, cls: str, split: str, stem: str) -> str:
  return os.path.join(out, MASKS_DIR, cls, split, stem + ".png")


def write_map(path: str, zmap: np.ndarray, compression: str | None) -> None:
  """A float16 single-channel TIFF (tifffile: Pillow can neither write nor read float16);
  values beyond float16's range are clipped to it."""
  import tifffile  # a dependency of scikit-image

  data = np.clip(zmap, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
  tifffile.imwrite(path, data, compression=compression)


def write_mask(path: str, mask: np.ndarray) -> None:
  """A single-channel 8-bit PNG: 255 where flagged, 0 elsewhere."""
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, format="PNG")


def structure_problems(out: str, expected: dict[str, dict[str, list[str]]]) -> list[str]:
  """What differs between the folder `out` and the structure MVTec's checker requires, for
  the classes, splits and image stems of `expected` ({class: {split: [stem]}}): exactly
  anomaly_images/ and anomaly_images_thresholded/ at the top, exactly the classes in each,
  exactly the splits in each class, exactly one <stem>.tiff (or .png) per image. Contents are
  not read (the tests read them back)."""
  problems = []

  def compare(folder: str, dirs: set[str], files: set[str]) -> None:
    try:
      entries = os.listdir(folder)
    except OSError:
      problems.append(f"{folder}: missing")
      return
    found_dirs = {e for e in entries if os.path.isdir(os.path.join(folder, e))}
    found_files = set(entries) - found_dirs
    for what, want, have in (("folders", dirs, found_dirs), ("files", files, found_files)):
      if have - want:
        problems.append(f"{folder}: superfluous {what} {sorted(have - want)[:4]}")
      if want - have:
        problems.append(f"{folder}: missing {what} {sorted(want - have)[:4]}")

  compare(out, {MAPS_DIR, MASKS_DIR}, set())
  for top, suffix in ((MAPS_DIR, ".tiff"), (MASKS_DIR, ".png")):
    compare(os.path.join(out, top), set(expected), set())
    for cls, splits in expected.items():
      compare(os.path.join(out, top, cls), set(splits), set())
      for split, stems in splits.items():
        compare(os.path.join(out, top, cls, split), set(), {s + suffix for s in stems})
  return problems


def official_differences(expected: dict[str, dict[str, list[str]]]) -> list[str]:
  """How the classes and image counts differ from a complete MVTec AD 2 submission
  (`OFFICIAL_FILE_COUNTS`); [] when the evaluation server's checker would accept them."""
  out = []
  if set(expected) != set(OFFICIAL_FILE_COUNTS):
    out.append(f"classes {sorted(expected)} (MVTec AD 2 has {sorted(OFFICIAL_FILE_COUNTS)})")
  for cls, splits in expected.items():
    want = OFFICIAL_FILE_COUNTS.get(cls)
    for split, stems in splits.items():
      if want is not None and len(stems) != want:
        out.append(f"{cls}/{split}: {len(stems)} images (the release has {want})")
  return out


@dataclasses.dataclass(frozen=True)
class Item:
  cls: str
  split: str
  path: str
  stem: str


def private_items(root: str, classes: Sequence[str], splits: Sequence[str]) -> list[Item]:
  """Every image of the private splits, class by class; one `DatasetError` naming every
  missing folder and every mask or folder inside them."""
  if not os.path.isdir(root):
    raise layout.DatasetError(
        f"the MVTec AD 2 folder {root!r} does not exist or is not a folder: give --data_root "
        f"(the folder holding <class>/test_private/)"
    )
  items, problems = [], []
  for cls in classes:
    for split in splits:
      try:
        found = mvtec_ad2.private_images(root, cls, split)
      except layout.DatasetError as e:
        problems += [line[4:] for line in str(e).splitlines() if line.startswith("  - ")]
        continue
      items += [Item(cls, split, os.fspath(p), p.stem) for p in found]
  if problems:
    problems = list(dict.fromkeys(problems))  # the masks of a class are named once
    raise layout.DatasetError(mvtec_ad2.format_problems(root, problems))
  return items
