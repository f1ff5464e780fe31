"""Scoring new images with a trained run.

    python -m cras_jax.predict --workdir=<trained run> <images or folders>...

For every image: its anomaly score (raw and normalised per class), the matched class, the
decision at the image threshold, a binary defect mask (normalised map >= pixel threshold) and a
heatmap overlay, written under --output_dir (default <workdir>/predictions):
results.csv, results.json, masks/<name>.png, overlays/<name>.png. Folders are searched
recursively for .png/.jpg/.jpeg/.bmp/.tif/.tiff files; files named explicitly are read
whatever their extension. Images are read and preprocessed by the dataset loader's own
function (`preprocess.load_example`: resize, centre crop), so the scores equal the evaluation
path's; masks and overlays are in that preprocessed frame (crop x crop).

An unreadable file is reported on stderr and in the results (column `error`) and skipped;
the exit status is 1 only when no image could be scored.

Thresholds come from <workdir>/thresholds.json (written at the end of training;
`--calibrate` computes it for an existing run), `--image_threshold` / `--pixel_threshold`
override them (normalised units; raw units when the run has no thresholds file).
Scoring is always per image: a run configured with batch-mode class voting
(model.matching="batch", whose result depends on the batch's other images) is scored with
per-image matching, and a note says so.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image

from cras_jax.base import errors as errors_lib
from cras_jax.data import preprocess
from cras_jax.runs import results, scoring
from cras_jax.runs import thresholds as thr_lib
from cras_jax.runs import workdir as runs
from cras_jax.runs.predict_inputs import find_images, output_stems, read_images

OVERLAY_ALPHA = 0.45
# Rows are appended here (flushed per batch) while scoring; results.csv and results.json are
# written at the end and renamed into place, so a run that fails late keeps its rows.
PARTIAL_CSV = "results.csv.partial"


# ----------------------------------------------------------------------------- scoring


def calibrate_run(run: runs.Run, workdir: str) -> dict:
  """`--calibrate`: writes the thresholds of an existing trained run into `workdir` from its
  test split (for runs trained before thresholds existed)."""
  dataset = runs.load_run_dataset(run, workdir)
  return scoring.write_thresholds(
      scoring.Scorer.for_run(run, per_image=True), dataset.test, run.class_names, workdir
  )


# ----------------------------------------------------------------------------- outputs


def overlay(
    image: np.ndarray, zmap: np.ndarray, mask: np.ndarray | None, vmax: float, vmin: float = 0.0
) -> np.ndarray:
  """The image with the map in the 'jet' colours on [vmin, vmax] blended over it and the
  outline of the binary mask in white -> uint8 [H, W, 3]."""
  import matplotlib  # here only: the colour map of overlays (--nooverlays needs none)

  heat = np.clip((zmap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  rgb = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
  out = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * rgb
  if mask is not None and mask.any():
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out[mask & ~inner] = 255.0
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _write_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array).save(path)


def colour_scale(thr: thr_lib.Thresholds) -> tuple[float, float]:
  """Overlay colour range: normalised maps on [0, 2 x pixel threshold] (the threshold in the
  middle), raw maps (no thresholds file) on [0, 1]."""
  if thr.source != "none" and math.isfinite(thr.pixel_threshold) and thr.pixel_threshold > 0:
    return 0.0, 2.0 * thr.pixel_threshold
  return 0.0, 1.0


CSV_FIELDS = (
    "name",
    "path",
    "score",
    "normalised_score",
    "matched_class",
    "is_anomaly",
    "defect_fraction",
    "mask",
    "overlay",
    "error",
)


def _fmt(v):
  if isinstance(v, float):
    return "" if not math.isfinite(v) else f"{v:.6f}"
  return "" if v is None else v


def predict_paths(
    run,
    thr: thr_lib.Thresholds,
    inputs: Sequence[str],
    output_dir: str,
    batch_size: int = 0,
    write_masks: bool = True,
    write_overlays: bool = True,
    save_maps: bool = False,
    save_crops: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    found=None,
) -> dict:
  """Scores images and folders with a loaded run; writes the outputs; returns a summary
  (rows in input order, errors, timings). found: `find_images(inputs)` when already known."""
  cfg = run.config
  batch_size = batch_size or cfg.eval.batch_size
  workers = workers or min(8, os.cpu_count() or 1)
  items, missing = find_images(inputs) if found is None else found
  paths = [p for p, _ in items]
  names = [n for _, n in items]
  stems = output_stems(names)
  os.makedirs(output_dir, exist_ok=True)
  for sub, on in (("masks", write_masks), ("overlays", write_overlays)):
    if on:
      os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  scorer = scoring.Scorer.for_run(run, batch_size, per_image=True)
  vmin, vmax = colour_scale(thr)
  image_thr, pixel_thr = thr.image_threshold, thr.pixel_threshold

  rows: list[dict | None] = [None] * len(items)
  errors = [{"path": p, "error": e} for p, e in missing]
  for p, e in missing:
    print(f"error: {e}", file=sys.stderr, flush=True)
  kept_maps, kept_crops = {}, {}
  writer = concurrent.futures.ThreadPoolExecutor(2)
  writes = []
  timing = {"first_batch_s": None, "first_batch_images": 0}
  bar = results.progress(total=len(items), desc="predict", unit="img") if progress else None
  t_start = time.time()

  partial_path = os.path.join(output_dir, PARTIAL_CSV)
  partial = open(partial_path, "w", newline="")
  partial_csv = csv.writer(partial)
  partial_csv.writerow(CSV_FIELDS)

  def record(new_rows):  # every row on disk as soon as it is known (results.csv.partial)
    for r in new_rows:
      partial_csv.writerow([_fmt(r.get(k)) for k in CSV_FIELDS])
    partial.flush()

  record([{"path": p, "name": p, "error": e} for p, e in missing])

  def flush(batch_idx, batch_images):
    out = scorer(np.stack(batch_images))
    bad = [
        paths[i]
        for j, i in enumerate(batch_idx)
        if not (np.isfinite(out["scores"][j]) and np.isfinite(out["maps"][j]).all())
    ]
    if bad:
      raise errors_lib.UserValueError(
          f"the model gives non-finite scores or maps for {len(bad)} image(s) "
          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): its weights are damaged "
          f"(non-finite values); retrain or restore an earlier checkpoint"
      )
    norm = scoring.normalise(out, thr)
    z, zmaps = norm["normalised_scores"], norm["normalised_maps"]
    for j, i in enumerate(batch_idx):
      mask = zmaps[j] >= pixel_thr if math.isfinite(pixel_thr) else None
      row = {
          "name": names[i],
          "path": paths[i],
          "score": float(out["scores"][j]),
          "normalised_score": float(z[j]),
          "matched_class": run.class_names[int(out["cls"][j])],
          "is_anomaly": (int(z[j] >= image_thr) if math.isfinite(image_thr) else None),
          "defect_fraction": None if mask is None else float(mask.mean()),
          "mask": None,
          "overlay": None,
          "error": None,
      }
      if write_masks and mask is not None:
        row["mask"] = os.path.join("masks", stems[i] + ".png")
        writes.append(
            writer.submit(
                _write_png, os.path.join(output_dir, row["mask"]), mask.astype(np.uint8) * 255
            )
        )
      if write_overlays:
        row["overlay"] = os.path.join("overlays", stems[i] + ".png")
        writes.append(
            writer.submit(
                lambda path, img, zm, m: _write_png(path, overlay(img, zm, m, vmax, vmin)),
                os.path.join(output_dir, row["overlay"]),
                batch_images[j],
                zmaps[j],
                mask,
            )
        )
      rows[i] = row
      record([row])
      if save_maps:
        kept_maps[i] = (out["maps"][j], int(out["cls"][j]))
      if save_crops:
        kept_crops[i] = batch_images[j]
    if timing["first_batch_s"] is None:
      timing["first_batch_s"] = time.time() - t_start
      timing["first_batch_images"] = len(batch_idx)
    if bar is not None:
      bar.update(len(batch_idx))

  def _score_all(items_read):
    batch_idx, batch_images = [], []
    for i, image, err in items_read:
      if err is not None:
        print(f"\nerror: {err} (skipped)", file=sys.stderr, flush=True)
        errors.append({"path": paths[i], "error": err})
        rows[i] = {"name": names[i], "path": paths[i], "error": err}
        record([rows[i]])
        if bar is not None:
          bar.update(1)
        continue
      batch_idx.append(i)
      batch_images.append(image)
      if len(batch_idx) == batch_size:
        flush(batch_idx, batch_images)
        batch_idx, batch_images = [], []
    if batch_idx:
      flush(batch_idx, batch_images)

  limits = preprocess.Limits.of_config(cfg)
  try:
    _score_all(read_images(paths, cfg.data.resize, cfg.data.crop, workers, limits))
    for w in writes:
      w.result()
  except BaseException:
    partial.close()
    print(
        f"\nscoring stopped; the rows scored so far are in {partial_path}",
        file=sys.stderr,
        flush=True,
    )
    raise
  finally:
    writer.shutdown()
  partial.close()
  if bar is not None:
    bar.close()
  total_s = time.time() - t_start

  scored = [r for r in rows if r is not None and r.get("error") is None]
  n_scored = len(scored)
  after = n_scored - timing["first_batch_images"]
  steady_s = total_s - (timing["first_batch_s"] or 0.0)
  timing.update(
      total_s=total_s,
      images_per_s=n_scored / total_s if total_s > 0 else None,
      steady_images_per_s=(after / steady_s if after > 0 and steady_s > 0 else None),
      batch_size=batch_size,
  )
  all_rows = [{"path": p, "name": p, "error": e} for p, e in missing] + [r for r in rows if r]
  csv_path = os.path.join(output_dir, "results.csv")
  with open(csv_path + ".tmp", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(CSV_FIELDS)
    for r in all_rows:
      w.writerow([_fmt(r.get(k)) for k in CSV_FIELDS])
  summary = {
      "step": int(run.state.step),
      "class_names": run.class_names,
      "thresholds": {
          "image": image_thr,
          "pixel": pixel_thr,
          "source": thr.source,
          "units": "raw score"
          if thr.source == "none"
          else "normalised: (s - loc[c]) / scale[c], c = matched class",
          "loc": np.asarray(thr.loc).tolist(),
          "scale": np.asarray(thr.scale).tolist(),
      },
      "preprocessing": {"resize": cfg.data.resize, "crop": cfg.data.crop},
      "overlay_colour_range": [vmin, vmax],
      "scored": n_scored,
      "errors": errors,
      "timing": timing,
      "images": all_rows,
  }
  json_path = os.path.join(output_dir, "results.json")
  with open(json_path + ".tmp", "w") as f:
    json.dump(thr_lib.json_safe(summary), f, indent=2)
  # Both complete: published by renames (atomic), then the partial rows are dropped.
  os.replace(csv_path + ".tmp", csv_path)
  os.replace(json_path + ".tmp", json_path)
  os.remove(partial_path)
  order = sorted(kept_maps)
  if save_maps and order:
    np.savez(
        os.path.join(output_dir, "maps.npz"),
        names=np.asarray([names[i] for i in order]),
        maps=np.stack([kept_maps[i][0] for i in order]),
        cls=np.asarray([kept_maps[i][1] for i in order], np.int32),
    )
  if save_crops and kept_crops:
    np.save(save_crops, np.stack([kept_crops[i] for i in sorted(kept_crops)]))
  steady = timing["steady_images_per_s"]
  print(
      f"scored {n_scored} of {len(items) + len(missing)} images in {total_s:.1f}s "
      f"({n_scored / max(total_s, 1e-9):.1f} images/s in all"
      + (f", {steady:.1f} images/s after the first batch (compilation)" if steady else "")
      + f"); {len(errors)} unreadable; results in {output_dir}",
      flush=True,
  )
  if thr.source == "none" and not (math.isfinite(image_thr) and math.isfinite(pixel_thr)):
    print(
        "note: this run has no thresholds.json: decisions and masks need thresholds; "
        "compute them with --calibrate or give --image_threshold / --pixel_threshold "
        "(raw scores).",
        file=sys.stderr,
        flush=True,
    )
  if errors:
    print(
        f"{len(errors)} file(s) could not be scored: " + ", ".join(e["path"] for e in errors),
        file=sys.stderr,
        flush=True,
    )
  return summary


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command); its arguments are the images
  and folders to score."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "A trained run's directory.", flag_values=fv)
  flags.DEFINE_string(
      "output_dir",
      None,
      "Where to write results (default " "<workdir>/predictions).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "batch_size", 0, "Images per step (default: the run's eval.batch_size).", flag_values=fv
  )
  flags.DEFINE_float(
      "image_threshold",
      None,
      "Override the image threshold (normalised score; "
      "raw score when the run has no thresholds.json).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "pixel_threshold", None, "Override the pixel threshold (normalised map).", flag_values=fv
  )
  flags.DEFINE_bool(
      "calibrate",
      False,
      "Compute <workdir>/thresholds.json from the run's "
      "test split first (for runs trained before thresholds existed).",
      flag_values=fv,
  )
  flags.DEFINE_bool("masks", True, "Write masks/<name>.png (0/255).", flag_values=fv)
  flags.DEFINE_bool(
      "overlays", True, "Write overlays/<name>.png (heatmap over the image).", flag_values=fv
  )
  flags.DEFINE_bool(
      "save_maps", False, "Also write maps.npz (raw maps, matched classes).", flag_values=fv
  )
  flags.DEFINE_string(
      "save_crops",
      None,
      "Also write the preprocessed uint8 crops "
      "[N, crop, crop, 3] of the scored images to this .npy file (the input "
      "of cras_jax/run_exported.py).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "workers", 0, "Image-decoding threads (default min(8, CPUs)).", flag_values=fv
  )
  flags.mark_flag_as_required("workdir", flag_values=fv)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  fv = flag_values
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  inputs = argv[1:]
  if not inputs and not fv.calibrate:
    raise app.UsageError("give the images or folders to score (or --calibrate)")
  found = find_images(inputs)
  if inputs and not found[0]:
    for p, e in found[1]:
      print(f"error: {e}", file=sys.stderr)
    print(
        "nothing to score: no image files found in " + ", ".join(inputs),
        file=sys.stderr,
        flush=True,
    )
    return 1
  run = runs.load_run(fv.workdir)
  if fv.calibrate:
    calibrate_run(run, fv.workdir)
  if not inputs:
    return 0
  thr = scoring.load_thresholds(run, fv.workdir, fv.image_threshold, fv.pixel_threshold)
  out_dir = fv.output_dir or os.path.join(fv.workdir, "predictions")
  summary = predict_paths(
      run,
      thr,
      inputs,
      out_dir,
      fv.batch_size,
      fv.masks,
      fv.overlays,
      fv.save_maps,
      fv.save_crops,
      fv.workers or None,
      found=found,
  )
  return 0 if summary["scored"] else 1


if __name__ == "__main__":
  define_flags()
  errors_lib.define_verbose_flag()
  app.run(errors_lib.exit_on_user_error(main))
