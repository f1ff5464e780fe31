#!/usr/bin/env python
"""Gathers the results of several workdirs (a sweep, or runs given one by one) into tables and
draws metric-against-parameter curves (the paper's Table 1/4/5-style tables, Fig. 8).

Inputs: workdirs (holding `results/metrics_<tag>.json`) and/or sweep directories (every
sub-directory holding results; in the sweep's run order, from `sweep.json`). `NAME=DIR` names
a workdir's row (default: the directory's name).

Writes into `--output_dir` (default `<sweep dir>/report` for one sweep directory):
- `summary_<tag>.md` / `.csv`: one row per run, the mean metrics (percent, one decimal in the
  markdown; fractions at full precision in the CSV) and each row's protocol;
- `per_class_<tag>.md` / `.csv`: classes as rows (and the mean), runs as columns, for
  `--class_metrics` (default `i_auroc,p_auroc`: "I-AUROC/P-AUROC" cells, like Table 1);
- with `--curve=FIELD` (e.g. `model.noise_sigma`, repeatable): `curve_<FIELD>_<tag>.png` and
  `.csv`, `--curve_metrics` against the field's value. A run's value comes from the config in
  its results, else its latest checkpoint, else its `sweep_run.json`. In a sweep, only the runs
  whose own overrides set nothing but that field (or nothing: the default run) are drawn.

Rows of different protocols (e.g. final epoch and best epoch selected on the test set) are
refused unless `--allow_mixed_protocols`, which marks the table.

Examples (from the repository root):
  python -m cras_jax.report runs/ablations
  python -m cras_jax.report full=runs/demo wo_hpi=runs/demo_wo_hpi --output_dir=runs/cmp
  python -m cras_jax.report runs/params --curve=model.noise_sigma --curve=model.levels
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from cras_jax import sweep
from cras_jax.base import errors
from cras_jax.method import metrics as metrics_lib

METRICS = metrics_lib.METRIC_KEYS  # i_auroc, i_ap, p_auroc, p_ap, aupro
NAMES = {**metrics_lib.METRIC_NAMES, "match_acc": "match_acc"}
MEAN = "mean"
_NAN = float("nan")


class ReportError(ValueError):
  pass


# ----------------------------------------------------------------------------- gathering


def _read_json(path) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def results_path(workdir, tag: str = "final") -> str:
  return os.path.join(workdir, "results", f"metrics_{tag}.json")


def find_runs(paths: Sequence[str], tag: str = "final") -> tuple[list[tuple[str, str]], list[str]]:
  """-> ([(name, workdir)] in order, notes about directories without results)."""
  runs, notes = [], []
  for arg in paths:
    name = None
    if not os.path.exists(arg) and "=" in arg:
      name, arg = arg.split("=", 1)
    if not os.path.isdir(arg):
      raise ReportError(f"{arg}: no such directory")
    if os.path.exists(results_path(arg, tag)):
      runs.append((name or os.path.basename(os.path.normpath(arg)), arg))
      continue
    # A sweep directory: its sub-directories, in the sweep's order, then the rest by name.
    subdirs = sorted(d for d in os.listdir(arg) if os.path.isdir(os.path.join(arg, d)))
    order = (_read_json(os.path.join(arg, "sweep.json")) or {}).get("runs", [])
    ordered = [d for d in order if d in subdirs] + [d for d in subdirs if d not in order]
    found = False
    for d in ordered:
      sub = os.path.join(arg, d)
      if os.path.exists(results_path(sub, tag)):
        runs.append((d, sub))
        found = True
      elif d in order or os.path.exists(os.path.join(sub, "sweep_run.json")):
        rec = _read_json(os.path.join(sub, "sweep_run.json")) or {}
        notes.append(f"{d}: no metrics_{tag}.json (sweep status: {rec.get('status', 'not run')})")
    if not found:
      raise ReportError(
          f"{arg}: neither a workdir with {results_path('', tag)} nor a sweep "
          f"directory holding any"
      )
  names = [n for n, _ in runs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ReportError(f"several runs named {', '.join(dup)}: name them, NAME=DIR")
  return runs, notes


def load_run(name: str, workdir: str, tag: str = "final") -> dict:
  """A run's results: name, workdir, metrics (with a mean row), protocol, record."""
  res = _read_json(results_path(workdir, tag))
  if res is None or "metrics" not in res:
    raise ReportError(f"{results_path(workdir, tag)}: unreadable or without 'metrics'")
  table = dict(res["metrics"])
  if MEAN not in table:
    table = metrics_lib.summarise(table)
  return {
      "name": name,
      "workdir": workdir,
      "metrics": table,
      "protocol": res.get("protocol") or "unknown",
      "results": res,
      "record": _read_json(os.path.join(workdir, "sweep_run.json")),
  }


def protocol_kind(protocol: str) -> str:
  """Protocols compared for mixing: step/epoch numbers aside ("checkpoint of step N")."""
  return re.sub(r"\d+", "N", protocol)


def check_protocols(runs: Sequence[dict], allow_mixed: bool = False) -> str | None:
  """None if every row has the same protocol; else a warning (allow_mixed) or ReportError."""
  kinds = {protocol_kind(r["protocol"]) for r in runs}
  if len(kinds) <= 1:
    return None
  listing = "; ".join(f"{r['name']}: {r['protocol']}" for r in runs)
  if not allow_mixed:
    raise ReportError(
        f"the runs were reported under different protocols ({listing}); "
        f"compare like with like, or pass --allow_mixed_protocols to mark them"
    )
  return f"**Mixed protocols**: the rows are not comparable as they stand ({listing})."


# ----------------------------------------------------------------------------- tables


def _value(row: Mapping[str, Any] | None, key: str) -> float:
  v = None if row is None else row.get(key)
  return _NAN if v is None else float(v)


def _pct(v: float, digits: int) -> str:
  return "-" if math.isnan(v) else f"{100.0 * v:.{digits}f}"


def summary_rows(runs: Sequence[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
  """One dict per run: run, protocol, then the mean of each metric (fractions)."""
  return [
      {
          "run": r["name"],
          "protocol": r["protocol"],
          **{m: _value(r["metrics"].get(MEAN), m) for m in metrics},
      }
      for r in runs
  ]


def summary_markdown(
    runs: Sequence[dict],
    metrics: Sequence[str] = METRICS,
    digits: int = 1,
    warning: str | None = None,
    tag: str = "final",
) -> str:
  rows = summary_rows(runs, metrics)
  protocols = sorted({r["protocol"] for r in rows})
  lines = [f"Mean over classes, % (metrics_{tag}.json); protocol: {' / '.join(protocols)}", ""]
  if warning:
    lines += [warning, ""]
  lines.append("| run | protocol | " + " | ".join(NAMES.get(m, m) for m in metrics) + " |")
  lines.append("|---|---|" + "---:|" * len(metrics))
  for row in rows:
    lines.append(
        f"| {row['run']} | {row['protocol']} | "
        + " | ".join(_pct(row[m], digits) for m in metrics)
        + " |"
    )
  return "\n".join(lines) + "\n"


def write_summary_csv(runs: Sequence[dict], path: str, metrics: Sequence[str] = METRICS) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "protocol", *metrics])
    for row in summary_rows(runs, metrics):
      w.writerow([row["run"], row["protocol"], *(repr(row[m]) for m in metrics)])


def class_names(runs: Sequence[dict]) -> list[str]:
  """Union of the runs' classes in first-seen order, then the mean row."""
  names: list[str] = []
  for r in runs:
    names += [c for c in r["metrics"] if c != MEAN and c not in names]
  return names + [MEAN]


def per_class_markdown(
    runs: Sequence[dict],
    metrics: Sequence[str] = ("i_auroc", "p_auroc"),
    digits: int = 1,
    warning: str | None = None,
    tag: str = "final",
) -> str:
  """Classes as rows, runs as columns; a cell is the metrics joined by '/' (Table 1 style)."""
  what = "/".join(NAMES.get(m, m) for m in metrics)
  lines = [
      f"{what} per class, % (metrics_{tag}.json); protocol: "
      f"{' / '.join(sorted({r['protocol'] for r in runs}))}",
      "",
  ]
  if warning:
    lines += [warning, ""]
  lines.append("| class | " + " | ".join(r["name"] for r in runs) + " |")
  lines.append("|---|" + "---:|" * len(runs))
  for c in class_names(runs):
    cells = [
        "/".join(_pct(_value(r["metrics"].get(c), m), digits) for m in metrics)
        if c in r["metrics"]
        else ""
        for r in runs
    ]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_per_class_csv(
    runs: Sequence[dict], path: str, metrics: Sequence[str] = ("i_auroc", "p_auroc")
) -> None:
  """class, then one column per (run, metric) named 'run:metric'; fractions; empty = absent."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["class", *(f"{r['name']}:{m}" for r in runs for m in metrics)])
    for c in class_names(runs):
      w.writerow(
          [
              c,
              *(
                  repr(_value(r["metrics"].get(c), m)) if c in r["metrics"] else ""
                  for r in runs
                  for m in metrics
              ),
          ]
      )


# ----------------------------------------------------------------------------- curves

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
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_curve_csv(data: dict, path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", data["field"], *data["metrics"]])
    for i, run in enumerate(data["runs"]):
      w.writerow(
          [run, data["labels"][i], *(repr(data["y"][m][i] / 100.0) for m in data["metrics"])]
      )


# ----------------------------------------------------------------------------- command line


def _metric_list(text: str) -> list[str]:
  out = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in out if m not in NAMES]
  if bad or not out:
    raise ReportError(
        f"unknown metric(s) {', '.join(bad) or text!r}: choose from " f"{', '.join(NAMES)}"
    )
  return out


def report(
    paths: Sequence[str],
    output_dir: str | None = None,
    tag: str = "final",
    class_metrics: str = "i_auroc,p_auroc",
    curves: Sequence[str] = (),
    curve_metrics: str = "i_auroc,p_auroc",
    allow_mixed_protocols: bool = False,
    digits: int = 1,
    metrics: str = ",".join(METRICS),
    out=None,
) -> dict:
  """Writes the tables (and curves); -> {runs, summary_md, per_class_md, curves: [data],
  files: [paths], notes}."""
  out = sys.stdout if out is None else out
  found, notes = find_runs(paths, tag)
  runs = [load_run(n, w, tag) for n, w in found]
  warning = check_protocols(runs, allow_mixed_protocols)
  if output_dir is None:
    if len(paths) == 1 and not os.path.exists(results_path(paths[0], tag)):
      output_dir = os.path.join(paths[0], "report")
    else:
      raise ReportError("give --output_dir (the inputs are not a single sweep directory)")
  os.makedirs(output_dir, exist_ok=True)
  mlist, cmetrics = _metric_list(metrics), _metric_list(class_metrics)
  files = []
  summary = summary_markdown(runs, mlist, digits, warning, tag)
  per_class = per_class_markdown(runs, cmetrics, digits, warning, tag)
  for stem, text in (("summary", summary), ("per_class", per_class)):
    p = os.path.join(output_dir, f"{stem}_{tag}.md")
    with open(p, "w") as f:
      f.write(text)
    files.append(p)
  files.append(os.path.join(output_dir, f"summary_{tag}.csv"))
  write_summary_csv(runs, files[-1], mlist)
  files.append(os.path.join(output_dir, f"per_class_{tag}.csv"))
  write_per_class_csv(runs, files[-1], cmetrics)
  curve_out = []
  for field in curves:
    field = field.split("=", 1)[1] if field.startswith("param=") else field
    data = curve_data(runs, field, _metric_list(curve_metrics))
    if not data["runs"]:
      notes.append(f"curve {field}: no run has a value of it")
      continue
    safe = re.sub(r"[^\w.-]", "_", field)
    files.append(plot_curve(data, os.path.join(output_dir, f"curve_{safe}_{tag}.png")))
    files.append(os.path.join(output_dir, f"curve_{safe}_{tag}.csv"))
    write_curve_csv(data, files[-1])
    if data["skipped"]:
      notes.append(f"curve {field}: left out {', '.join(data['skipped'])}")
    curve_out.append(data)
  print(summary, file=out)
  print(per_class, file=out)
  for n in notes:
    print(f"note: {n}", file=out)
  print("written: " + ", ".join(files), file=out)
  return {
      "runs": runs,
      "summary_md": summary,
      "per_class_md": per_class,
      "curves": curve_out,
      "files": files,
      "notes": notes,
  }


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined when it runs as a command); the inputs are its arguments:
  workdirs, NAME=workdir, or sweep directories."""
  fv = flag_values
  flags.DEFINE_string(
      "output_dir",
      None,
      "Where the tables go (default: <sweep dir>/report " "for one sweep dir).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "tag", "final", "Read results/metrics_<tag>.json (final, eval, " "epoch_NNN).", flag_values=fv
  )
  flags.DEFINE_string("metrics", ",".join(METRICS), "Summary columns.", flag_values=fv)
  flags.DEFINE_string(
      "class_metrics",
      "i_auroc,p_auroc",
      "Metric(s) of the per-class table, " "joined by '/' in a cell.",
      flag_values=fv,
  )
  flags.DEFINE_multi_string(
      "curve",
      [],
      "Draw the metrics against this config field (e.g. " "model.noise_sigma; repeatable).",
      flag_values=fv,
  )
  flags.DEFINE_string("curve_metrics", "i_auroc,p_auroc", "Metrics of the curves.", flag_values=fv)
  flags.DEFINE_integer("digits", 1, "Decimals of the markdown tables.", flag_values=fv)
  flags.DEFINE_bool(
      "allow_mixed_protocols",
      False,
      "Tabulate rows of different protocols " "anyway (marked).",
      flag_values=fv,
  )


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  fv = flag_values
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError("give workdirs, NAME=workdir, or sweep directories")
  try:
    report(
        paths,
        fv.output_dir,
        fv.tag,
        fv.class_metrics,
        fv.curve,
        fv.curve_metrics,
        fv.allow_mixed_protocols,
        fv.digits,
        fv.metrics,
    )
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  app.run(errors.exit_on_user_error(main))
