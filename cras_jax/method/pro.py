"""The per-region overlap (PRO) curve and its normalised area up to a false-positive rate
(AUPRO), as MVTec AD's official ``compute_pro`` (the conventions are those of ``metrics``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from cras_jax.method.ranking import NAN, SortedScores, as_bool, as_scores


# ----------------------------------------------------------------------------------------------
# Public: AUPRO
# ----------------------------------------------------------------------------------------------
def stack_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
  m = as_bool(masks)
  a = as_scores(maps)
  if m.shape != a.shape:
    raise ValueError(f"masks {m.shape} and maps {a.shape} differ in shape")
  if m.ndim < 2:
    raise ValueError("masks/maps must be (H, W) or (N, H, W) (or (..., H, W))")
  h, w = m.shape[-2:]
  return m.reshape(-1, h, w), a.reshape(-1, h, w)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
  """Per defect pixel (in ``masks[masks]`` order): 1 / (region size * number of regions).

  Regions are the connected components of each image's mask with 8-connectivity (a 3x3
  all-ones structure, as MVTec AD's official ``compute_pro``); images never connect to each
  other.
  """
  structure = np.zeros((3, 3, 3), dtype=bool)
  structure[1] = True  # 8-connectivity within each (H, W) plane only
  labelled, n_regions = ndimage.label(masks, structure=structure)
  if n_regions == 0:
    return np.zeros(0), 0
  ids = labelled[masks]
  sizes = np.bincount(ids, minlength=n_regions + 1)
  return 1.0 / (sizes[ids].astype(np.float64) * n_regions), int(n_regions)


def pro_curve_from_sorted(
    sorted_scores: SortedScores,
    m: np.ndarray,
    a: np.ndarray,
    neg_counts_desc: np.ndarray | None = None,
):
  weights, n_regions = _region_weights(m)
  n_def = weights.size
  n_ok = m.size - n_def
  if n_regions == 0 or n_ok == 0:
    return None
  def_scores = a[m]
  pro_w = sorted_scores.bin(def_scores, weights)[::-1]
  if neg_counts_desc is None:
    neg_counts_desc = sorted_scores.counts[::-1] - sorted_scores.bin(def_scores)[::-1]
  k = neg_counts_desc.size
  fprs = np.empty(k + 2)
  pros = np.empty(k + 2)
  fprs[0] = pros[0] = 0.0
  fprs[-1] = pros[-1] = 1.0
  np.cumsum(neg_counts_desc, out=fprs[1:-1])  # exact: counts < 2**53
  fprs[1:-1] /= n_ok
  np.cumsum(pro_w, out=pros[1:-1])
  np.minimum(fprs, 1.0, out=fprs)
  np.minimum(pros, 1.0, out=pros)
  return fprs, pros


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray] | None:
  """The full PRO curve ``(fprs, pros)``, one point per distinct score, plus (0,0) and (1,1).

  Mirrors MVTec AD's ``compute_pro``. ``None`` if there is no defect or no normal pixel.
  """
  m, a = stack_maps(masks, maps)
  return pro_curve_from_sorted(SortedScores(a.ravel()), m, a)


def _trapezoid_limited(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoid area under (x, y) (x non-decreasing) from x[0] to x_max.

  If x_max is not a node, the curve is linearly interpolated at x_max between the last node
  below it and the first node above it (as MVTec AD's ``trapezoid``).
  """
  ins = int(np.searchsorted(x, x_max, side="right"))  # == bisect.bisect(x, x_max)
  correction = 0.0
  if not np.any(x == x_max):
    if not 0 < ins < x.size:
      raise ValueError("x_max outside the curve's range")
    x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
    y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    correction = 0.5 * (y_interp + y0) * (x_max - x0)
  xs, ys = x[:ins], y[:ins]
  return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)) + correction)


def aupro_from_curve(curve, fpr_limit: float) -> float:
  if curve is None:
    return NAN
  fprs, pros = curve
  return _trapezoid_limited(fprs, pros, fpr_limit) / fpr_limit


def check_limit(fpr_limit: float) -> float:
  fpr_limit = float(fpr_limit)
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
  return fpr_limit


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
  """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

  ``masks``/``maps``: arrays (or lists of equal-shape arrays) of shape (N, H, W) or (H, W).
  For every distinct score t (pixels with score >= t are "anomalous"):
    PRO(t) = mean over all defect regions of the fraction of the region's pixels >= t, where
             regions are the 8-connected components (``scipy.ndimage.label`` with a 3x3
             all-ones structure, as MVTec AD's official code) of each image's mask;
    FPR(t) = fraction of all normal pixels (over all images) with score >= t.
  The curve starts at (0, 0), ends at (1, 1), is integrated with the trapezoid rule from 0 to
  ``fpr_limit`` (interpolated at exactly ``fpr_limit``) and divided by ``fpr_limit``, so the
  result lies in [0, 1]. Returns ``nan`` if there is no defect pixel (or no normal pixel).
  """
  fpr_limit = check_limit(fpr_limit)
  m, a = stack_maps(masks, maps)
  return aupro_from_curve(pro_curve_from_sorted(SortedScores(a.ravel()), m, a), fpr_limit)
