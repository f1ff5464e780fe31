"""Robustness evaluation (docs/method.md §11, the paper's Table 7): a trained model scored on
perturbed test images, reporting the drop against the clean score.

python -m cras_jax.robustness --workdir=runs/demo [--perturbations=noise,jitter,rotation]
    [--seed=0] [--noise_std=0.01]

The perturbations are pure numpy functions of uint8 images [H, W, 3] (the loader's resized
and cropped test images); every image gets its own generator,
``numpy.random.default_rng([seed, perturbation id, image index in the split])``, so the
results do not depend on the batch size or the device count.

* ``noise``: x / 255 + N(0, noise_std^2) per pixel and channel (Table 7: std 0.01), clipped to
  [0, 1], rounded back to uint8.
* ``jitter``: torchvision ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` with the semantics of its tensor
  (uint8) path: the four ops in a random order (``randperm(4)``), brightness / contrast /
  saturation factors uniform in [1 - 0.1, 1 + 0.1], a hue shift uniform in [-0.1, 0.1]; each
  op truncates to uint8 as torchvision does. An op of strength 0 is skipped, as there.
* ``rotation``: an angle uniform in [-5, 5] degrees (positive = counter-clockwise, as
  torchvision and ``scipy.ndimage.rotate``), about the image centre ((n - 1) / 2), same size,
  bilinear for the image (rounded to uint8) and nearest-neighbour for the ground-truth mask
  with the same coordinates, so pixel metrics stay aligned. Border fill: ``reflect`` by default
  (SciPy's mode, d c b a | a b c d): torchvision's ``RandomRotation`` fills the corners with
  black, which on these images adds dark corner regions that no test image has, so the drop
  would measure that artifact as much as the rotation; ``--rotation_fill=constant`` gives the
  black corners (the mask's corners are then normal), ``nearest`` repeats the edge pixels.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from absl import app, flags, logging

from cras_jax.base import compile_cache, csv_cells, fileio, flag_checks
from cras_jax.base import markdown as md
from cras_jax.base import stop as stop_lib
from cras_jax.data.perturbations import FILL_MODES, PERTURBATIONS, PerturbedSource, Settings
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import tables as results
from cras_jax.runs import trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate, scoring

METRICS = ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro", "match_acc")


def _drops(clean: dict, other: dict) -> dict:
  """clean - perturbed, in points, per class and metric."""
  return {
      c: {m: 100.0 * (clean[c][m] - other[c][m]) for m in clean[c] if m in other.get(c, {})}
      for c in clean
  }


def evaluate_robustness(
    run,
    dataset,
    perturbations=PERTURBATIONS,
    seed: int = 0,
    settings: Settings = Settings(),
    batch_size: int | None = None,
) -> dict:
  """Scores the clean test split and each perturbed version.

  -> dict(tables={setting: per-class metrics (fractions, with a 'mean' row)},
          drops={perturbation: {class: {metric: clean - perturbed in points}}}, ...)
  """
  scorer = scoring.Scorer.for_run(run, batch_size)
  fpr = run.config.eval.fpr_limit

  def score(source):
    return results.class_metrics(scorer.predict_dataset(source), dataset.class_names, fpr)

  tables = {"clean": score(dataset.test)}
  for p in perturbations:
    tables[p] = score(PerturbedSource(dataset.test, p, seed, settings))
  drops = {p: _drops(tables["clean"], tables[p]) for p in perturbations}
  return {
      **evaluate.checkpoint_protocol(run, dataset),
      "seed": seed,
      "settings": dataclasses.asdict(settings),
      "perturbations": list(perturbations),
      "test_images": len(dataset.test),
      "tables": tables,
      "drops": drops,
  }


def _fmt(v: float) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def markdown(result: dict) -> str:
  tables, drops, perts = result["tables"], result["drops"], result["perturbations"]
  names = {m: metrics_lib.METRIC_NAMES.get(m, m) for m in METRICS}
  s = result["settings"]
  lines = [
      f"Robustness (docs/method.md §11, Table 7): {result['protocol']}; image score: "
      f"{result['score_mode']}; matching: {result['matching']}; seed {result['seed']}; "
      f"{result['test_images']} test images.",
      f"Perturbations: noise N(0, {s['noise_std']}^2) on [0, 1]; colour jitter brightness "
      f"{s['brightness']}, contrast {s['contrast']}, saturation {s['saturation']}, hue "
      f"{s['hue']} (torchvision ColorJitter); rotation uniform in +-{s['max_angle']} deg "
      f"(bilinear, fill {s['rotation_fill']}, masks rotated with the images).",
      "",
      "Mean over classes; drop = clean - perturbed, in points.",
      "",
  ]
  header = "| setting | " + " | ".join(f"{names[m]} | drop" for m in METRICS) + " |"
  lines += [header, "|---|" + "---:|---:|" * len(METRICS)]
  for setting, table in tables.items():
    cells = []
    for m in METRICS:
      v = table["mean"].get(m)
      d = drops[setting]["mean"].get(m) if setting in drops else None
      cells += [_fmt(None if v is None else 100 * v), _fmt(d) if setting in drops else ""]
    lines.append(f"| {setting} | " + " | ".join(cells) + " |")
  if perts:
    cells = []
    for m in METRICS:  # the average drop over the perturbations (the paper's summary)
      d = [drops[p]["mean"].get(m, math.nan) for p in perts]
      cells += ["", _fmt(float(np.mean(d)))]
    lines.append("| mean drop | " + " | ".join(cells) + " |")
  for m in ("i_auroc", "p_auroc"):
    lines += [
        "",
        f"{names[m]} per class (drop in brackets).",
        "",
        "| class | clean | " + " | ".join(perts) + " |",
        "|---|---:|" + "---:|" * len(perts),
    ]
    for c in tables["clean"]:
      cells = [_fmt(100 * tables["clean"][c][m])]
      cells += [f"{_fmt(100 * tables[p][c][m])} ({_fmt(drops[p][c][m])})" for p in perts]
      lines.append(f"| {md.cell(c)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str, stem: str) -> list[str]:
  """<out_dir>/<stem>.{json,csv,md}; the CSV has one row per (setting, class, metric)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}.{e}") for e in ("json", "csv", "md")]
  fileio.atomic_write_json(paths[0], {**result, "versions": results.versions()})
  with fileio.atomic_write(paths[1], "w", newline="") as f:
    w = csv_cells.writer(f)
    w.writerow(["setting", "class", "metric", "value_pts", "drop_pts"])
    for setting, table in result["tables"].items():
      for c, row in table.items():
        for m, v in row.items():
          d = result["drops"].get(setting, {}).get(c, {}).get(m)
          w.writerow([setting, c, m, repr(100.0 * v), "" if d is None else repr(d)])
  fileio.atomic_write_text(paths[2], markdown(result))
  return paths


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command)."""
  fv = flag_values
  flag_checks.define_trained_run_flags(fv)
  flags.DEFINE_list(
      "perturbations",
      list(PERTURBATIONS),
      "Comma-separated subset of " + ",".join(PERTURBATIONS) + ".",
      flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Perturbation seed.", flag_values=fv)
  flags.DEFINE_float(
      "noise_std", Settings.noise_std, "Gaussian noise std on [0, 1].", flag_values=fv
  )
  flags.DEFINE_float(
      "jitter", 0.1, "Brightness, contrast, saturation and hue strength.", flag_values=fv
  )
  flags.DEFINE_float(
      "max_angle", Settings.max_angle, "Largest rotation, in degrees.", flag_values=fv
  )
  flags.DEFINE_enum(
      "rotation_fill",
      Settings.rotation_fill,
      sorted(FILL_MODES),
      "Border fill of the rotation.",
      flag_values=fv,
  )
  flags.DEFINE_integer("batch_size", None, "Default: the run's eval batch size.", flag_values=fv)
  flags.DEFINE_string(
      "data_root", None, "Default: the data the run was trained on.", flag_values=fv
  )
  flags.DEFINE_string(
      "output_dir",
      None,
      "Default: <workdir>/results (a member's results/<member>).",
      flag_values=fv,
  )
  flag_checks.subset(fv, "perturbations", PERTURBATIONS)
  flag_checks.bounded(fv, "seed", 0)
  flag_checks.bounded(fv, "noise_std", 0.0, 1.0)
  flag_checks.bounded(fv, "jitter", 0.0, 1.0)
  flag_checks.bounded(fv, "max_angle", 0.0, 180.0)
  flag_checks.bounded(fv, "batch_size", 1, 65536)
  flags.register_validator(
      "perturbations",
      lambda ps: set(ps) <= set(PERTURBATIONS),
      f"unknown perturbations; known: {', '.join(PERTURBATIONS)}",
      flag_values=fv,
  )


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flag_values
  perts = [p.strip() for p in fv.perturbations if p.strip()]
  settings = Settings(
      noise_std=fv.noise_std,
      brightness=fv.jitter,
      contrast=fv.jitter,
      saturation=fv.jitter,
      hue=fv.jitter,
      max_angle=fv.max_angle,
      rotation_fill=fv.rotation_fill,
  )
  logging.set_verbosity(logging.WARNING)
  compile_cache.setup()  # before anything compiles: later starts reuse the steps
  run = trained.load_run(fv.workdir, member=fv.member)
  dataset = trained.load_run_dataset(run, fv.workdir, fv.data_root)
  note = runs.test_data_note(run.meta.get("data"), dataset.identity)
  if note:
    print(f"note: {note}", flush=True)
  with stop_lib.StopRequest("this batch"):  # SIGINT/SIGTERM: exit 130/143, nothing written
    result = evaluate_robustness(run, dataset, perts, fv.seed, settings, fv.batch_size)
  if note:
    result["data_note"] = note
  if jax.process_index() == 0:
    out_dir = fv.output_dir or trained.results_dir(run, fv.workdir)
    paths = write(result, out_dir, f"robustness_seed{fv.seed}")
    print("\n" + markdown(result))
    print("written: " + ", ".join(paths), flush=True)
  return 0
