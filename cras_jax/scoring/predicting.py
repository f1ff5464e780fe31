"""Scoring new images with a trained run: image paths -> one record per image (its score, raw
and normalised per class, the matched class, the decision at the image threshold and the
binary defect mask), through the run's `scoring.Scorer`; `predict_paths` also writes them
(`results.writers`) and returns the summary that results.json holds.

Images are read and preprocessed by the dataset loader's own function
(`preprocess.load_example`: resize, centre crop), so the scores equal the evaluation path's;
masks and overlays are in that preprocessed frame (crop x crop). An unreadable file is reported
on stderr and in the results (its `error`) and skipped. Scoring is always per image (global
matching per image, whatever the run's `model.matching`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from cras_jax.base import errors as errors_lib
from cras_jax.base import stop as stop_lib
from cras_jax.results import tables as results
from cras_jax.results import writers
from cras_jax.runs import specs, trained
from cras_jax.scoring import ad2_evaluation, scoring
from cras_jax.scoring import thresholds as thr_lib
from cras_jax.scoring.predict_inputs import find_images, output_stems, read_images


@dataclasses.dataclass
class Record:
  """One input image's result: its row (results.csv / results.json) and, when it was scored,
  the arrays its files are made of."""

  index: int  # position among the found images
  row: dict
  image: np.ndarray | None = None  # the preprocessed uint8 crop [crop, crop, 3]
  raw_map: np.ndarray | None = None  # the anomaly map in raw units
  zmap: np.ndarray | None = None  # normalised by the matched class's loc / scale
  mask: np.ndarray | None = None  # zmap >= pixel threshold; None without a pixel threshold
  cls: int = -1  # the matched class


def calibrate_run(run: trained.Run, workdir: str) -> dict:
  """Writes the thresholds of an existing trained run into `workdir` from its test split
  (for runs trained before thresholds existed); MVTec AD 2's from its validation split."""
  dataset = trained.load_run_dataset(run, workdir)
  if getattr(dataset, "validation", None) is not None:  # MVTec AD 2: its validation split

    d = ad2_evaluation.fit_on_validation(scoring.Scorer.for_run(run, per_image=True), dataset)
    print(ad2_evaluation.summary(d), flush=True)
    return ad2_evaluation.write_thresholds(d, workdir, run.meta.get("run_id"), run.member)
  return scoring.write_thresholds(
      scoring.Scorer.for_run(run, per_image=True),
      dataset.test,
      run.class_names,
      workdir,
      run_id=run.meta.get("run_id"),
      member=run.member,
  )


def colour_scale(thr: thr_lib.Thresholds) -> tuple[float, float]:
  """Overlay colour range: normalised maps on [0, 2 x pixel threshold] (the threshold in the
  middle), raw maps (no thresholds file) on [0, 1]."""
  if thr.source != "none" and math.isfinite(thr.pixel_threshold) and thr.pixel_threshold > 0:
    return 0.0, 2.0 * thr.pixel_threshold
  return 0.0, 1.0


def score_batch(
    scorer: scoring.Scorer,
    thr: thr_lib.Thresholds,
    class_names: Sequence[str],
    indices: Sequence[int],
    images: Sequence[np.ndarray],
    paths: Sequence[str],
    names: Sequence[str],
) -> list[Record]:
  """The records of one batch of preprocessed images (paths / names: of all found images,
  indexed by `indices`). Non-finite outputs mean damaged weights: a UserValueError."""
  out = scorer(np.stack(images))
  bad = [
      paths[i]
      for j, i in enumerate(indices)
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
  image_thr, pixel_thr = thr.image_threshold, thr.pixel_threshold
  records = []
  for j, i in enumerate(indices):
    mask = zmaps[j] >= pixel_thr if math.isfinite(pixel_thr) else None
    row = {
        "name": names[i],
        "path": paths[i],
        "score": float(out["scores"][j]),
        "normalised_score": float(z[j]),
        "matched_class": class_names[int(out["cls"][j])],
        "anomalous": (int(z[j] >= image_thr) if math.isfinite(image_thr) else None),
        "defect_fraction": None if mask is None else float(mask.mean()),
        "mask": None,
        "overlay": None,
        "error": None,
    }
    cls = int(out["cls"][j])
    records.append(Record(i, row, images[j], out["maps"][j], zmaps[j], mask, cls))
  return records


def score_images(
    scorer: scoring.Scorer,
    thr: thr_lib.Thresholds,
    class_names: Sequence[str],
    read: Iterable[tuple[int, np.ndarray | None, str | None]],
    paths: Sequence[str],
    names: Sequence[str],
) -> Iterator[list[Record]]:
  """Images as they are read ((index, crop, error), `predict_inputs.read_images`) -> lists
  of records as they are known: an unreadable image alone (its row holds the error), the
  readable ones by batches of `scorer.batch_size`."""
  batch_idx, batch_images = [], []
  for i, image, err in read:
    if err is not None:
      yield [Record(i, {"name": names[i], "path": paths[i], "error": err})]
      continue
    batch_idx.append(i)
    batch_images.append(image)
    if len(batch_idx) == scorer.batch_size:
      yield score_batch(scorer, thr, class_names, batch_idx, batch_images, paths, names)
      batch_idx, batch_images = [], []
  if batch_idx:
    yield score_batch(scorer, thr, class_names, batch_idx, batch_images, paths, names)


def predict_paths(
    run: trained.Run,
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
  paths, names = [p for p, _ in items], [n for _, n in items]
  stems = output_stems(names)
  colour_range = colour_scale(thr)
  out = writers.PredictionWriter(
      output_dir, colour_range, write_masks, write_overlays, save_maps, save_crops
  )
  scorer = scoring.Scorer.for_run(run, batch_size, per_image=True)
  rows: list[dict | None] = [None] * len(items)
  errors = [{"path": p, "error": e} for p, e in missing]
  for e in errors:
    print(f"error: {e['error']}", file=sys.stderr, flush=True)
    out.row({"path": e["path"], "name": e["path"], "error": e["error"]})
  timing = {"first_batch_s": None, "first_batch_images": 0}
  bar = results.progress(total=len(items), desc="predict", unit="img") if progress else None
  t_start = time.time()
  limits = specs.limits(cfg)
  try:
    read = read_images(paths, cfg.data.resize, cfg.data.crop, workers, limits)
    for records in score_images(scorer, thr, run.class_names, read, paths, names):
      stop_lib.poll(
          "predict", f"the rows written so far (their files exist) are in {out.partial_path}"
      )
      for r in records:
        rows[r.index] = r.row
        if r.image is None:  # unreadable
          print(f"\nerror: {r.row['error']} (skipped)", file=sys.stderr, flush=True)
          errors.append({"path": r.row["path"], "error": r.row["error"]})
          out.row(r.row)
        else:
          out.add(r, stems[r.index])
      if records[0].image is not None and timing["first_batch_s"] is None:
        timing["first_batch_s"] = time.time() - t_start
        timing["first_batch_images"] = len(records)
      if bar is not None:
        bar.update(len(records))
    out.wait()
    stop_lib.poll("predict", f"every row scored is in {out.partial_path} (results.csv not written)")
  except BaseException:
    out.close(failed=True)
    raise
  out.close()
  if bar is not None:
    bar.close()
  timing = _timing(timing, time.time() - t_start, rows, batch_size)
  all_rows = [{"path": p, "name": p, "error": e} for p, e in missing] + [r for r in rows if r]
  summary = _summary(run, thr, colour_range, timing, errors, all_rows)
  out.finish(all_rows, summary, names)
  _report(summary, len(items) + len(missing), output_dir, thr)
  return summary


def _timing(timing: dict, total_s: float, rows, batch_size: int) -> dict:
  """Images/s in all and after the first batch (which includes the compilation)."""
  n_scored = sum(1 for r in rows if r is not None and r.get("error") is None)
  after = n_scored - timing["first_batch_images"]
  steady_s = total_s - (timing["first_batch_s"] or 0.0)
  return {
      **timing,
      "total_s": total_s,
      "images_per_s": n_scored / total_s if total_s > 0 else None,
      "steady_images_per_s": (after / steady_s if after > 0 and steady_s > 0 else None),
      "batch_size": batch_size,
  }


def _summary(run, thr, colour_range, timing: dict, errors: list, rows: list) -> dict:
  """What results.json holds."""
  cfg = run.config
  return {
      "step": int(run.state.step),
      "class_names": run.class_names,
      "thresholds": {
          "image": thr.image_threshold,
          "pixel": thr.pixel_threshold,
          "source": thr.source,
          "units": "raw score"
          if thr.source == "none"
          else "normalised: (s - loc[c]) / scale[c], c = matched class",
          "loc": np.asarray(thr.loc).tolist(),
          "scale": np.asarray(thr.scale).tolist(),
      },
      "preprocessing": {"resize": cfg.data.resize, "crop": cfg.data.crop},
      "overlay_colour_range": list(colour_range),
      "scored": sum(1 for r in rows if r.get("error") is None),
      "errors": errors,
      "timing": timing,
      "images": rows,
  }


def _report(summary: dict, n_inputs: int, output_dir: str, thr: thr_lib.Thresholds) -> None:
  """The closing lines on stdout (counts, speed) and stderr (notes, unreadable files)."""
  timing, errors, n_scored = summary["timing"], summary["errors"], summary["scored"]
  total_s, steady = timing["total_s"], timing["steady_images_per_s"]
  print(
      f"scored {n_scored} of {n_inputs} images in {total_s:.1f}s "
      f"({n_scored / max(total_s, 1e-9):.1f} images/s in all"
      + (f", {steady:.1f} images/s after the first batch (compilation)" if steady else "")
      + f"); {len(errors)} unreadable; results in {output_dir}",
      flush=True,
  )
  if thr.source == "none" and not (
      math.isfinite(thr.image_threshold) and math.isfinite(thr.pixel_threshold)
  ):
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
