"""Spread over seeds: mean, std, t interval and the paired test, against numpy/scipy done by
hand on small tables."""

import math

import numpy as np
import pytest
from scipy import stats

from cras_jax.experiments import spread


def test_describe_matches_the_t_interval():
  v = [0.8, 0.9, 0.85, 0.95]
  d = spread.describe(v)
  sd = np.std(v, ddof=1)
  half = stats.t.ppf(0.975, 3) * sd / 2.0
  assert d["n"] == 4 and d["mean"] == pytest.approx(np.mean(v))
  assert d["std"] == pytest.approx(sd)
  assert (d["lo"], d["hi"]) == pytest.approx((np.mean(v) - half, np.mean(v) + half))
  one = spread.describe([0.7, math.nan])
  assert one["n"] == 1 and one["std"] == 0.0 and math.isnan(one["lo"])
  assert spread.interval(one) == "-" and spread.pct(one) == "70.0 ± 0.0"


def test_spread_per_class_and_mean_row():
  tables = [
      {"a": {"i_auroc": 0.9}, "b": {"i_auroc": 0.7}, "mean": {"i_auroc": 0.8}},
      {"a": {"i_auroc": 1.0}, "b": {"i_auroc": 0.6}, "mean": {"i_auroc": 0.8}},
  ]
  sp = spread.spread(tables, ["i_auroc"])
  assert list(sp) == ["a", "b", "mean"]
  assert sp["a"]["i_auroc"]["mean"] == pytest.approx(0.95)
  assert sp["mean"]["i_auroc"]["std"] == pytest.approx(0.0)
  md = spread.markdown(sp, ["i_auroc"], {"i_auroc": "I-AUROC"}, 2)
  assert "| a | 95.0 ± 7.1 |" in md


def test_compare_is_a_wilcoxon_over_seed_class_pairs():
  rng = np.random.default_rng(0)
  classes = ["c0", "c1", "c2", "c3"]
  a = [
      {c: {"i_auroc": float(x)} for c, x in zip(classes, rng.uniform(0.7, 0.9, 4))}
      for _ in range(4)
  ]
  shifted = [
      {c: {"i_auroc": r[c]["i_auroc"] + 0.05 + 0.001 * i} for i, c in enumerate(classes)} for r in a
  ]
  out = spread.compare(a, shifted, "i_auroc")
  xs = [r[c]["i_auroc"] for r in a for c in classes]
  ys = [r[c]["i_auroc"] for r in shifted for c in classes]
  assert out["pairs"] == 16 and out["diff"] == pytest.approx(np.mean(np.subtract(ys, xs)))
  assert out["p"] == pytest.approx(stats.wilcoxon(ys, xs).pvalue) and out["significant"]
  same = spread.compare(a, a, "i_auroc")
  assert same["p"] == 1.0 and not same["significant"]
  noise = [
      {c: {"i_auroc": r[c]["i_auroc"] + float(e)} for c, e in zip(classes, rng.normal(0, 0.01, 4))}
      for r in a
  ]
  assert not spread.compare(a, noise, "i_auroc")["significant"]
