"""What a run reports: per-class metric tables, the results files, test scores and heatmaps;
the training progress line and the versions every results file records."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint

import cras_jax
from cras_jax.base import csv_cells, fileio
from cras_jax.base import progress as progress_lib
from cras_jax.base.jsonio import json_safe
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import render


def versions() -> dict:
  return {
      "cras_jax": cras_jax.__version__,
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "orbax": orbax.checkpoint.__version__,
      "python": platform.python_version(),
      "git_commit": git_commit(),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
  }


def git_commit() -> str | None:
  """The commit of the cras_jax checkout in use, if it is a git checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() + ("-dirty" if dirty else "")


def progress(total: int, desc: str, initial: int = 0, unit: str = "step"):
  """A progress bar (`cras_jax.base.progress.bar`: hidden with `config.log.progress=false`)."""
  return progress_lib.bar(total, desc, initial, unit)


def summarise_window(window) -> dict:
  """Mean metrics over a window of (metrics, batch size, start time) and images/s."""
  host = jax.device_get([m for m, _, _ in window])
  images = sum(n for _, n, _ in window)
  seconds = max(time.time() - window[0][2], 1e-9)
  out = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
  out["images_per_s"] = images / seconds
  return out


def format_train_metrics(m: dict) -> str:
  return (
      f"{m['images_per_s']:.1f} img/s loss {m['loss']:.4f} "
      f"normal ok {100 * m['p_true']:.1f}% anomaly ok {100 * m['p_fake']:.1f}%"
  )


def class_metrics(res: dict, class_names, fpr_limit: float = 0.3) -> dict:
  """Per-class metrics of docs/method.md §10 plus the share of images matched to their own centre."""
  table = {}
  for k, name in enumerate(class_names):
    sel = res["label"] == k
    if not sel.any():
      continue
    # Pixel metrics are absent (NaN) for a class with defective images lacking masks
    # (config.data.allow_image_level_only).
    has_masks = bool(np.all(res.get("has_mask", np.ones_like(sel))[sel]))
    m = metrics_lib.compute_class_metrics(
        res["is_anomaly"][sel],
        res["scores"][sel],
        res["mask"][sel] if has_masks else None,
        res["maps"][sel] if has_masks else None,
        fpr_limit=fpr_limit,
    )
    m["match_acc"] = float(np.mean(res["cls"][sel] == k))
    table[name] = m
  return metrics_lib.summarise(table)


def write_scores(res: dict, class_names, path: str) -> None:
  """One row per test image: name, class, matched class, label and image score."""
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
    w.writerow(["name", "class", "matched_class", "is_anomaly", "score"])
    for i, name in enumerate(res["name"]):
      w.writerow(
          [
              name,
              class_names[res["label"][i]],
              class_names[res["cls"][i]],
              int(res["is_anomaly"][i]),
              f"{float(res['scores'][i]):.6f}",
          ]
      )


# The title of a combined run's second table (`data.name=combined`: `metrics.group_means`).
BY_DATASET = "per dataset (each row: the mean over its classes; mean: over the datasets)"


def markdown(table: dict, title: str | None = None) -> str:
  """The table as markdown, with a note naming metrics whose mean leaves classes out."""
  text = metrics_lib.to_markdown(table, title=title)
  note = coverage_note(table) if metrics_lib.MEAN_ROW in table else None
  return text + (f"\n{note}\n" if note else "")


def mean_coverage(table: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
  """Per metric of the mean row, the classes its mean covers (those where it is defined)."""
  names = [n for n in table if n != metrics_lib.MEAN_ROW]
  cols = list(dict.fromkeys(k for n in names for k in table[n]))
  return {
      c: [n for n in names if table[n].get(c) is not None and not math.isnan(table[n][c])]
      for c in cols
  }


def coverage_note(table: Mapping[str, Mapping[str, float]]) -> str | None:
  """A line naming the metrics whose mean leaves classes out, or None when all are covered."""
  names = [n for n in table if n != metrics_lib.MEAN_ROW]
  parts = []
  for c, covered in mean_coverage(table).items():
    if len(covered) < len(names):
      left = [n for n in names if n not in covered]
      parts.append(
          f"{metrics_lib.METRIC_NAMES.get(c, c)} over {len(covered)} of {len(names)} classes "
          f"(undefined for {', '.join(left)})"
      )
  return "mean: " + "; ".join(parts) if parts else None


def write_results(table: dict, out_dir: str, tag: str, extra: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  record = {"metrics": table, **extra, "versions": versions()}
  if metrics_lib.MEAN_ROW in table:  # the mean row of each metric names what it averages
    record["mean_covers"] = mean_coverage(table)
  fileio.atomic_write_json(
      os.path.join(out_dir, f"metrics_{tag}.json"), json_safe(record), allow_nan=False
  )
  note = extra.get("data_note")  # in every file: the test images are not the run's own
  metrics_lib.to_csv(
      table,
      os.path.join(out_dir, f"metrics_{tag}.csv"),
      extra_columns={"data_note": note} if note else None,
  )
  title = f"protocol: {extra['protocol']}" if "protocol" in extra else None
  by_dataset = extra.get("by_dataset")  # one model across datasets
  if by_dataset:
    metrics_lib.to_csv(by_dataset, os.path.join(out_dir, f"metrics_{tag}_by_dataset.csv"))
  fileio.atomic_write_text(
      os.path.join(out_dir, f"metrics_{tag}.md"),
      markdown(table, title=title)
      + (f"\nnote: {note}\n" if note else "")
      + (f"\n{markdown(by_dataset, title=BY_DATASET)}" if by_dataset else "")
      + "\n",
  )


def save_heatmaps(res: dict, class_names, out_dir: str, per_class: int = 4) -> list[str]:
  """image | ground truth | anomaly-map overlay PNGs, for defective images first."""
  if per_class <= 0:
    return []
  import matplotlib  # here only: plotting is needed for heatmaps alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  written = []
  for k, chosen, lo, hi in render.heatmap_choice(res, class_names, per_class):
    name = class_names[k]
    for i in chosen:
      fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.7))
      axes[0].imshow(res["image"][i])
      axes[0].set_title(f"{name}: {res['name'][i]}", fontsize=7)
      render.draw_mask(axes[1], res["mask"][i])
      axes[1].set_title("ground truth", fontsize=8)
      render.draw_overlay(axes[2], res["image"][i], res["maps"][i], lo, hi)
      axes[2].set_title(f"score {res['scores'][i]:.3f}", fontsize=8)
      for a in axes:
        a.axis("off")
      fig.tight_layout()
      safe = str(res["name"][i]).replace(os.sep, "_").replace(".", "_")
      path = os.path.join(out_dir, f"{name}_{i:04d}_{safe}.png")
      with fileio.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
      plt.close(fig)
      written.append(path)
  return written
