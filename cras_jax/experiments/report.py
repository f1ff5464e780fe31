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
- `spread_<tag>.md` / `.csv` when a setting has several seeds (a population run, or a sweep
  with `--seeds`): per setting the mean ± std over seeds and the 95 % interval of the mean, each
  setting against the first by a Wilcoxon signed-rank test paired over (seed, class)
  (`experiments.spread`), and per class the mean ± std; each setting names what its seeds vary
  (`variance_sources`: "initialisation + noise", or "initialisation + noise + data order" with
  a per-member data order, `train.member_data_order`);
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

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from cras_jax.base import csv_cells, fileio, flag_checks, markdown
from cras_jax.experiments import report_inputs, spread
from cras_jax.experiments.report_curves import (  # noqa: F401 - the tool's names, as before the split
    _lookup,
    curve_data,
    param_value,
    plot_curve,
    write_curve_csv,
)
from cras_jax.experiments.report_inputs import (  # noqa: F401 - the tool's names, as before the split
    ReportError,
    check_protocols,
    find_runs,
    load_run,
    results_path,
)
from cras_jax.method import metrics as metrics_lib

METRICS = metrics_lib.METRIC_KEYS  # i_auroc, i_ap, p_auroc, p_ap, aupro
NAMES = {**metrics_lib.METRIC_NAMES, "match_acc": "match_acc"}
MEAN = "mean"
_NAN = float("nan")


# ----------------------------------------------------------------------------- tables


def _value(row: Mapping[str, Any] | None, key: str) -> float:
  return markdown.fraction(row.get(key) if isinstance(row, Mapping) else None)


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
        f"| {markdown.cell(row['run'])} | {markdown.cell(row['protocol'])} | "
        + " | ".join(_pct(row[m], digits) for m in metrics)
        + " |"
    )
  return "\n".join(lines) + "\n"


def write_summary_csv(runs: Sequence[dict], path: str, metrics: Sequence[str] = METRICS) -> None:
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
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
  lines.append(markdown.row(["class", *(r["name"] for r in runs)]))
  lines.append("|---|" + "---:|" * len(runs))
  for c in class_names(runs):
    cells = [
        "/".join(_pct(_value(r["metrics"].get(c), m), digits) for m in metrics)
        if c in r["metrics"]
        else ""
        for r in runs
    ]
    lines.append(f"| {markdown.cell(c)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_per_class_csv(
    runs: Sequence[dict], path: str, metrics: Sequence[str] = ("i_auroc", "p_auroc")
) -> None:
  """class, then one column per (run, metric) named 'run:metric'; fractions; empty = absent."""
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
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


# ----------------------------------------------------------------------------- spread


def _cell(d: Mapping, digits: int) -> str:
  ci = spread.interval(d, digits)
  return spread.pct(d, digits) + ("" if ci == "-" else f" {ci}")


def sources_line(groups, sources: Mapping[str, str]) -> str:
  """'Variance sources: ...' of the settings: one label for all, or each setting's."""
  labels = [sources.get(name, report_inputs.NOT_RECORDED) for name, _ in groups]
  if len(set(labels)) == 1:
    return f"Variance sources (what the seeds vary): {labels[0]}"
  each = "; ".join(f"{name}: {label}" for (name, _), label in zip(groups, labels))
  return f"Variance sources (what the seeds vary): {each}"


def spread_markdown(
    groups: Sequence[tuple[str, list[dict]]],
    metrics: Sequence[str],
    class_metrics: Sequence[str],
    digits: int = 1,
    tag: str = "final",
    sources: Mapping[str, str] | None = None,
) -> str:
  """Settings over their seeds: mean ± std [95 % interval] of the mean row; each setting
  against the first (`spread.compare`: the difference in points, its p, * where it exceeds
  the seed spread at 5 %); per class, mean ± std. `sources`: {setting: what its seeds vary}
  (`report_inputs.variance_sources`), said under the title."""
  sps = [(name, len(t), spread.spread(t, list({*metrics, *class_metrics}))) for name, t in groups]
  lines = [
      f"Over seeds (metrics_{tag}.json): mean ± std [95 % interval of the mean, t], %",
      "",
      sources_line(groups, sources or {}),
      "",
      "| setting | seeds | " + " | ".join(NAMES.get(m, m) for m in metrics) + " |",
      "|---|---:|" + "---:|" * len(metrics),
  ]
  for name, n, sp in sps:
    row = sp[MEAN]
    cells = " | ".join(_cell(row[m], digits) for m in metrics)
    lines.append(f"| {markdown.cell(name)} | {n} | {cells} |")
  if len(groups) > 1:
    ref_name, ref = groups[0]
    lines += [
        "",
        f"Against {ref_name}: difference of the mean in points, p of a {spread.TEST};"
        f" * the difference exceeds the seed spread (p < {spread.ALPHA})",
        "",
        "| setting | " + " | ".join(NAMES.get(m, m) for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for name, tables in groups[1:]:
      cells = []
      for m in metrics:
        c = spread.compare(ref, tables, m)
        star = "*" if c["significant"] else ""
        cells.append(f"{100 * c['diff']:+.{digits}f} (p={c['p']:.2g}){star}")
      lines.append(f"| {markdown.cell(name)} | " + " | ".join(cells) + " |")
  lines += ["", markdown.row(["class", *(n for n, _, _ in sps)])]
  lines.append("|---|" + "---:|" * len(sps))
  for c in sps[0][2]:
    cells = [
        "/".join(spread.pct(sp[c][m], digits) for m in class_metrics) if c in sp else ""
        for _, _, sp in sps
    ]
    lines.append(f"| {markdown.cell(c)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_spread_csv(
    groups, path: str, metrics: Sequence[str], sources: Mapping[str, str] | None = None
) -> None:
  """setting, variance_sources, class, metric, mean, std, lo95, hi95, n (fractions)."""
  sources = sources or {}
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
    head = ["setting", "variance_sources", "class", "metric", "mean", "std", "lo95", "hi95", "n"]
    w.writerow(head)
    for name, tables in groups:
      label = sources.get(name, report_inputs.NOT_RECORDED)
      for row in spread.rows(spread.spread(tables, metrics), metrics):
        w.writerow([name, label, *row])


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
    fileio.atomic_write_text(p, text)
    files.append(p)
  files.append(os.path.join(output_dir, f"summary_{tag}.csv"))
  write_summary_csv(runs, files[-1], mlist)
  files.append(os.path.join(output_dir, f"per_class_{tag}.csv"))
  write_per_class_csv(runs, files[-1], cmetrics)
  groups = report_inputs.settings(runs)
  sources = report_inputs.variance_sources(runs)
  spread_md = None
  if any(len(t) > 1 for _, t in groups):
    spread_md = spread_markdown(groups, mlist, cmetrics, digits, tag, sources)
    files.append(os.path.join(output_dir, f"spread_{tag}.md"))
    fileio.atomic_write_text(files[-1], spread_md)
    files.append(os.path.join(output_dir, f"spread_{tag}.csv"))
    write_spread_csv(groups, files[-1], mlist, sources)
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
  if spread_md:
    print(spread_md, file=out)
  for n in notes:
    print(f"note: {n}", file=out)
  print("written: " + ", ".join(files), file=out)
  return {
      "runs": runs,
      "summary_md": summary,
      "per_class_md": per_class,
      "spread_md": spread_md,
      "variance_sources": sources,
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
  flag_checks.bounded(fv, "digits", 0, 10)
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
