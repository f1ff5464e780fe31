"""MVTec AD 2: thresholds from the validation split, SegF1 on test_public, and the evaluation
server's submission of test_private and test_private_mixed.

    python -m cras_jax.submission --workdir=<trained run> --out=<folder>

**Thresholds** (`fit_validation`). MVTec AD 2 ships normal validation images for exactly this
(docs/mvtec_ad2.md); both thresholds are fitted on them alone, never on the test set, by the
baseline rule MVTec states in its submission checker (MVTecAD2_public_code_utils,
check_and_prepare_data_for_upload.py): "segmentation_threshold = np.mean(anomaly_scores_val) +
3 * np.std(anomaly_scores_val)", per class (each scenario is evaluated on its own). Scores and
maps are normalised per matched class by the mean and standard deviation of its validation
pixels (`pixel_normalisation`), so that rule is z >= 3 for every class and one pixel threshold
serves all; the image threshold is the same rule on the normalised image scores (pooled). Each
is placed between validation values (`thresholds.separating_threshold`, as every threshold of
this project). The file has thresholds.json's format: predict and export read it as any other.

**SegF1** (`segf1_columns`): per class, `metrics.seg_f1` of the test_public maps at the fixed
pixel threshold, true and false pixels counted over all the class's images (pooled, as MVTec AD
2 defines it), on the preprocessed crop; and I-F1, the image-level F1 at the image threshold.

**The submission** (`write_submission`): every image of ``<root>/<class>/test_private/`` and
``test_private_mixed/`` is read and preprocessed like training images, scored (per image), its
normalised map mapped back onto the ORIGINAL image's pixels (`to_original`, the exact inverse
of the resize and centre crop, bilinear) and written in the folders MVTec's checker expects::

    <out>/anomaly_images/<class>/<split>/<image stem>.tiff              float16, 2-D
    <out>/anomaly_images_thresholded/<class>/<split>/<image stem>.png   uint8 {0, 255}, 2-D

(MVTecAD2_public_code_utils/utils.py: `DIRECTORY_STRUCTURE`, `_check_ad_images`,
`_check_thresholded_ad_images`; names as its `mvtec_ad_2_public_offline.py` gives them, the
image's path below the dataset root with the suffix replaced: 000_regular.tiff, 000_mixed.png).
Nothing else may be in the folder (the checker refuses any other file or folder), so the record
of what was written (run, step, thresholds, counts) goes beside it, to ``<out>.json``.
Everything is written into a temporary sibling folder that is renamed to ``--out`` at the end:
an interrupted or failed run leaves nothing under that name.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image

from cras_jax import data as data_lib
from cras_jax.base import compile_cache, errors, fileio, flag_checks, fs, jsonio, registry
from cras_jax.base import stop as stop_lib
from cras_jax.config import bounds as config_bounds
from cras_jax.data import layout, preprocess
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import tables as results
from cras_jax.runs import specs, trained
from cras_jax.scoring import scoring, thresholds

RULE = "validation_mean_plus_3std"
N_STD = 3.0
RULE_SOURCE = (
    "MVTec AD 2's baseline (MVTecAD2_public_code_utils/check_and_prepare_data_for_upload.py): "
    "threshold = mean + 3 * std of the validation images' anomaly scores"
)
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


# ----------------------------------------------------------------------------- thresholds


def _mean_std(values: np.ndarray) -> tuple[float, float]:
  """Mean and (population) standard deviation in float64, in chunks (no float64 copy)."""
  flat = values.reshape(-1)
  n, total, chunk = flat.size, 0.0, 1 << 22
  for i in range(0, n, chunk):
    total += float(np.sum(flat[i : i + chunk], dtype=np.float64))
  mean = total / n
  sq = 0.0
  for i in range(0, n, chunk):
    sq += float(np.sum(np.square(flat[i : i + chunk].astype(np.float64) - mean)))
  return mean, math.sqrt(sq / n)


def pixel_normalisation(maps, cls, num_classes: int):
  """(loc [K], scale [K], info): per matched class, the mean and the (population) standard
  deviation of every pixel of its validation images' maps. A class no validation image was
  matched to, or whose pixels all score the same, takes the median of the other classes'
  (1 and 0 when there are none); `info` says which (as `thresholds.normalisation`'s)."""
  maps, cls = np.asarray(maps), np.asarray(cls)
  loc, scale = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
  counts = [int(np.sum(cls == k)) for k in range(num_classes)]
  for k in range(num_classes):
    if counts[k]:
      mean, std = _mean_std(maps[cls == k])
      loc[k] = mean
      if std > 1e-12:
        scale[k] = std
  source = {
      "loc_source": ["class" if np.isfinite(v) else "median_of_classes" for v in loc],
      "scale_source": ["class" if np.isfinite(v) else "median_of_classes" for v in scale],
  }
  loc[np.isnan(loc)] = np.nanmedian(loc) if np.isfinite(loc).any() else 0.0
  scale[np.isnan(scale)] = np.nanmedian(scale) if np.isfinite(scale).any() else 1.0
  return loc, scale, {"n_normal": counts, **source}


def fit_validation(res: dict, class_names: Sequence[str]) -> dict:
  """Normalisation and thresholds fitted on a scored validation split (normal images only).

  res: `Scorer.predict_dataset` of the validation split (scores [N], maps [N, H, W], cls [N]:
  the matched classes). MVTec AD 2's rule, per class: a pixel is anomalous above the mean + 3
  standard deviations of the class's validation pixels. Normalised by those (`pixel_normalisation`:
  z = (s - mean[c]) / std[c]), that is z >= 3 for every class: one pixel threshold serves all,
  as this project's thresholds need. The image threshold is the same rule on the normalised
  image scores, all classes pooled. Both are placed between validation values
  (`thresholds.separating_threshold`). Returns the content of thresholds.json
  (`thresholds.save`), its rules `RULE`."""
  scores, cls = np.asarray(res["scores"]), np.asarray(res["cls"])
  if scores.size == 0:
    raise errors.UserValueError("the validation split is empty: no thresholds can be fitted")
  loc, scale, info = pixel_normalisation(res["maps"], cls, len(class_names))
  z = thresholds.normalise(scores, cls, loc, scale)
  zmaps = thresholds.normalise_maps(res["maps"], cls, loc, scale)
  stats = {}
  for what, values in (("image", z), ("pixel", zmaps)):
    mean, std = _mean_std(values)
    # pixels: mean + 3 std of each class's own pixels, which normalised is 3 for every class
    statistic = N_STD if what == "pixel" else mean + N_STD * std
    sample = values.reshape(-1)[thresholds._subsample(values.size, thresholds.MAX_PIXELS)]
    placed = thresholds.separating_threshold(sample, statistic)
    stats[what] = {
        "pooled_mean": mean,
        "pooled_std": std,
        "statistic": statistic,
        "threshold": placed,
        "flagged_fraction": float(np.mean(sample >= placed)),
        "values": int(values.size),
    }
  del zmaps
  return {
      "format_version": thresholds.FORMAT_VERSION,
      "class_names": list(class_names),
      "image_threshold": stats["image"]["threshold"],
      "pixel_threshold": stats["pixel"]["threshold"],
      "rules": {
          "image": RULE,
          "pixel": RULE,
          "source": RULE_SOURCE,
          "pixel_rule": "per class: mean + 3 std of its validation pixels (z >= 3)",
          "image_rule": "mean + 3 std of the validation images' normalised scores, pooled",
          "decision": "anomalous where normalised value >= threshold",
          "placement": "the statistic moved between validation values: the float32 midway "
          "between the lowest value flagged and the highest one not flagged",
      },
      "calibration_f1": {"image": float("nan"), "pixel": float("nan")},
      "normalisation": {
          "definition": "z = (s - loc[c]) / scale[c], c = matched class; loc: mean, scale: "
          "standard deviation of every pixel of the validation images matched to c (image "
          "scores use the same loc, scale)",
          "loc": loc.tolist(),
          "scale": scale.tolist(),
          **info,
      },
      "split": {
          "definition": "the validation split (normal images only); the test split is never "
          "used for thresholds",
          "validation_images": int(scores.size),
      },
      "validation": stats,
  }


def summary(d: dict) -> str:
  """One line for the log."""
  v = d["validation"]
  return (
      f"thresholds (MVTec AD 2: mean + 3 std of {d['split']['validation_images']} validation "
      f"images; z per class by their pixels' mean and std): image {d['image_threshold']:.3f} "
      f"(flags {100 * v['image']['flagged_fraction']:.1f}% of them), pixel "
      f"{d['pixel_threshold']:.3f} (flags {100 * v['pixel']['flagged_fraction']:.2f}% of their "
      f"pixels)"
  )


def is_validation_fit(d: dict) -> bool:
  """Whether a thresholds dict was fitted on the validation split by `fit_validation`."""
  rules = d.get("rules") if isinstance(d, dict) else None
  return isinstance(rules, dict) and rules.get("pixel") == RULE and rules.get("image") == RULE


# ----------------------------------------------------------------------------- SegF1


def segf1_columns(res: dict, class_names: Sequence[str], thr: thresholds.Thresholds) -> dict:
  """Per class (true class): ``seg_f1`` (`metrics.seg_f1` of the normalised maps at the
  pixel threshold, pooled over the class's images; NaN where masks are missing) and ``i_f1``
  (F1 of normalised score >= image threshold against is_anomaly; NaN where undefined)."""
  label = np.asarray(res["label"])
  is_anomaly = np.asarray(res["is_anomaly"]).astype(bool)
  has_mask = np.asarray(res.get("has_mask", np.ones(len(label))), bool)
  z = thresholds.normalise(res["scores"], res["cls"], thr.loc, thr.scale)
  out = {}
  for k, name in enumerate(class_names):
    sel = np.flatnonzero(label == k)
    if not sel.size:
      continue
    seg = float("nan")
    if has_mask[sel].all():
      zmaps = thresholds.normalise_maps(
          np.asarray(res["maps"])[sel], np.asarray(res["cls"])[sel], thr.loc, thr.scale
      )
      seg = metrics_lib.seg_f1(np.asarray(res["mask"])[sel], zmaps, thr.pixel_threshold)
    image = thresholds.prf(z[sel] >= thr.image_threshold, is_anomaly[sel])
    out[name] = {"seg_f1": seg, "i_f1": image["f1"]}
  return out


def with_columns(table: dict, columns: dict) -> dict:
  """The summarised `table` with `columns` added to its class rows, its mean row recomputed."""
  rows = {c: dict(r) for c, r in table.items() if c != metrics_lib.MEAN_ROW}
  for c, extra in columns.items():
    rows.setdefault(c, {}).update(extra)
  return metrics_lib.summarise(rows)


@dataclasses.dataclass
class Evaluation:
  """What MVTec AD 2 adds to an evaluation: its thresholds (thresholds.json's content) and
  the per-class columns."""

  thresholds: dict
  columns: dict

  def extra(self) -> dict:
    """For the results files: the thresholds and how SegF1 was computed."""
    v = self.thresholds["validation"]
    return {
        "mvtec_ad2": {
            "thresholds": {
                "image": self.thresholds["image_threshold"],
                "pixel": self.thresholds["pixel_threshold"],
                "rule": RULE,
                "source": RULE_SOURCE,
                "validation_images": self.thresholds["split"]["validation_images"],
                "validation_pixels_flagged": v["pixel"]["flagged_fraction"],
            },
            "seg_f1": "F1 of (normalised map >= pixel threshold) against the masks, pixels "
            "pooled over each class's test_public images, on the preprocessed crop",
            "i_f1": "F1 of (normalised score >= image threshold) against is_anomaly",
        }
    }


_PER_IMAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_image(scorer: scoring.Scorer) -> scoring.Scorer:
  """`scorer.per_image()`, made once per scorer (its predict step compiled once, not at every
  evaluation of a run that matches by batch), holding the scorer's current state."""
  other = _PER_IMAGE.get(scorer)
  if other is None:
    other = scorer.per_image()
    if other is scorer:
      return scorer
    _PER_IMAGE[scorer] = other
  other.svars, other.model_step = scorer.svars, scorer.model_step
  return other


def fit_on_validation(scorer: scoring.Scorer, dataset) -> dict:
  """The thresholds of `scorer`'s model fitted on the dataset's validation split, scored per
  image (`fit_validation`), with the step, score mode and matching recorded."""
  per_image = _per_image(scorer)
  d = fit_validation(per_image.predict_dataset(dataset.validation), dataset.class_names)
  d.update(
      step=per_image.model_step,
      score_mode=per_image.spec.config.model.score_mode,
      matching="per_image",
  )
  return d


def evaluate(scorer: scoring.Scorer, dataset, table: dict, res: dict) -> tuple[dict, Evaluation]:
  """MVTec AD 2's part of an evaluation (`scoring/evaluate.py` calls it for a dataset with a
  validation split): the thresholds fitted on the validation split (`fit_on_validation`),
  then SegF1 and I-F1 of the test split at them added to `table`. res: the evaluation's
  scores of the test split (reused when `scorer` matches per image)."""
  d = fit_on_validation(scorer, dataset)
  per_image = _per_image(scorer)
  test = res if per_image is scorer else per_image.predict_dataset(dataset.test)
  columns = segf1_columns(test, dataset.class_names, thresholds.Thresholds.from_dict(d))
  print(summary(d), flush=True)
  return with_columns(table, columns), Evaluation(d, columns)


def write_thresholds(
    d: dict, workdir: str, run_id: str | None = None, member: str | None = None
) -> dict:
  """Writes validation thresholds (`fit_on_validation`; an `Evaluation`'s) to
  <workdir>/thresholds.json (process 0), recording the run (and population member) they
  belong to -> what was written."""
  import jax  # here only: the thresholds and the writer above need no backend

  d = dict(d, run_id=run_id)
  if member is not None:
    d["member"] = member
  if jax.process_index() == 0:
    thresholds.save(d, thresholds.path(workdir))
  print(f"thresholds -> {thresholds.path(workdir)}", flush=True)
  return d


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
  from cras_jax.data import mvtec_ad2  # heavy (TFDS): only when a submission is written

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


@dataclasses.dataclass(frozen=True)
class Options:
  """How a submission reads its images and writes their maps: the run's resize and crop (the
  maps are mapped back through them), its image limits, the decoding threads, the TIFFs'
  compression."""

  resize: int
  crop: int
  limits: preprocess.Limits | None = None
  workers: int = 2
  compression: str | None = "zlib"


def _read(item: Item, opts: Options) -> tuple[np.ndarray, tuple[int, int]]:
  raw = preprocess.read_image(item.path, opts.limits)
  return preprocess.resize_and_crop_image(raw, opts.resize, opts.crop), raw.shape[:2]


def _reader(items: Sequence[Item], opts: Options):
  """(item, crop, (height, width)) in order; decoding in `workers` threads, a window ahead."""
  workers = opts.workers
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    todo = iter(items)
    for it in itertools.islice(todo, 4 * workers):
      pending.append((it, pool.submit(_read, it, opts)))
    while pending:
      it, fut = pending.popleft()
      nxt = next(todo, None)
      if nxt is not None:
        pending.append((nxt, pool.submit(_read, nxt, opts)))
      image, size = fut.result()
      yield it, image, size


def _batches(iterable, n: int):
  it = iter(iterable)
  while batch := list(itertools.islice(it, n)):
    yield batch


def _write_one(out, item, zmap, size, opts: Options, pixel_thr) -> float:
  full, inside = to_original(zmap, *size, opts.resize, opts.crop)
  write_map(map_path(out, item.cls, item.split, item.stem), full, opts.compression)
  flagged = (full >= pixel_thr) & inside
  write_mask(mask_path(out, item.cls, item.split, item.stem), flagged)
  return float(flagged.mean())


def write_submission(
    scorer: scoring.Scorer,
    thr: thresholds.Thresholds,
    items: Sequence[Item],
    out: str,
    opts: Options,
) -> dict:
  """Scores `items` and writes their maps and masks into the folder `out` (which must
  exist; `submit` gives a temporary one) -> per image: its flagged fraction and normalised
  image score. scorer: per image; thr: finite thresholds."""
  if not (math.isfinite(thr.pixel_threshold) and math.isfinite(thr.image_threshold)):
    raise errors.UserValueError("the submission needs finite image and pixel thresholds")
  for it in items:
    os.makedirs(os.path.dirname(map_path(out, it.cls, it.split, it.stem)), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path(out, it.cls, it.split, it.stem)), exist_ok=True)
  rows = {}
  bar = results.progress(total=len(items), desc="submission", unit="img")
  with concurrent.futures.ThreadPoolExecutor(2) as writers:
    pending = []
    for batch in _batches(_reader(items, opts), scorer.batch_size):
      stop_lib.poll("the submission", f"nothing is kept under {out}")
      res = scorer(np.stack([image for _, image, _ in batch]))
      if not (np.isfinite(res["scores"]).all() and np.isfinite(res["maps"]).all()):
        raise errors.UserValueError(
            f"the model gives non-finite scores or maps for {batch[0][0].path} and its batch: "
            f"its weights are damaged; retrain or restore an earlier checkpoint"
        )
      norm = scoring.normalise(res, thr)
      for j, (it, _, size) in enumerate(batch):
        fut = writers.submit(
            _write_one, out, it, norm["normalised_maps"][j], size, opts, thr.pixel_threshold
        )
        pending.append((it, float(norm["normalised_scores"][j]), fut))
      for it, z, fut in pending[: -2 * scorer.batch_size]:  # a bounded backlog
        rows[f"{it.cls}/{it.split}/{it.stem}"] = {"z": z, "flagged": fut.result()}
      pending = pending[-2 * scorer.batch_size :]
      bar.update(len(batch))
    for it, z, fut in pending:
      rows[f"{it.cls}/{it.split}/{it.stem}"] = {"z": z, "flagged": fut.result()}
  bar.close()
  for r in rows.values():
    r["anomalous"] = bool(r["z"] >= thr.image_threshold)
  return rows


def _destination(out: str, overwrite: bool) -> tuple[str, str]:
  """(absolute --out, its parent) checked before anything is scored: the parent writable,
  --out not a file, not an existing folder unless `overwrite`."""
  out = os.path.abspath(os.path.expanduser(out))
  fs.refuse_shared_place(out, "--out")
  parent = os.path.dirname(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.UserValueError(f"--out {out!r} is a file: give a folder (it is created)")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise errors.UserValueError(
        f"--out {out!r} exists and is not empty: give a new folder, or --overwrite to replace "
        f"it (it is replaced only once the new submission is complete)"
    )
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise errors.UserValueError(
        f"--out {out!r} cannot be written: {parent!r} is a file, not a folder; give --out in "
        f"a folder you can write to"
    )
  try:
    os.makedirs(parent, exist_ok=True)
    probe = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.probe-", dir=parent)
    os.rmdir(probe)
  except OSError as e:
    raise errors.UserValueError(
        f"--out {out!r} cannot be written: its folder {parent!r} is not writable "
        f"({e.strerror or e}); give --out in a folder you can write to"
    ) from None
  return out, parent


def submit(
    scorer: scoring.Scorer,
    thr: thresholds.Thresholds,
    items: Sequence[Item],
    out: str,
    resize: int,
    crop: int,
    *,
    limits: preprocess.Limits | None = None,
    workers: int = 2,
    compression: str | None = "zlib",
    overwrite: bool = False,
    record: dict | None = None,
) -> dict:
  """`write_submission` into a temporary sibling of `out`, checked (`structure_problems`),
  then renamed to `out` (an older `out` replaced only then, with `overwrite`); the record
  (`record` and the counts) written to ``<out>.json``. -> the record."""
  out, parent = _destination(out, overwrite)
  expected: dict[str, dict[str, list[str]]] = {}
  for it in items:
    expected.setdefault(it.cls, {}).setdefault(it.split, []).append(it.stem)
  opts = Options(resize, crop, limits, workers, compression)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  t0 = time.time()
  try:
    rows = write_submission(scorer, thr, items, tmp, opts)
    problems = structure_problems(tmp, expected)
    if problems:  # a bug, not the user's: the folder is not kept
      raise RuntimeError("the submission folder is malformed:\n  " + "\n  ".join(problems))
    old = None
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "previous"))
    os.rename(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  seconds = time.time() - t0
  differences = official_differences(expected)
  rec = {
      **(record or {}),
      "folder": out,
      "layout": f"{MAPS_DIR}/<class>/<split>/<stem>.tiff (float16), "
      f"{MASKS_DIR}/<class>/<split>/<stem>.png (0/255), at each image's original size",
      "tiff_compression": compression or "none",
      "images": {c: {s: len(v) for s, v in splits.items()} for c, splits in expected.items()},
      "complete_for_the_server": not differences,
      "differences_from_the_release": differences,
      "seconds": seconds,
      "per_image": rows,
  }
  fileio.atomic_write_json(out + ".json", jsonio.json_safe(rec), indent=1)
  return rec


# ----------------------------------------------------------------------------- the command


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command)."""
  fv = flag_values
  flag_checks.define_trained_run_flags(fv, "A run trained on MVTec AD 2.")
  flags.DEFINE_string(
      "out",
      None,
      "The submission folder to write (anomaly_images/, anomaly_images_thresholded/); the "
      "record of what was written goes to <out>.json beside it.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "data_root",
      None,
      "The MVTec AD 2 folder holding test_private/ and test_private_mixed/ (default: the "
      "run's data.root).",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "splits", list(PRIVATE_SPLITS), "The private test sets to score.", flag_values=fv
  )
  flags.DEFINE_integer(
      "batch_size", 0, "Images per step (default: the run's eval.batch_size).", flag_values=fv
  )
  flags.DEFINE_integer(
      "workers", 0, "Image-decoding threads (default min(8, CPUs)).", flag_values=fv
  )
  flags.DEFINE_enum(
      "tiff_compression",
      "zlib",
      ["zlib", "none"],
      "Compression of the float16 TIFFs (tifffile; MVTec's checker reads both).",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "overwrite",
      False,
      "Replace an existing --out folder (once the new submission is complete).",
      flag_values=fv,
  )
  flags.mark_flag_as_required("out", flag_values=fv)
  flag_checks.bounded(fv, "batch_size", 0, 65536)
  flag_checks.bounded(fv, "workers", 0, 256)


def run_thresholds(run: trained.Run, workdir: str, scorer: scoring.Scorer, spec) -> tuple:
  """(Thresholds, dict, where from): the run's thresholds.json when it was fitted on the
  validation split at the checkpoint's step, else fitted now on the validation split (not
  written into the run)."""
  home = trained.run_home(run, workdir)
  file = thresholds.path(home)
  if os.path.exists(file):
    d = thresholds.load_dict(file)
    if is_validation_fit(d) and d.get("step") == int(run.state.step):
      thr = thresholds.load(home, run.class_names, run.meta.get("run_id"), run.member)
      return thr, d, file
  from cras_jax.data import mvtec_ad2  # heavy (TFDS)

  dataset = mvtec_ad2.load(spec, workdir)
  if list(dataset.class_names) != run.class_names:
    raise errors.UserValueError(
        f"the run's classes {run.class_names} differ from the data's {dataset.class_names}"
    )
  d = dict(fit_on_validation(scorer, dataset), run_id=run.meta.get("run_id"))
  print(
      f"note: {file} was not fitted on the validation split at this checkpoint: thresholds "
      f"fitted now on the validation split (not written into the run)",
      file=sys.stderr,
      flush=True,
  )
  return thresholds.Thresholds.from_dict(d, source="validation"), d, "validation (fitted now)"


def _main(argv, fv: flags.FlagValues) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  splits = [s.strip() for s in fv.splits if s.strip()]
  bad = [s for s in splits if s not in PRIVATE_SPLITS]
  if bad or not splits:
    raise errors.UserValueError(f"--splits={','.join(fv.splits)}: choose from {PRIVATE_SPLITS}")
  _destination(fv.out, fv.overwrite)  # refused before anything is loaded or scored
  compile_cache.setup()
  run = trained.load_run(fv.workdir, member=fv.member)
  cfg = run.config
  entry = registry.dataset(cfg.data.name)
  if entry is None or entry.layout != "mvtec_ad2":
    raise errors.UserValueError(
        f"{fv.workdir} was trained on data.name={cfg.data.name!r}; the submission scores MVTec "
        f"AD 2's private test sets with a run trained on it (--config=configs/mvtec_ad2.py)"
    )
  why = config_bounds.scoring_memory_problem(
      cfg, len(run.class_names), fv.batch_size or None, what="--batch_size"
  )
  if why:
    raise errors.UserValueError(why)
  spec = specs.data_spec(cfg)
  if fv.data_root:
    spec = dataclasses.replace(spec, root=fv.data_root)

  root = data_lib.prepare_data_root(spec, fv.workdir)
  items = private_items(root, run.class_names, splits)  # before any scoring: bad folders
  scorer = scoring.Scorer.for_run(run, fv.batch_size or None, per_image=True)
  thr, d, source = run_thresholds(run, fv.workdir, scorer, spec)
  print(summary(d) if "validation" in d else f"thresholds from {source}", flush=True)
  print(f"scoring {len(items)} images of {', '.join(splits)} from {root}", flush=True)
  record = {
      "workdir": os.path.abspath(fv.workdir),
      "member": run.member,
      "run_id": run.meta.get("run_id"),
      "step": int(run.state.step),
      "data_root": os.path.abspath(root),
      "preprocessing": {"resize": cfg.data.resize, "crop": cfg.data.crop},
      "inverse_mapping": "bilinear between the crop's pixel centres mapped back through the "
      "resize; pixels outside the crop's extent get the map's lowest value and are not flagged",
      "thresholds": {
          "source": source,
          "rule": RULE,
          "image": thr.image_threshold,
          "pixel": thr.pixel_threshold,
          "loc": np.asarray(thr.loc).tolist(),
          "scale": np.asarray(thr.scale).tolist(),
          "units": "normalised: (s - loc[c]) / scale[c], c = matched class",
      },
  }
  rec = submit(
      scorer,
      thr,
      items,
      fv.out,
      cfg.data.resize,
      cfg.data.crop,
      limits=specs.limits(cfg),
      workers=fv.workers or min(8, os.cpu_count() or 1),
      compression=None if fv.tiff_compression == "none" else fv.tiff_compression,
      overwrite=fv.overwrite,
      record=record,
  )
  flagged = sum(r["anomalous"] for r in rec["per_image"].values())
  print(
      f"wrote {len(items)} maps and masks to {rec['folder']} in {rec['seconds']:.1f}s "
      f"({flagged} images over the image threshold); record: {rec['folder']}.json",
      flush=True,
  )
  if rec["differences_from_the_release"]:
    print(
        "note: not a complete MVTec AD 2 submission (the evaluation server's checker needs all "
        "8 classes with all their images): " + "; ".join(rec["differences_from_the_release"][:4]),
        file=sys.stderr,
        flush=True,
    )
  return 0


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """The command; SIGINT/SIGTERM stop it after the current batch (status 130/143), with
  nothing written under --out."""
  with stop_lib.StopRequest("this batch"):
    return _main(argv, flag_values)
