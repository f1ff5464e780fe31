"""Decision thresholds and per-class score normalisation (pure NumPy).

A trained run scores an image with a probability-like number whose normal level differs
from class to class. So that one image threshold and one pixel threshold serve every class,
scores and maps are normalised per class first:

    z = (s - loc[c]) / scale[c]

with c the class the image was *matched* to (the only class known when scoring new images),
loc[c] the median score of the normal calibration images matched to c, and scale[c] their
`quantile` (0.99) score minus loc[c]: a normal image at the median gives 0, one at the 99th
percentile gives 1. Maps are normalised with the same (loc, scale) as the image score.
When a class has fewer than two normal calibration images (or they all score the same),
scale[c] falls back to the median of the other classes' scales, then to the spread of all
normal calibration scores pooled, then to 1 (`scale_source` records which).

Calibration data: the test split, divided deterministically into a *calibration* part and a
*report* part: within each (class, normal/defective) group the images are ordered by the
SHA-256 of their file name and the first ceil(n/2) calibrate. The model is never selected on
either part (the default protocol is the final epoch); thresholds are chosen on the
calibration part only and the report part measures them. Thresholds do not change AUROC.

* image threshold: the F1-optimal threshold on the calibration part's normalised scores (all
  classes pooled; an image is anomalous when z >= threshold). Without defective calibration
  images (e.g. a folder of normal images only): the `quantile` of the normal normalised scores.
* pixel threshold: likewise on the normalised maps of the calibration images with masks (on
  every k-th pixel beyond `MAX_PIXELS`).

Either threshold lies BETWEEN calibration values, never on one
(`threshold_fit.separating_threshold`): the
float32 midway between the lowest value flagged and the highest one not flagged (beyond the
extreme value when all or none are flagged). The decisions on the calibration images are those
of the chosen optimum or quantile, with `>=` or `>` alike, and a scorer whose values differ
from JAX's by less than half that gap (the ONNX export's, ~1e-6) makes the same decisions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from cras_jax.base import errors, fileio, jsonio

FILE_NAME = "thresholds.json"
FORMAT_VERSION = 1
QUANTILE = 0.99
MAX_PIXELS = 20_000_000  # pixel F1 on every k-th pixel beyond this
MAX_CANDIDATES = 4096  # candidate thresholds when there are more distinct values


# ----------------------------------------------------------------------------- the split


def name_hash(name: str) -> int:
  return int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:8], "big")


def calibration_mask(names: Sequence[str], labels, is_anomaly) -> np.ndarray:
  """True for the calibration part: ceil(n/2) of each (class, is_anomaly) group, chosen by
  the hash of the file name (independent of order and of the other images)."""
  labels, is_anomaly = np.asarray(labels), np.asarray(is_anomaly)
  out = np.zeros(len(names), bool)
  for key in sorted(set(zip(labels.tolist(), is_anomaly.tolist()))):
    idx = np.flatnonzero((labels == key[0]) & (is_anomaly == key[1]))
    order = sorted(idx, key=lambda i: (name_hash(names[i]), str(names[i])))
    out[order[: math.ceil(len(order) / 2)]] = True
  return out


# ----------------------------------------------------------------------------- normalisation


def normalisation(scores, cls, num_classes: int, quantile: float = QUANTILE):
  """(loc [K], scale [K], info) from the scores of normal images and their matched class."""
  scores = np.asarray(scores, np.float64)
  cls = np.asarray(cls)
  loc = np.full(num_classes, np.nan)
  scale = np.full(num_classes, np.nan)
  counts = np.array([int(np.sum(cls == k)) for k in range(num_classes)])
  loc_source, scale_source = [""] * num_classes, [""] * num_classes
  for k in range(num_classes):
    s = scores[cls == k]
    if s.size:
      loc[k], loc_source[k] = np.median(s), "class"
    if s.size >= 2:
      spread = np.quantile(s, quantile) - loc[k]
      if spread > 1e-12:
        scale[k], scale_source[k] = spread, "class"
  if np.isnan(loc).any():
    fill, source = (
        (float(np.nanmedian(loc)), "median_of_classes") if np.isfinite(loc).any() else (0.0, "zero")
    )
    for k in np.flatnonzero(np.isnan(loc)):
      loc[k], loc_source[k] = fill, source
  if np.isnan(scale).any():
    valid = scale[np.isfinite(scale)]
    if valid.size:
      fill, source = float(np.median(valid)), "median_of_classes"
    else:
      spread = (np.quantile(scores, quantile) - np.median(scores)) if scores.size >= 2 else 0.0
      fill, source = (spread, "pooled") if spread > 1e-12 else (1.0, "unit")
    for k in np.flatnonzero(np.isnan(scale)):
      scale[k], scale_source[k] = fill, source
  info = {"n_normal": counts.tolist(), "loc_source": loc_source, "scale_source": scale_source}
  return loc, scale, info


def normalise(scores, cls, loc, scale) -> np.ndarray:
  """Image scores [B] -> z [B] (float32, as the exported function computes it)."""
  loc, scale = np.asarray(loc, np.float32), np.asarray(scale, np.float32)
  cls = np.asarray(cls)
  return ((np.asarray(scores, np.float32) - loc[cls]) / scale[cls]).astype(np.float32)


def normalise_maps(maps, cls, loc, scale) -> np.ndarray:
  """Maps [B, H, W] -> z maps [B, H, W] with each image's matched-class parameters."""
  loc, scale = np.asarray(loc, np.float32), np.asarray(scale, np.float32)
  cls = np.asarray(cls)
  return (
      (np.asarray(maps, np.float32) - loc[cls][:, None, None]) / scale[cls][:, None, None]
  ).astype(np.float32)


# ----------------------------------------------------------------------------- the file


@dataclasses.dataclass
class Thresholds:
  """What scoring needs: per-class normalisation and the two thresholds."""

  class_names: list
  loc: np.ndarray
  scale: np.ndarray
  image_threshold: float
  pixel_threshold: float
  source: str = "file"
  step: int | None = None  # the checkpoint step the thresholds were calibrated on

  @classmethod
  def from_dict(cls, d: dict, source: str = "file") -> Thresholds:
    n = d["normalisation"]
    return cls(
        list(d["class_names"]),
        np.asarray(n["loc"], np.float32),
        np.asarray(n["scale"], np.float32),
        float(d["image_threshold"]),
        float(d["pixel_threshold"]),
        source,
        d.get("step"),
    )

  @classmethod
  def identity(cls, class_names) -> Thresholds:
    """No calibration: raw scores (loc 0, scale 1) and no thresholds (NaN)."""
    k = len(class_names)
    return cls(
        list(class_names),
        np.zeros(k, np.float32),
        np.ones(k, np.float32),
        float("nan"),
        float("nan"),
        "none",
    )

  def with_overrides(self, image_threshold=None, pixel_threshold=None) -> Thresholds:
    out = dataclasses.replace(self)
    if image_threshold is not None:
      out.image_threshold = float(image_threshold)
    if pixel_threshold is not None:
      out.pixel_threshold = float(pixel_threshold)
    return out


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE_NAME)


def save(d: dict, file: str) -> None:
  fileio.atomic_write_json(file, jsonio.json_safe(d))


def load_dict(file: str) -> dict:
  """The JSON object in `file`; a `UserValueError` naming the file when it is not one."""
  try:
    with open(file, encoding="utf-8") as f:
      d = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UserValueError(
        f"{file} is not valid JSON ({type(e).__name__}: {e}); recompute it with "
        f"python -m cras_jax.predict --calibrate --workdir=<run>"
    ) from None
  if not isinstance(d, dict):
    raise errors.UserValueError(f"{file}: expected a JSON object; recompute it with --calibrate")
  return d


def _real(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def problems(d: dict, class_names: Sequence[str]) -> list[str]:
  """What makes a thresholds dict unusable for a run of `class_names`: every field scoring
  reads, checked for type, finiteness, sign and one entry per class."""
  out = []
  k = len(class_names)
  names = d.get("class_names")
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    out.append("class_names: missing or not a list of names")
  elif names != list(class_names):
    out.append(f"class_names: made for {names}, the run has {list(class_names)}")
  for key in ("image_threshold", "pixel_threshold"):  # null: no threshold (none stored)
    v = d.get(key, "<absent>")
    if v is not None and not (_real(v) and math.isfinite(v)):
      out.append(f"{key}={v!r}: must be a finite number or null")
  n = d.get("normalisation")
  if not isinstance(n, dict):
    return out + ["normalisation: missing or not an object"]
  for key, positive in (("loc", False), ("scale", True)):
    v = n.get(key)
    if not isinstance(v, list) or len(v) != k:
      out.append(
          f"normalisation.{key}: must be a list of {k} numbers, one per class "
          f"(got {len(v) if isinstance(v, list) else type(v).__name__})"
      )
      continue
    bad = [
        i
        for i, x in enumerate(v)
        if not (_real(x) and math.isfinite(x) and (x > 0 or not positive))
    ]
    if bad:
      what = "finite and > 0" if positive else "finite numbers"
      out.append(
          f"normalisation.{key}: entries must be {what}; not so for "
          + ", ".join(f"{class_names[i]} ({v[i]!r})" for i in bad[:5])
      )
  step = d.get("step")
  if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
    out.append(f"step={step!r}: must be a checkpoint step (an integer >= 0) or absent")
  return out


def load(
    workdir: str,
    class_names: Sequence[str],
    run_id: str | None = None,
    member: str | None = None,
) -> Thresholds | None:
  """The workdir's thresholds, validated (`problems`: a `UserValueError` naming every bad
  field), or None when it has none (older runs: `--calibrate`). run_id: the run they are for;
  a file fitted on another run (a copied or stale thresholds.json), or one that does not say
  which run it was fitted on, is refused; so is, in a population, one of another member."""
  file = path(workdir)
  if not os.path.exists(file):
    return None
  d = load_dict(file)
  bad = problems(d, class_names)
  if not bad and run_id is not None and d.get("run_id") != run_id:
    bad = [
        f"run_id={d.get('run_id')!r}: fitted on another run than this one (run id {run_id})"
        if d.get("run_id")
        else f"it does not name the run it was fitted on (this run's id is {run_id})"
    ]
  if not bad and run_id is not None and d.get("member") != member:
    bad = [f"member={d.get('member')!r}: fitted on another member than {member!r}"]
  if bad:
    raise errors.UserValueError(
        f"{file} cannot be used:\n  "
        + "\n  ".join(bad)
        + f"\nrecompute it with python -m cras_jax.predict --calibrate --workdir={workdir}"
    )
  d["image_threshold"] = float("nan") if d["image_threshold"] is None else d["image_threshold"]
  d["pixel_threshold"] = float("nan") if d["pixel_threshold"] is None else d["pixel_threshold"]
  return Thresholds.from_dict(d)


def summary(d: dict) -> str:
  """One line for the log."""

  def f(x):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"

  rep = d["report"]
  line = (
      f"thresholds: image {f(d['image_threshold'])} ({d['rules']['image']}), pixel "
      f"{f(d['pixel_threshold'])} ({d['rules']['pixel']}) on normalised scores; report "
      f"part ({rep['images']} images): image P/R/F1 {f(rep['image']['precision'])}/"
      f"{f(rep['image']['recall'])}/{f(rep['image']['f1'])}"
  )
  if "pixel" in rep:
    line += (
        f", pixel P/R/F1 {f(rep['pixel']['precision'])}/{f(rep['pixel']['recall'])}/"
        f"{f(rep['pixel']['f1'])}"
    )
  return line
