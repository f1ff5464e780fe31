"""Where a fitted threshold lies: BETWEEN calibration values, never on one, so the decisions on
the calibration images are those of the optimum and do not depend on which scorer (JAX, ONNX:
~1e-6 apart) computed the values."""

import math

import numpy as np
import pytest

from cras_jax.scoring import threshold_fit, thresholds


def _f32_mid(lo: float, hi: float) -> float:
  return float(np.float32((np.float64(np.float32(lo)) + np.float64(np.float32(hi))) / 2))


def _best_f1_on_a_score(s, y) -> float:
  """The F1 optimum over thresholds placed ON each distinct score (the placement of old)."""
  s = np.asarray(s, np.float32)
  return max(threshold_fit.prf(s >= v, y)["f1"] for v in np.unique(s))


def test_the_threshold_lies_midway_between_the_chosen_score_and_the_next_lower():
  s = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
  thr, f1 = threshold_fit.f1_optimal_threshold(s, np.array([0, 0, 0, 1, 1, 1], bool))
  assert thr == _f32_mid(0.3, 0.35) == 0.32499998807907104 and f1 == 1.0
  # ties decide together: two images at 0.3 (one normal, one defective) are flagged together
  thr, f1 = threshold_fit.f1_optimal_threshold([0.1, 0.3, 0.3, 0.5], [0, 0, 1, 1])
  assert thr == _f32_mid(0.1, 0.3) and math.isclose(f1, 0.8)
  # every score flagged (the optimum here): below the lowest by half its gap to the next
  thr, f1 = threshold_fit.f1_optimal_threshold([0.1, 0.2, 0.4], [1, 1, 0])
  assert thr == float(np.float32(0.1 - 0.05)) and math.isclose(f1, 0.8)
  # one distinct value: below it by EDGE_MARGIN / 2 * max(1, |v|)
  assert threshold_fit.f1_optimal_threshold([2.0, 2.0], [1, 0])[0] == float(np.float32(2 - 1e-3))
  # only +inf flagged (no finite score): above the top score by half its gap to the next lower
  thr, f1 = threshold_fit.f1_optimal_threshold([0.2, 0.5, np.inf], [0, 0, 1])
  assert thr == float(np.float32(0.5 + 0.15)) and f1 == 1.0
  # NaN is never flagged (NaN >= t is false) and counts as a missed defect
  thr, f1 = threshold_fit.f1_optimal_threshold([np.nan, 0.5, 0.7], [1, 0, 1])
  assert thr == _f32_mid(0.5, 0.7) and math.isclose(f1, 2 / 3)
  assert all(map(math.isnan, threshold_fit.f1_optimal_threshold([np.nan, np.nan], [1, 0])))
  # two adjacent float32 values have nothing between them: the flagged one (decisions kept)
  a = np.float32(1.0)
  b = np.nextafter(a, np.float32(2))
  assert threshold_fit.f1_optimal_threshold([a, b], [0, 1])[0] == float(b)


@pytest.mark.parametrize("seed", range(40))
def test_the_f1_at_the_threshold_is_the_f1_at_the_chosen_score(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 40))
  y = rng.random(n) < 0.4
  y[0] = True
  s = rng.normal(size=n) + 1.5 * y * rng.random()
  if seed % 4 == 0:
    s = np.round(s, 1)  # ties
  thr, f1 = threshold_fit.f1_optimal_threshold(s, y)
  s32 = s.astype(np.float32)
  assert threshold_fit.prf(s32 >= thr, y)["f1"] == pytest.approx(f1, abs=1e-12)
  assert f1 == pytest.approx(_best_f1_on_a_score(s, y), abs=1e-12)
  assert not np.any(s32 == np.float32(thr))  # never on a score
  assert np.array_equal(s32 >= thr, s32 > thr)  # `>=` and `>` decide alike


def _flips(s, thr, eps=1e-6) -> int:
  """Decisions that change when every score moves by +-eps (all up, all down, random)."""
  s = np.asarray(s, np.float32).reshape(-1)
  base = s >= np.float32(thr)
  signs = np.random.default_rng(0).choice([-1.0, 1.0], s.size)
  moved = [s + np.float32(eps), s - np.float32(eps), s + np.float32(eps) * signs]
  return max(int(np.sum((m >= np.float32(thr)) != base)) for m in moved)


@pytest.mark.parametrize("seed", range(20))
def test_a_perturbation_of_1e6_flips_no_calibration_decision(seed):
  """Scores on a 1e-4 grid (every gap >= 1e-4 > 2e-6), including the case the old placement
  put ON the lowest score (everything flagged)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(4, 60))
  y = rng.random(n) < 0.5
  y[0] = True
  s = np.round(rng.normal(size=n) + y * rng.random(), 4)
  if seed == 0:  # the tiny demo run's case: the defects the lowest, all flagged
    s, y = np.array([-1.75, -1.56, -0.64, 0.0, 0.0001, 0.16]), np.array([1, 1, 1, 0, 0, 1], bool)
  thr, _ = threshold_fit.f1_optimal_threshold(s, y)
  assert _flips(s, thr) == 0
  if seed == 0:
    assert thr < -1.75  # everything flagged, with a margin


def _res(n=24, defects=True, close_top=False, masks=True, classes=2):
  """A scored split (fit's input), scores 1e-3 apart at least; close_top: the two top scores
  of class 0 1e-5 apart (7e-6 once normalised)."""
  rng = np.random.default_rng(3)
  label = np.arange(n) % classes
  is_anomaly = (np.arange(n) % 3 == 0).astype(int) if defects else np.zeros(n, int)
  scores = np.round(rng.random(n) + 2.0 * is_anomaly + 5.0 * label, 3)
  names = [f"x/{i:03d}.png" for i in range(n)]
  if close_top:  # two calibration images of class 0
    cal = thresholds.calibration_mask(names, label, is_anomaly)
    scores[np.flatnonzero(cal & (label == 0))[:2]] = [2.0, 2.00001]
  maps = scores[:, None, None] * np.linspace(0.5, 1.0, 64).reshape(1, 8, 8)
  mask = np.zeros((n, 8, 8), np.uint8)
  mask[is_anomaly == 1, 4:, 4:] = 1
  return {
      "scores": scores,
      "maps": maps.astype(np.float32),
      "cls": label,
      "label": label,
      "is_anomaly": is_anomaly,
      "mask": mask,
      "name": names,
      "has_mask": np.full(n, masks),
  }


def _calibration_values(res, d):
  cal = thresholds.calibration_mask(res["name"], res["label"], res["is_anomaly"])
  loc, scale = d["normalisation"]["loc"], d["normalisation"]["scale"]
  z = thresholds.normalise(res["scores"], res["cls"], loc, scale)[cal]
  zmaps = thresholds.normalise_maps(res["maps"][cal], res["cls"][cal], loc, scale)
  return z, zmaps


@pytest.mark.parametrize("case", ["f1", "normal_quantile"])
def test_fit_places_both_thresholds_between_calibration_values(case):
  """Both rules (F1 with defects; the normal quantile without, whose value the old placement
  left 5% of a gap below the top score): no calibration image or pixel on a threshold, and
  none flipped by 1e-6."""
  quantile = case == "normal_quantile"
  res = _res(defects=not quantile, close_top=quantile, classes=1 if quantile else 2)
  d = threshold_fit.fit(res, ["a"] if quantile else ["a", "b"])
  assert d["rules"]["image"].startswith(case) and d["rules"]["pixel"].startswith(case)
  z, zmaps = _calibration_values(res, d)
  for values, thr in ((z, d["image_threshold"]), (zmaps, d["pixel_threshold"])):
    assert not np.any(values == np.float32(thr))
    assert _flips(values, thr) == 0
  if case == "normal_quantile":  # the quantile's decisions: the top normal image alone
    assert int(np.sum(z >= d["image_threshold"])) == 1


def test_fit_without_pixel_ground_truth_stores_no_pixel_threshold():
  """No calibration image has a mask: no pixel threshold (null), not an IndexError."""
  d = threshold_fit.fit(_res(defects=False, masks=False), ["a", "b"])
  assert math.isnan(d["pixel_threshold"]) and d["rules"]["pixel"] == "none"
  assert math.isfinite(d["image_threshold"])
