"""Ranking metrics from scores and binary labels, exact with respect to ties: AUROC and average
precision (the conventions are those of ``metrics``). The scores are sorted once
(``SortedScores``); positives and negatives are then counted per distinct score, so the
pixel metrics of one class can share one sort."""

from __future__ import annotations

from typing import Any

import numpy as np

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------
def as_bool(x: Any) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x
  return x > 0.5


def as_scores(x: Any) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number):
    x = x.astype(np.float64)
  if np.iscomplexobj(x):
    raise ValueError("scores must be real")
  if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
    raise ValueError("scores contain NaN")
  return x


def flat_pair(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  y = as_bool(labels).ravel()
  s = as_scores(scores).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in size")
  return y, s


# ----------------------------------------------------------------------------------------------
# Shared machinery: counts per distinct score
# ----------------------------------------------------------------------------------------------
class SortedScores:
  """All scores sorted once; distinct values and their multiplicities (ascending)."""

  def __init__(self, scores: np.ndarray):
    s = np.sort(scores, kind="quicksort")
    n = s.size
    last = np.empty(n, dtype=bool)
    if n:
      np.not_equal(s[1:], s[:-1], out=last[:-1])
      last[-1] = True
    ends = np.flatnonzero(last)
    self.values = s[ends]  # distinct scores, ascending
    counts = np.empty_like(ends)  # how many scores equal each distinct value
    if ends.size:
      counts[0] = ends[0] + 1
      np.subtract(ends[1:], ends[:-1], out=counts[1:])
    self.counts = counts
    self.n = n

  def bin(self, subset_scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per distinct value: number (or summed weight) of ``subset_scores`` equal to it."""
    idx = np.searchsorted(self.values, subset_scores, side="left")
    return np.bincount(idx, weights=weights, minlength=self.values.size)


def pos_neg_counts(sorted_scores: SortedScores, y: np.ndarray, s: np.ndarray):
  """Positive and negative counts per distinct score, in DESCENDING score order."""
  n_pos = int(np.count_nonzero(y))
  if n_pos <= y.size - n_pos:
    pos = sorted_scores.bin(s[y])
    neg = sorted_scores.counts - pos
  else:  # bin the smaller class
    neg = sorted_scores.bin(s[~y])
    pos = sorted_scores.counts - neg
  return pos[::-1].astype(np.int64, copy=False), neg[::-1].astype(np.int64, copy=False)


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
  n_pos, n_neg = int(pos.sum()), int(neg.sum())
  if n_pos == 0 or n_neg == 0:
    return NAN
  tps = np.cumsum(pos)
  # trapezoid over the ROC points (fps, tps), starting at (0, 0); exact in integers:
  # area * 2 * P * N = sum_k neg_k * (tps_{k-1} + tps_k)
  twice_area = int(np.dot(neg, 2 * tps - pos))
  return twice_area / (2.0 * n_pos * n_neg)


def ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
  n_pos = int(pos.sum())
  if n_pos == 0 or int(neg.sum()) == 0:
    return NAN
  tps = np.cumsum(pos)
  predicted = tps + np.cumsum(neg)
  keep = pos > 0  # thresholds where recall changes
  precision = tps[keep] / predicted[keep]
  return float(np.sum(pos[keep] * precision) / n_pos)


# ----------------------------------------------------------------------------------------------
# Public: image/pixel ranking metrics
# ----------------------------------------------------------------------------------------------
def auroc(labels: Any, scores: Any) -> float:
  """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``.

  Ties: the ROC curve has one point per distinct score (trapezoid rule), so tied
  positive/negative pairs count one half. Returns ``nan`` when only one class is present
  (scikit-learn raises instead). Inputs of any shape are flattened.
  """
  y, s = flat_pair(labels, scores)
  pos, neg = pos_neg_counts(SortedScores(s), y, s)
  return auroc_from_counts(pos, neg)


def average_precision(labels: Any, scores: Any) -> float:
  """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds.

  Same definition as ``sklearn.metrics.average_precision_score`` (step-wise, no
  interpolation). Returns ``nan`` when only one class is present.
  """
  y, s = flat_pair(labels, scores)
  pos, neg = pos_neg_counts(SortedScores(s), y, s)
  return ap_from_counts(pos, neg)
