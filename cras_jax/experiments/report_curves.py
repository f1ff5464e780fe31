"""The report's curves: a metric against the value of one config field over a sweep's runs
(Fig. 8-style), from the config each run recorded."""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cras_jax.base import csv_cells, fileio
from cras_jax.experiments import sweep_plan as sweep
from cras_jax.experiments.sweep_plan import read_json as _read_json
from cras_jax.method import metrics as metrics_lib

MEAN = "mean"
NAMES = {**metrics_lib.METRIC_NAMES, "match_acc": "match_acc"}


def _value(row: Mapping[str, Any] | None, key: str) -> float:
  v = None if row is None else row.get(key)
  return math.nan if v is None else float(v)


_MISSING = object()


def _lookup(config: Mapping | None, field: str):
  node: Any = config
  for part in field.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _checkpoint_config(workdir: str) -> dict | None:
  """The config in the workdir's latest checkpoint (orbax JsonSave: plain JSON)."""
  steps = []
  for d in glob.glob(os.path.join(workdir, "checkpoints", "*")):
    if os.path.basename(d).isdigit():
      steps.append(int(os.path.basename(d)))
  for step in sorted(steps, reverse=True):
    meta = _read_json(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata"))
    if meta and isinstance(meta.get("config"), dict):
      return meta["config"]
  return None


def param_value(run: dict, field: str):
  """The run's value of a config field: results config, checkpoint, sweep record, overrides."""
  from_results = run["results"].get("config")
  for source in (
      from_results,
      _checkpoint_config(run["workdir"]),
      (run["record"] or {}).get("config"),
  ):
    v = _lookup(source, field)
    if v is not _MISSING:
      return v
  for o in reversed((run["record"] or {}).get("overrides", [])):
    if sweep.override_key(o) == field:
      return sweep.override_value(o)
  return _MISSING


def _only_sets(run: dict, field: str) -> bool:
  """In a sweep, whether the run's own overrides set nothing but `field`."""
  rec = run["record"]
  if not rec or "run_overrides" not in rec:
    return True
  return all(sweep.override_key(o) == field for o in rec["run_overrides"])


def _label(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(_label(x) for x in v) + ")"
  return f"{v:g}" if isinstance(v, float) else str(v)


def curve_data(
    runs: Sequence[dict], field: str, metrics: Sequence[str] = ("i_auroc", "p_auroc")
) -> dict:
  """The points of a metric-against-parameter curve.

  -> {field, metrics, numeric, runs, x (values), labels, y: {metric: [percent]}, skipped}.
  Numeric values are sorted ascending; others (tuples, strings) keep the run order. Of runs
  with the same value, the first is kept."""
  points, skipped, seen = [], [], set()
  for r in runs:
    if not _only_sets(r, field):
      skipped.append(f"{r['name']} (sets other fields)")
      continue
    v = param_value(r, field)
    if v is _MISSING:
      skipped.append(f"{r['name']} (no value of {field})")
      continue
    key = json.dumps(v)
    if key in seen:
      skipped.append(f"{r['name']} (same {field} as an earlier run)")
      continue
    seen.add(key)
    points.append((v, r))
  numeric = bool(points) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in points
  )
  if numeric:
    points.sort(key=lambda p: p[0])
  return {
      "field": field,
      "metrics": list(metrics),
      "numeric": numeric,
      "runs": [r["name"] for _, r in points],
      "x": [v for v, _ in points],
      "labels": [_label(v) for v, _ in points],
      "y": {m: [100.0 * _value(r["metrics"].get(MEAN), m) for _, r in points] for m in metrics},
      "protocols": sorted({r["protocol"] for _, r in points}),
      "skipped": skipped,
  }


def plot_curve(data: dict, path: str) -> str:
  """Fig. 8-style PNG of curve_data: one line per metric, mean over classes in %."""
  import matplotlib  # here only: tables need no plotting library

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  xs = data["x"] if data["numeric"] else list(range(len(data["x"])))
  for m in data["metrics"]:
    ax.plot(xs, data["y"][m], marker="o", label=NAMES.get(m, m))
  if not data["numeric"]:
    ax.set_xticks(xs)
    ax.set_xticklabels(data["labels"])
  ax.set_xlabel(data["field"])
  ax.set_ylabel("mean over classes, %")
  ax.set_title(f"protocol: {' / '.join(data['protocols'])}", fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with fileio.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return path


def write_curve_csv(data: dict, path: str) -> None:
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
    w.writerow(["run", data["field"], *data["metrics"]])
    for i, run in enumerate(data["runs"]):
      w.writerow(
          [run, data["labels"][i], *(repr(data["y"][m][i] / 100.0) for m in data["metrics"])]
      )
