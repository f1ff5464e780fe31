"""Results with their spread over seeds: mean, standard deviation, 95 % interval, and a paired
test of two settings.

Pure statistics on per-class metric tables ({class: {metric: value}}, the `metrics` of
results/metrics_<tag>.json). `spread` summarises S tables of one setting (one per seed): per
class and metric the mean, the sample standard deviation (ddof 1) and the 95 % confidence
interval of the mean (Student's t with S - 1 degrees of freedom). `compare` says whether two
settings differ by more than their seed spread: a Wilcoxon signed-rank test over the pairs
(seed, class) of a metric (the seeds paired by their order, the classes by name; the mean
row left out, as it is not independent of the classes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from cras_jax.base import markdown as md

MEAN = "mean"
LEVEL = 0.95
ALPHA = 0.05
TEST = "Wilcoxon signed-rank test, paired over (seed, class)"


def describe(values: Sequence[float]) -> dict:
  """mean, std (ddof 1; 0 for one value), 95 % interval of the mean (t), n; NaNs left out."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
  n = len(v)
  if n == 0:
    return {"mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
  mean = float(v.mean())
  std = float(v.std(ddof=1)) if n > 1 else 0.0
  half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
  return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def _value(table: Mapping, cls: str, metric: str) -> float:
  v = (table.get(cls) or {}).get(metric)
  return math.nan if v is None else float(v)


def classes(tables: Sequence[Mapping]) -> list[str]:
  """The classes of the tables in first-seen order, then the mean row."""
  names: list[str] = []
  for t in tables:
    names += [c for c in t if c != MEAN and c not in names]
  return names + [MEAN]


def spread(tables: Sequence[Mapping], metrics: Sequence[str]) -> dict:
  """{class: {metric: describe(values over the tables)}}, the mean row included."""
  return {
      c: {m: describe([_value(t, c, m) for t in tables]) for m in metrics} for c in classes(tables)
  }


def compare(a: Sequence[Mapping], b: Sequence[Mapping], metric: str) -> dict:
  """Setting b against setting a on one metric, paired over (seed, class).

  -> {metric, diff (mean of b - a over the pairs), pairs, p (two-sided), significant
  (p < 0.05), test}. Seeds are paired by position (the first len(shorter) of each)."""
  names = [c for c in classes([*a, *b]) if c != MEAN]
  xs, ys = [], []
  for ta, tb in zip(a, b):
    for c in names:
      x, y = _value(ta, c, metric), _value(tb, c, metric)
      if not (math.isnan(x) or math.isnan(y)):
        xs.append(x)
        ys.append(y)
  d = np.asarray(ys) - np.asarray(xs)
  out = {"metric": metric, "pairs": len(d), "test": TEST}
  out["diff"] = float(d.mean()) if len(d) else math.nan
  if len(d) < 2 or not np.any(d != 0):
    out.update(p=1.0 if len(d) else math.nan, significant=False)
    return out
  p = float(stats.wilcoxon(ys, xs, zero_method="wilcox", alternative="two-sided").pvalue)
  out.update(p=p, significant=bool(p < ALPHA))
  return out


def pct(d: Mapping, digits: int = 1) -> str:
  """'87.3 ± 1.2' (percent) of a `describe` result; '-' when empty."""
  if not d["n"] or math.isnan(d["mean"]):
    return "-"
  return f"{100 * d['mean']:.{digits}f} ± {100 * d['std']:.{digits}f}"


def interval(d: Mapping, digits: int = 1) -> str:
  """'[85.1, 89.5]' (percent) of a `describe` result; '-' for fewer than two values."""
  if d["n"] < 2 or math.isnan(d["lo"]):
    return "-"
  return f"[{100 * d['lo']:.{digits}f}, {100 * d['hi']:.{digits}f}]"


def markdown(
    sp: Mapping, metrics: Sequence[str], names: Mapping[str, str], n: int, sources: str = ""
) -> str:
  """Classes as rows; per metric 'mean ± std' and its 95 % interval (percent); `sources`:
  what the seeds vary (`config.population.variance_sources`), said under the title."""
  head = " | ".join(f"{names.get(m, m)} | 95% CI" for m in metrics)
  lines = [f"Mean ± std over {n} seeds and the 95 % interval of the mean (t), %", ""]
  if sources:
    lines += [f"Variance sources: {sources}", ""]
  lines += [f"| class | {head} |", "|---|" + "---:|---:|" * len(metrics)]
  for c, row in sp.items():
    cells = " | ".join(f"{pct(row[m])} | {interval(row[m])}" for m in metrics)
    lines.append(f"| {md.cell(c)} | {cells} |")
  return "\n".join(lines) + "\n"


def rows(sp: Mapping, metrics: Sequence[str]) -> list[list]:
  """CSV rows: class, metric, mean, std, lo, hi, n (fractions)."""
  return [
      [c, m, *(row[m][k] for k in ("mean", "std", "lo", "hi", "n"))]
      for c, row in sp.items()
      for m in metrics
  ]
