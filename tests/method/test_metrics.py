"""Tests for cras_jax.method.metrics (docs/method.md §10)."""

import csv
import math

import numpy as np
import pytest
from scipy import ndimage

from cras_jax.method import metrics as M

sk_metrics = pytest.importorskip("sklearn.metrics")


# ------------------------------------------------------------------------------------------
# AUROC / AP against scikit-learn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_auroc_ap_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 400))
  y = rng.random(n) < rng.uniform(0.1, 0.9)
  y[0], y[1] = True, False  # both classes present
  scores = np.round(rng.normal(size=n) + 0.8 * y, 1)  # many ties
  if seed % 2:
    scores = scores.astype(np.float32)
  assert abs(M.auroc(y, scores) - sk_metrics.roc_auc_score(y, scores)) < 1e-12
  assert abs(M.average_precision(y, scores) - sk_metrics.average_precision_score(y, scores)) < 1e-12
  # integer labels and 2-D inputs give the same result
  yi = y.astype(np.int64).reshape(1, -1)
  assert M.auroc(yi, scores.reshape(1, -1)) == M.auroc(y, scores)


def test_auroc_ap_match_sklearn_heavy_ties_and_majority_positive():
  rng = np.random.default_rng(123)
  y = rng.random(5000) < 0.8  # majority positive exercises the "bin the smaller class" path
  scores = rng.integers(0, 4, size=5000).astype(np.float64)
  assert abs(M.auroc(y, scores) - sk_metrics.roc_auc_score(y, scores)) < 1e-12
  assert abs(M.average_precision(y, scores) - sk_metrics.average_precision_score(y, scores)) < 1e-12


def test_auroc_ap_exact_cases():
  y = np.array([0, 0, 0, 1, 1])
  assert M.auroc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
  assert M.auroc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
  assert M.auroc(y, [0.5] * 5) == 0.5  # all tied
  assert M.average_precision(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
  assert M.average_precision(y, [0.5] * 5) == pytest.approx(2 / 5)
  # one tied positive/negative pair counts one half: 3 of 4 pairs + 0.5 -> 3.5/4
  assert M.auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
  # AP by hand: ranking 1(+),0.5(-),0.4(+): P@R=.5 is 1, P@R=1 is 2/3 -> 0.5 + 1/3
  assert M.average_precision([1, 0, 1], [1.0, 0.5, 0.4]) == pytest.approx(0.5 + 1 / 3)


def test_auroc_ap_nan_when_one_class():
  assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert math.isnan(M.auroc([0, 0], [0.1, 0.2]))
  assert math.isnan(M.average_precision([0, 0, 0], [0.1, 0.2, 0.3]))
  assert math.isnan(M.average_precision([1, 1], [0.1, 0.2]))
  assert math.isnan(M.auroc([], []))


def test_input_errors():
  with pytest.raises(ValueError):
    M.auroc([0, 1], [0.1, float("nan")])
  with pytest.raises(ValueError):
    M.auroc([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError):
    M.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError):
    M.aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4)), fpr_limit=0.0)


# ------------------------------------------------------------------------------------------
# AUPRO against an independent brute-force implementation
# ------------------------------------------------------------------------------------------
def _aupro_bruteforce(masks, maps, fpr_limit=0.3):
  masks = np.asarray(masks).astype(bool)
  maps = np.asarray(maps, dtype=np.float64)
  normal = ~masks
  n_normal = normal.sum()
  points = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:  # every distinct score, high to low
    # region overlaps, one image at a time
    overlaps = []
    for i, m in enumerate(masks):
      lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
      for k in range(1, n + 1):
        region = lab == k
        overlaps.append(np.mean(maps[i][region] >= t))
    pro = float(np.mean(overlaps))
    fpr = float(np.sum((maps >= t) & normal) / n_normal)
    points.append((fpr, pro))
  points.append((1.0, 1.0))
  # integrate the piecewise-linear curve over [0, fpr_limit], clipping each segment
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
    if x1 <= x0 or x0 >= fpr_limit:
      continue
    xe = min(x1, fpr_limit)
    ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)
    area += 0.5 * (y0 + ye) * (xe - x0)
  return area / fpr_limit


def _random_masks(rng, n, h, w):
  masks = np.zeros((n, h, w), dtype=bool)
  for i in range(n):
    if i == 0:
      continue  # a good image (no defect)
    for _ in range(rng.integers(1, 4)):  # a few rectangles
      y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
      masks[i, y0 : y0 + rng.integers(1, 6), x0 : x0 + rng.integers(1, 6)] = True
    masks[i] |= rng.random((h, w)) < 0.02  # speckles: single pixels, diagonal contacts
  return masks


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_bruteforce(seed):
  rng = np.random.default_rng(seed)
  n, h, w = 4, 16, 16
  masks = _random_masks(rng, n, h, w)
  maps = rng.normal(size=(n, h, w)) + 1.0 * masks
  maps = ndimage.gaussian_filter(maps, sigma=(0, 1, 1))
  maps = np.round(maps, 1)  # ties
  if seed % 2:
    maps = maps.astype(np.float32)
  limit = 0.3 if seed < 4 else [0.05, 1.0][seed - 4]
  expected = _aupro_bruteforce(masks, maps, limit)
  got = M.aupro(masks, maps, fpr_limit=limit)
  assert abs(got - expected) < 1e-9
  # list-of-arrays input and the shared-sort path in compute_class_metrics agree
  assert M.aupro(list(masks), list(maps), fpr_limit=limit) == got
  res = M.compute_class_metrics(
      masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps, fpr_limit=limit
  )
  assert res["aupro"] == got


def test_aupro_exact_cases():
  masks = np.zeros((2, 8, 8), dtype=bool)
  masks[1, 2:4, 2:5] = True
  masks[1, 6, 6] = True
  perfect = masks.astype(np.float64)
  assert M.aupro(masks, perfect) == 1.0
  # perfect but with graded scores inside regions -> still 1 (FPR stays 0 until PRO = 1)
  graded = np.where(masks, 1.0 + np.arange(masks.size).reshape(masks.shape), 0.0)
  assert M.aupro(masks, graded) == 1.0
  # a constant map: the curve is the straight line (0,0)-(1,1): area 0.3^2/2 / 0.3 = 0.15
  assert M.aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15, abs=1e-12)
  # inverted map: PRO stays 0 until every normal pixel is in (FPR = 1) -> 0
  assert M.aupro(masks, -perfect) == 0.0
  # a single 2-D image is accepted
  assert M.aupro(masks[1], perfect[1]) == 1.0


def test_aupro_uses_8_connectivity():
  # two pixels touching only diagonally form ONE region with 8-connectivity.
  mask = np.zeros((1, 5, 5), dtype=bool)
  mask[0, 1, 1] = mask[0, 2, 2] = True
  mask[0, 4, 0] = True  # a separate region of one pixel
  amap = np.zeros((1, 5, 5))
  amap[0, 1, 1] = 2.0  # half of the diagonal region detected first
  amap[0, 4, 0] = 1.0
  curve = M.pro_curve(mask, amap)
  fprs, pros = curve
  # regions: {(1,1),(2,2)} weight 1/(2*2) each, {(4,0)} weight 1/2 -> first point PRO 0.25
  # (with 4-connectivity it would be 1/3).
  assert pros[1] == pytest.approx(0.25)
  assert pros[2] == pytest.approx(0.75)
  assert fprs[1] == 0.0 and fprs[2] == 0.0


def test_aupro_nan_without_defects():
  assert math.isnan(M.aupro(np.zeros((3, 6, 6)), np.random.default_rng(0).random((3, 6, 6))))
  assert math.isnan(M.aupro(np.ones((1, 3, 3)), np.zeros((1, 3, 3))))  # no normal pixel
  assert M.pro_curve(np.zeros((1, 3, 3)), np.zeros((1, 3, 3))) is None


# ------------------------------------------------------------------------------------------
# compute_class_metrics, summarise, tables
# ------------------------------------------------------------------------------------------
def test_compute_class_metrics_matches_standalone():
  rng = np.random.default_rng(7)
  masks = _random_masks(rng, 6, 20, 20)
  maps = np.round(rng.random((6, 20, 20)) + 0.5 * masks, 2).astype(np.float32)
  labels = masks.any(axis=(1, 2))
  img_scores = maps.max(axis=(1, 2))
  res = M.compute_class_metrics(labels, img_scores, masks, maps)
  assert set(res) == set(M.METRIC_KEYS)
  assert res["i_auroc"] == M.auroc(labels, img_scores)
  assert res["i_ap"] == M.average_precision(labels, img_scores)
  assert abs(res["p_auroc"] - sk_metrics.roc_auc_score(masks.ravel(), maps.ravel())) < 1e-12
  assert abs(res["p_ap"] - sk_metrics.average_precision_score(masks.ravel(), maps.ravel())) < 1e-12
  assert res["aupro"] == M.aupro(masks, maps)
  # uint8 0/255 masks are binarised the same way
  res255 = M.compute_class_metrics(labels, img_scores, masks.astype(np.uint8) * 255, maps)
  assert res255 == res

  no_px = M.compute_class_metrics(labels, img_scores)
  assert no_px["i_auroc"] == res["i_auroc"]
  assert all(math.isnan(no_px[k]) for k in ("p_auroc", "p_ap", "aupro"))


def test_summarise_and_tables(tmp_path):
  nan = float("nan")
  per_class = {
      "bottle": {"i_auroc": 1.0, "i_ap": 1.0, "p_auroc": 0.98, "p_ap": 0.5, "aupro": 0.9},
      "cable": {"i_auroc": 0.9, "i_ap": 0.8, "p_auroc": 0.96, "p_ap": nan, "aupro": 0.8},
      "zipper": {"i_auroc": 0.95, "i_ap": 0.9, "p_auroc": nan, "p_ap": nan, "aupro": nan},
  }
  table = M.summarise(per_class)
  assert list(table) == ["bottle", "cable", "zipper", "mean"]
  mean = table["mean"]
  assert mean["i_auroc"] == pytest.approx(0.95)
  assert mean["i_ap"] == pytest.approx(0.9)
  assert mean["p_auroc"] == pytest.approx(0.97)  # nan class skipped
  assert mean["p_ap"] == pytest.approx(0.5)
  assert mean["aupro"] == pytest.approx(0.85)
  assert "mean" not in per_class  # input untouched

  all_nan = M.summarise({"a": {"i_auroc": nan}, "b": {"i_auroc": nan}})
  assert math.isnan(all_nan["mean"]["i_auroc"])
  with pytest.raises(ValueError):
    M.summarise({"mean": {"i_auroc": 1.0}})

  md = M.to_markdown(table)
  lines = md.strip().splitlines()
  assert lines[0] == "| class | I-AUROC | I-AP | P-AUROC | P-AP | AUPRO |"
  assert lines[2] == "| bottle | 100.0 | 100.0 | 98.0 | 50.0 | 90.0 |"
  assert lines[4] == "| zipper | 95.0 | 90.0 | - | - | - |"
  assert lines[-1] == "| mean | 95.0 | 90.0 | 97.0 | 50.0 | 85.0 |"
  assert "| 97.00 |" in M.to_markdown(table, digits=2)
  assert M.to_markdown(table, title="protocol: final").startswith("protocol: final\n\n|")

  path = tmp_path / "sub" / "metrics.csv"
  M.to_csv(table, path)
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["class", *M.METRIC_KEYS]
  assert [r[0] for r in rows[1:]] == ["bottle", "cable", "zipper", "mean"]
  assert float(rows[2][1]) == 0.9 and rows[3][3] == "nan"
  assert float(rows[4][5]) == table["mean"]["aupro"]


def test_select_epoch():
  def tab(i, p):
    return {"mean": {"i_auroc": i, "p_auroc": p}}

  hist = [tab(0.9, 0.9), tab(0.95, 0.96), tab(0.96, 0.95), tab(0.93, 0.94)]
  assert M.select_epoch(hist) == 3
  assert M.select_epoch(hist, "best_epoch") == 1  # first of the tied best
  with pytest.raises(ValueError):
    M.select_epoch(hist, "best")
