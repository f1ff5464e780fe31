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
`--calibrate` computes it for an existing run; a population's `--member`:
<workdir>/results/<member>/thresholds.json), `--image_threshold` / `--pixel_threshold`
override them (normalised units; raw units when the run has no thresholds file).
Scoring is always per image: a run configured with batch-mode class voting
(model.matching="batch", whose result depends on the batch's other images) is scored with
per-image matching, and a note says so.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cras_jax.base import compile_cache, flag_checks
from cras_jax.base import errors as errors_lib
from cras_jax.base import stop as stop_lib
from cras_jax.config import bounds as config_bounds
from cras_jax.runs import trained
from cras_jax.scoring import predicting, scoring
from cras_jax.scoring.predict_inputs import find_images

# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command); its arguments are the images
  and folders to score."""
  fv = flag_values
  flag_checks.define_trained_run_flags(fv)
  flags.DEFINE_string(
      "output_dir",
      None,
      "Where to write results (default <workdir>/predictions).",
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
  for name in ("image_threshold", "pixel_threshold"):
    flag_checks.bounded(fv, name)


def _main(argv, flag_values: flags.FlagValues) -> int:
  fv = flag_values
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  compile_cache.setup()  # before anything compiles: later starts reuse the steps
  inputs = argv[1:]
  for name, what in (("batch_size", "the run's eval.batch_size"), ("workers", "min(8, CPUs)")):
    if fv[name].value < 0:
      raise errors_lib.UserValueError(f"--{name}={fv[name].value}: must be >= 0 (0: {what})")
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
  run = trained.load_run(fv.workdir, member=fv.member)
  why = config_bounds.scoring_memory_problem(
      run.config, len(run.class_names), fv.batch_size or None, what="--batch_size"
  )
  if why:
    raise errors_lib.UserValueError(why)
  home = trained.run_home(run, fv.workdir)  # thresholds.json: the workdir, or a member's results
  if fv.calibrate:
    predicting.calibrate_run(run, home)
  if not inputs:
    return 0
  thr = scoring.load_thresholds(run, home, fv.image_threshold, fv.pixel_threshold)
  out_dir = fv.output_dir or os.path.join(home, "predictions")
  summary = predicting.predict_paths(
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


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """The command; SIGINT/SIGTERM stop it after the current batch (status 130/143), leaving
  results.csv.partial with the rows whose files were written."""
  with stop_lib.StopRequest("this batch"):
    return _main(argv, flag_values)


if __name__ == "__main__":
  define_flags()
  errors_lib.define_verbose_flag()
  errors_lib.run(main)
