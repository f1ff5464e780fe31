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
is placed between validation values (`threshold_fit.separating_threshold`, as every threshold of
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
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from cras_jax import data as data_lib
from cras_jax.base import compile_cache, errors, fileio, flag_checks, fs, jsonio, registry
from cras_jax.base import stop as stop_lib
from cras_jax.config import bounds as config_bounds
from cras_jax.data import preprocess
from cras_jax.results import tables as results
from cras_jax.runs import specs, trained
from cras_jax.scoring import scoring, thresholds
from cras_jax.scoring.ad2_evaluation import (
    RULE,
    fit_on_validation,
    is_validation_fit,
    summary,
)
from cras_jax.scoring.submission_format import (
    MAPS_DIR,
    MASKS_DIR,
    PRIVATE_SPLITS,
    Item,
    map_path,
    mask_path,
    official_differences,
    private_items,
    structure_problems,
    to_original,
    write_map,
    write_mask,
)


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
  dataset = data_lib.load(spec, workdir)  # MVTec AD 2's layout, with its validation split
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
