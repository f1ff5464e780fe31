"""Evaluation metrics (docs/method.md §10): I-AUROC, I-AP, P-AUROC, P-AP and AUPRO.

Pure NumPy (plus ``scipy.ndimage.label`` for connected components). Everything here is exact
with respect to ties: the curves are evaluated at every *distinct* score, with all pixels/images
that share a score entering together, which is what scikit-learn's ``roc_auc_score`` /
``average_precision_score`` and MVTec AD's official ``compute_pro`` do.

The ranking metrics (AUROC, AP) are in ``ranking``, the PRO curve and AUPRO in ``pro``; this
module computes them per class and makes the tables (``summarise``, ``to_markdown``,
``to_csv``) and the epoch selection.

Speed: the pixel metrics of one class share a single ``np.sort`` of all pixel scores; the
per-class statistics are then gathered with ``np.searchsorted`` + ``np.bincount`` on the
(usually few) defect pixels, so no ``argsort`` of all pixels is needed. 150 maps of 288x288
(12.4M pixels) take about a second for all three pixel metrics together.

Conventions
-----------
* Labels / masks: a boolean array is used as is; any other dtype is positive where ``> 0.5``
  (so {0,1}, {0,255} and bilinear-resized float masks binarised at 0.5, as docs/method.md §1 says,
  all work).
* Scores may be any real dtype; NaN scores raise ``ValueError``; +-inf is allowed.
* A metric that is undefined returns ``float('nan')``: AUROC/AP when only one class is present,
  AUPRO when there is no defect pixel (or no normal pixel).
* ``summarise`` averages with ``nanmean`` so classes where a metric is undefined are skipped.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cras_jax.base import csv_cells, fileio, markdown
from cras_jax.method.pro import (
    aupro,
    aupro_from_curve,
    check_limit,
    pro_curve,
    pro_curve_from_sorted,
    stack_maps,
)
from cras_jax.method.ranking import (
    SortedScores,
    ap_from_counts,
    auroc,
    auroc_from_counts,
    average_precision,
    flat_pair,
    pos_neg_counts,
)

__all__ = [
    "METRIC_KEYS",
    "METRIC_NAMES",
    "auroc",
    "average_precision",
    "aupro",
    "pro_curve",
    "compute_class_metrics",
    "seg_f1",
    "summarise",
    "to_markdown",
    "to_csv",
    "select_epoch",
]

METRIC_KEYS: tuple[str, ...] = ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro")
METRIC_NAMES: dict[str, str] = {
    "i_auroc": "I-AUROC",
    "i_ap": "I-AP",
    "p_auroc": "P-AUROC",
    "p_ap": "P-AP",
    "aupro": "AUPRO",
    "seg_f1": "SegF1",  # MVTec AD 2's columns (scoring/submission.py)
    "i_f1": "I-F1",
}
MEAN_ROW = "mean"

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Public: per-class evaluation and tables
# ----------------------------------------------------------------------------------------------
def compute_class_metrics(
    image_labels: Any,
    image_scores: Any,
    masks: Any = None,
    maps: Any = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
  """All metrics of one class.

  ``image_labels`` (N,) (1/True = anomalous), ``image_scores`` (N,); ``masks``/``maps``
  (N, H, W) ground-truth masks and anomaly maps (e.g. 288x288). Returns a dict with keys
  ``i_auroc, i_ap, p_auroc, p_ap, aupro`` (fractions in [0, 1]); the pixel keys are ``nan``
  when ``masks`` is None. The pixel metrics share one sort of all pixel scores.
  """
  fpr_limit = check_limit(fpr_limit)
  y, s = flat_pair(image_labels, image_scores)
  pos, neg = pos_neg_counts(SortedScores(s), y, s)
  out = {
      "i_auroc": auroc_from_counts(pos, neg),
      "i_ap": ap_from_counts(pos, neg),
      "p_auroc": _NAN,
      "p_ap": _NAN,
      "aupro": _NAN,
  }
  if masks is None:
    return out
  if maps is None:
    raise ValueError("masks given without maps")
  m, a = stack_maps(masks, maps)
  flat_m, flat_a = m.ravel(), a.ravel()
  ss = SortedScores(flat_a)
  pos_desc, neg_desc = pos_neg_counts(ss, flat_m, flat_a)
  out["p_auroc"] = auroc_from_counts(pos_desc, neg_desc)
  out["p_ap"] = ap_from_counts(pos_desc, neg_desc)
  out["aupro"] = aupro_from_curve(pro_curve_from_sorted(ss, m, a, neg_desc), fpr_limit)
  return out


def seg_f1(masks: Any, maps: Any, threshold: float) -> float:
  """SegF1, MVTec AD 2's threshold-dependent pixel metric: the F1 score of the binary maps
  ``maps >= threshold`` against ``masks``, with the true-positive, false-positive and
  false-negative pixels counted over every pixel of every image given (pooled, not averaged
  per image), ``2 TP / (2 TP + FP + FN)``.

  ``masks``/``maps``: (H, W) or (N, H, W) of the same shape (masks as in the module's
  conventions); ``threshold``: one fixed value for all images (MVTec AD 2 fixes it on the
  validation images, docs/mvtec_ad2.md). NaN when it is undefined: no defect pixel and no
  pixel flagged (or no pixel at all), or a NaN threshold.
  """
  m, a = stack_maps(masks, maps)
  if math.isnan(float(threshold)):
    return _NAN
  pred = a >= threshold
  tp = int(np.count_nonzero(pred & m))
  fp = int(np.count_nonzero(pred)) - tp
  fn = int(np.count_nonzero(m)) - tp
  denom = 2 * tp + fp + fn
  return 2.0 * tp / denom if denom else _NAN


def _nanmean(values: Sequence[float]) -> float:
  arr = np.asarray([_NAN if v is None else float(v) for v in values], dtype=np.float64)
  if arr.size == 0 or np.all(np.isnan(arr)):
    return _NAN
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return float(np.nanmean(arr))


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  cols: list[str] = []
  for row in rows:
    for k in row:
      if k not in cols:
        cols.append(k)
  known = [k for k in METRIC_KEYS if k in cols]
  return known + [k for k in cols if k not in METRIC_KEYS]


def summarise(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """Copy of ``per_class`` with a final ``"mean"`` row: per metric, the nanmean over classes.

  Classes where a metric is nan (undefined) are left out of that metric's mean; the mean is
  nan only if every class is nan. A class may not be called ``"mean"``.
  """
  if MEAN_ROW in per_class:
    raise ValueError(f"a class may not be named {MEAN_ROW!r}")
  cols = _columns(per_class.values())
  table = {
      name: {k: _NAN if v is None else float(v) for k, v in row.items()}
      for name, row in per_class.items()
  }  # None: a metric read back from JSON (null) where it was undefined
  table[MEAN_ROW] = {k: _nanmean([row.get(k, _NAN) for row in per_class.values()]) for k in cols}
  return table


def group_means(
    table: Mapping[str, Mapping[str, float]], group: Callable[[str], str]
) -> dict[str, dict[str, float]]:
  """A table's class rows averaged per group (`group(class name)`, e.g. a class's dataset):
  one row per group, in order of first appearance, each metric's nanmean over the group's
  classes; then the "mean" row over the groups (`summarise`: each group counts once)."""
  rows: dict[str, list] = {}
  for name, row in table.items():
    if name != MEAN_ROW:
      rows.setdefault(group(name), []).append(row)
  cols = _columns(r for members in rows.values() for r in members)
  per = {
      g: {k: _nanmean([r.get(k, _NAN) for r in members]) for k in cols}
      for g, members in rows.items()
  }
  return summarise(per)


def _ordered_rows(table: Mapping[str, Mapping[str, float]]) -> list[str]:
  names = [n for n in table if n != MEAN_ROW]
  if MEAN_ROW in table:
    names.append(MEAN_ROW)
  return names


def to_markdown(
    table: Mapping[str, Mapping[str, float]], digits: int = 1, title: str | None = None
) -> str:
  """Markdown table: class rows, then the mean row; metrics as percentages (paper style,
  ``digits`` decimals, e.g. 98.3). nan is shown as ``-``. ``title`` (e.g. "protocol: final
  epoch") is put on a line above the table if given."""
  names = _ordered_rows(table)
  cols = _columns(table[n] for n in names)
  lines = [] if title is None else [title, ""]
  lines.append("| class | " + " | ".join(METRIC_NAMES.get(c, c) for c in cols) + " |")
  lines.append("|---|" + "---:|" * len(cols))
  for n in names:
    cells = []
    for c in cols:
      v = markdown.fraction(table[n].get(c))
      cells.append("-" if math.isnan(v) else f"{100.0 * v:.{digits}f}")
    lines.append(f"| {markdown.cell(n)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def to_csv(
    table: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    percent: bool = False,
    extra_columns: Mapping[str, str] | None = None,
) -> None:
  """Write ``table`` as CSV: header ``class,i_auroc,...``, class rows, then the mean row.

  Values are fractions at full precision (``repr``) unless ``percent=True``; nan is written
  as ``nan``. ``extra_columns`` (name -> text) are appended with the same text on every row
  (e.g. a note that must travel with each row). Parent directories are created.
  """
  extra = dict(extra_columns or {})
  names = _ordered_rows(table)
  cols = _columns(table[n] for n in names)
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  with fileio.atomic_write(path, "w", newline="") as f:
    w = csv_cells.writer(f)
    w.writerow(["class", *cols, *extra])
    for n in names:
      row = []
      for c in cols:
        v = table[n].get(c, _NAN)
        v = _NAN if v is None else float(v)
        row.append(repr(100.0 * v if percent else v))
      w.writerow([n, *row, *extra.values()])


def select_epoch(
    history: Sequence[Mapping[str, Mapping[str, float]]], protocol: str = "final"
) -> int:
  """Index of the epoch to report from per-epoch ``summarise`` tables (docs/method.md §10).

  ``"final"`` (default): the last epoch. ``"best_epoch"``: the reference implementation's
  protocol, the epoch with the highest mean I-AUROC + mean P-AUROC (earliest on ties; nan
  counts as -inf). The reference protocol selects on the test set; label reports with it.
  """
  if not history:
    raise ValueError("empty history")
  if protocol == "final":
    return len(history) - 1
  if protocol != "best_epoch":
    raise ValueError(f"unknown protocol {protocol!r} (use 'final' or 'best_epoch')")
  best, best_val = 0, -math.inf
  for i, table in enumerate(history):
    row = table[MEAN_ROW]
    val = sum(_NAN if row.get(k) is None else float(row[k]) for k in ("i_auroc", "p_auroc"))
    if math.isnan(val):
      val = -math.inf
    if val > best_val:
      best, best_val = i, val
  return best
