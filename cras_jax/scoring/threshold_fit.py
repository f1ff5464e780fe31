"""Fitting the decision thresholds and the per-class normalisation of thresholds.json (`fit`),
and the threshold rules it applies (`separating_threshold`, `f1_optimal_threshold`): the
protocol is described in `cras_jax/scoring/thresholds.py`, which holds the calibration split,
the normalisation and the file."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cras_jax.scoring.thresholds import (
    FORMAT_VERSION,
    MAX_CANDIDATES,
    MAX_PIXELS,
    QUANTILE,
    calibration_mask,
    normalisation,
    normalise,
    normalise_maps,
)

EDGE_MARGIN = 1e-3  # the least margin beyond an extreme score, relative to max(1, |score|)


def separating_threshold(scores, threshold) -> float:
  """`threshold` moved BETWEEN `scores`, keeping the decisions `scores >= threshold` on them.

  Scores are compared in float32, as every scorer compares them (predict, the .npz and ONNX
  exports). The result is the float32 midway between the highest score left unflagged and the
  lowest score flagged, so both lie half their gap from it: `scores >= result` (and
  `scores > result`) decide every one of these scores as `scores >= threshold` does, and no
  change of a score by less than half that gap (less one float32 rounding) flips a decision,
  such as a scorer that differs from another by 1e-6. Where no score lies on one side (all
  flagged, or none), the result lies beyond the extreme score by half the gap to its neighbour
  on the other side, at least `EDGE_MARGIN` * max(1, |score|) / 2. Two adjacent float32
  values cannot be separated by a third: the result is then the flagged one (the decisions
  kept, no margin). Equal scores are decided together. Non-finite scores never bound the
  result (NaN and -inf are never flagged by a finite threshold, +inf always). NaN where there
  is no finite score or `threshold` is NaN.
  """
  s = np.asarray(scores, np.float32).reshape(-1)
  s = s[np.isfinite(s)]
  t = np.float32(threshold)
  if not s.size or np.isnan(t):
    return float("nan")
  below, above = s[s < t], s[s >= t]
  if below.size and above.size:
    lo, hi = below.max(), above.min()
    mid = np.float32((np.float64(lo) + np.float64(hi)) / 2)
    return float(mid if lo < mid <= hi else hi)
  down = not below.size  # every score flagged: the threshold goes below the lowest
  v = above.min() if down else below.max()
  rest = above[above > v] if down else below[below < v]
  gap = float(abs(rest.min() - v) if down else abs(v - rest.max())) if rest.size else 0.0
  margin = max(gap, EDGE_MARGIN * max(1.0, abs(float(v)))) / 2
  out = np.float32(float(v) - margin if down else float(v) + margin)
  if out == v:  # a margin below float32's resolution at v
    out = np.nextafter(v, np.float32(-np.inf if down else np.inf))
  return float(out)


def f1_optimal_threshold(scores, labels, max_candidates: int = MAX_CANDIDATES):
  """(threshold, f1) maximising F1 of `scores >= threshold` against boolean `labels`.

  The F1 is maximised over the decisions "flag the scores >= v", v each distinct finite score
  (with more than `max_candidates` of them, that many quantiles of the scores, each a score,
  and the top positive's), and "flag no finite score"; the threshold returned makes exactly
  those decisions and lies BETWEEN scores (`separating_threshold`: midway between the lowest
  flagged score and the highest unflagged one, in float32; beyond the extreme score when all
  or none are flagged), never on one, so the decisions on these scores do not depend on which
  scorer (JAX, ONNX) computed them to within half that gap. Ties are decided together. NaN
  and -inf scores are never flagged, +inf always (as `>=` decides them at a finite
  threshold), and count so in the F1. (NaN, NaN) when there is no positive or no finite score.
  """
  s = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels, bool).reshape(-1)
  finite = np.isfinite(s)
  n_pos = int(labels.sum())
  if n_pos == 0 or not finite.any():
    return float("nan"), float("nan")
  pos, neg = np.sort(s[finite & labels]), np.sort(s[finite & ~labels])
  top = s == np.inf  # flagged by every finite threshold
  cand = np.unique(s[finite])
  if cand.size > max_candidates:
    q = np.quantile(s[finite], np.linspace(0.0, 1.0, max_candidates), method="inverted_cdf")
    cand = np.unique(np.concatenate([q, pos[-1:]]))
  cand = np.append(cand, np.float32(np.inf))  # the last: no finite score flagged
  tp = pos.size - np.searchsorted(pos, cand, "left") + int(np.sum(top & labels))
  fp = neg.size - np.searchsorted(neg, cand, "left") + int(np.sum(top & ~labels))
  f1 = 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1)
  i = int(np.argmax(f1))
  return separating_threshold(s, cand[i]), float(f1[i])


def prf(pred, labels) -> dict:
  """Precision, recall, F1 and counts of boolean predictions."""
  pred, labels = np.asarray(pred, bool).reshape(-1), np.asarray(labels, bool).reshape(-1)
  tp = int(np.sum(pred & labels))
  fp = int(np.sum(pred & ~labels))
  fn = int(np.sum(~pred & labels))
  tn = int(pred.size - tp - fp - fn)
  precision = tp / (tp + fp) if tp + fp else float("nan")
  recall = tp / (tp + fn) if tp + fn else float("nan")
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
  return {
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "tp": tp,
      "fp": fp,
      "fn": fn,
      "tn": tn,
  }


def _quantile_threshold(scores, quantile: float) -> float:
  """The `quantile` of the finite scores, moved between scores (`separating_threshold`)."""
  s = np.asarray(scores, np.float32).reshape(-1)
  s = s[np.isfinite(s)]
  return separating_threshold(s, np.quantile(s, quantile)) if s.size else float("nan")


def _subsample(n: int, limit: int):
  """Every k-th of n items, at most `limit` (deterministic)."""
  return slice(None) if n <= limit else slice(0, None, math.ceil(n / limit))


def fit(res: dict, class_names: Sequence[str], quantile: float = QUANTILE) -> dict:
  """Normalisation and thresholds fitted on a scored test split (its calibration part).

  res: scores [N], maps [N, H, W], cls [N] (matched class), label [N] (true class),
  is_anomaly [N], mask [N, H, W], name [N], optional has_mask [N]. Returns the content of
  thresholds.json (see `save`).
  """
  k = len(class_names)
  names = [str(n) for n in res["name"]]
  label, is_anomaly = np.asarray(res["label"]), np.asarray(res["is_anomaly"]).astype(bool)
  cls = np.asarray(res["cls"])
  has_mask = np.asarray(res.get("has_mask", np.ones(len(names))), bool)
  cal = calibration_mask(names, label, is_anomaly)
  normal_cal = cal & ~is_anomaly
  loc, scale, info = normalisation(
      np.asarray(res["scores"])[normal_cal], cls[normal_cal], k, quantile
  )
  z = normalise(res["scores"], cls, loc, scale)

  # Image threshold.
  if np.any(cal & is_anomaly):
    image_thr, cal_f1 = f1_optimal_threshold(z[cal], is_anomaly[cal])
    image_rule = "f1_calibration"
  elif np.any(normal_cal):
    image_thr, cal_f1 = _quantile_threshold(z[normal_cal], quantile), float("nan")
    image_rule = f"normal_quantile_{quantile}"
  else:
    raise ValueError("no calibration images: the test split is empty")

  # Pixel threshold, on the calibration images with pixel ground truth.
  pix_sel = np.flatnonzero(cal & has_mask)
  zmaps = normalise_maps(np.asarray(res["maps"])[pix_sel], cls[pix_sel], loc, scale).reshape(-1)
  masks = np.asarray(res["mask"])[pix_sel].reshape(-1).astype(bool)
  keep = _subsample(zmaps.size, MAX_PIXELS)
  zmaps, masks = zmaps[keep], masks[keep]
  if masks.any():
    pixel_thr, pix_f1 = f1_optimal_threshold(zmaps, masks)
    pixel_rule = "f1_calibration"
  elif not zmaps.size:  # no calibration image has pixel ground truth
    pixel_thr, pix_f1, pixel_rule = float("nan"), float("nan"), "none"
  else:
    pixel_thr, pix_f1 = _quantile_threshold(zmaps, quantile), float("nan")
    pixel_rule = f"normal_quantile_{quantile}"
  del zmaps, masks

  def part_metrics(sel) -> dict:
    out = {"images": int(sel.sum()), "image": prf(z[sel] >= image_thr, is_anomaly[sel])}
    psel = np.flatnonzero(sel & has_mask)
    if psel.size:
      zm = normalise_maps(np.asarray(res["maps"])[psel], cls[psel], loc, scale)
      out["pixel"] = prf(zm >= pixel_thr, np.asarray(res["mask"])[psel].astype(bool))
    out["per_class"] = {
        c: prf(z[sel & (label == i)] >= image_thr, is_anomaly[sel & (label == i)])
        for i, c in enumerate(class_names)
        if np.any(sel & (label == i))
    }
    return out

  return {
      "format_version": FORMAT_VERSION,
      "class_names": list(class_names),
      "image_threshold": float(image_thr),
      "pixel_threshold": float(pixel_thr),
      "rules": {
          "image": image_rule,
          "pixel": pixel_rule,
          "decision": "anomalous where normalised value >= threshold",
          "placement": "each threshold lies between calibration values: the float32 midway "
          "between the lowest flagged and the highest unflagged one (beyond the extreme one "
          "when all or none are flagged), never on one",
      },
      "calibration_f1": {"image": cal_f1, "pixel": pix_f1},
      "normalisation": {
          "definition": "z = (s - loc[c]) / scale[c], c = matched class; loc: median score of "
          "the normal calibration images matched to c; scale: their "
          f"{quantile} quantile minus loc (maps use the same loc, scale)",
          "quantile": quantile,
          "loc": loc.tolist(),
          "scale": scale.tolist(),
          **info,
      },
      "split": {
          "definition": "test split; per (class, normal/defective) group, the first "
          "ceil(n/2) images by SHA-256 of the file name calibrate, the "
          "rest report",
          "calibration_images": int(cal.sum()),
          "report_images": int((~cal).sum()),
      },
      "calibration": part_metrics(cal),
      "report": part_metrics(~cal),
  }
