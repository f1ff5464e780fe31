"""Scoring new images (python -m cras_jax.predict) and the thresholds stored with a run."""

import csv
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cras_jax.scoring import predicting, scoring, threshold_fit, thresholds
from tests import predict_helpers
from tests.conftest import ROOT, run_module

# ----------------------------------------------------------------------------- pure functions


def test_f1_optimal_threshold_and_percentile_fallback():
  s = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
  y = np.array([0, 0, 0, 1, 1, 1], bool)
  thr, f1 = threshold_fit.f1_optimal_threshold(s, y)
  assert math.isclose(thr, 0.325, rel_tol=1e-7) and f1 == 1.0  # half-way (float32)
  y2 = np.array([0, 0, 1, 0, 1, 1], bool)  # best: flag the top 4 (F1 6/7) or top 2 (4/5)
  thr2, f12 = threshold_fit.f1_optimal_threshold(s, y2)
  assert math.isclose(thr2, 0.25) and math.isclose(f12, 6 / 7)
  assert math.isnan(threshold_fit.f1_optimal_threshold(s, np.zeros(6, bool))[0])
  # Many distinct values: quantile candidates, still near the separating point.
  rng = np.random.default_rng(0)
  big = np.concatenate([rng.normal(0, 1, 20000), rng.normal(6, 1, 2000)])
  lab = np.arange(big.size) >= 20000
  thr3, _ = threshold_fit.f1_optimal_threshold(big, lab, max_candidates=512)
  assert 2.5 < thr3 < 4.5

  # No defective calibration image: the normal-score quantile.
  res = _fake_res(defects=False)
  d = threshold_fit.fit(res, ["a", "b"])
  assert d["rules"]["image"].startswith("normal_quantile")
  assert d["rules"]["pixel"].startswith("normal_quantile")
  cal = thresholds.calibration_mask(res["name"], res["label"], res["is_anomaly"])
  z = thresholds.normalise(
      res["scores"], res["cls"], d["normalisation"]["loc"], d["normalisation"]["scale"]
  )
  # the quantile's decisions, the threshold moved between the calibration scores
  q = float(np.quantile(z[cal], 0.99))
  np.testing.assert_array_equal(z[cal] >= d["image_threshold"], z[cal] >= q)
  assert not np.any(z[cal] == np.float32(d["image_threshold"]))


def _fake_res(defects=True, n=24, seed=0):
  rng = np.random.default_rng(seed)
  label = np.arange(n) % 2
  is_anomaly = (np.arange(n) % 3 == 0).astype(int) if defects else np.zeros(n, int)
  offset = np.where(label == 1, 5.0, 0.0)  # class b scores 5 higher, 3x wider
  width = np.where(label == 1, 3.0, 1.0)
  scores = offset + width * (rng.random(n) + 2.0 * is_anomaly)
  maps = np.repeat(scores[:, None, None], 16, 1).repeat(16, 2) * np.ones((1, 16, 16))
  mask = np.zeros((n, 16, 16), np.uint8)
  mask[is_anomaly == 1, 4:8, 4:8] = 1
  maps = maps - 3.0 * width[:, None, None] * (1 - mask) * is_anomaly[:, None, None]
  return {
      "scores": scores,
      "maps": maps.astype(np.float32),
      "cls": label,
      "label": label,
      "is_anomaly": is_anomaly,
      "mask": mask,
      "name": [f"x/{i:03d}.png" for i in range(n)],
  }


def test_split_normalisation_and_one_threshold_for_all_classes():
  res = _fake_res()
  cal = thresholds.calibration_mask(res["name"], res["label"], res["is_anomaly"])
  # Deterministic, independent of order, ceil(n/2) of every (class, normal/defective) group.
  perm = np.random.default_rng(1).permutation(len(cal))
  cal_p = thresholds.calibration_mask(
      [res["name"][i] for i in perm], res["label"][perm], res["is_anomaly"][perm]
  )
  np.testing.assert_array_equal(cal_p, cal[perm])
  for k in (0, 1):
    for a in (0, 1):
      g = (res["label"] == k) & (res["is_anomaly"] == a)
      assert cal[g].sum() == math.ceil(g.sum() / 2)
  d = threshold_fit.fit(res, ["a", "b"])
  n = d["normalisation"]
  z = thresholds.normalise(res["scores"], res["cls"], n["loc"], n["scale"])
  for k in (0, 1):
    normal = cal & (res["cls"] == k) & (res["is_anomaly"] == 0)
    assert abs(np.median(z[normal])) < 1e-6  # the invariant: median 0 ...
    assert abs(np.quantile(z[normal], 0.99) - 1) < 1e-5  # ... and 99th percentile 1
    assert n["scale_source"][k] == "class"
  # The classes' score levels differ by 5, yet one normalised threshold separates both.
  assert d["rules"]["image"] == "f1_calibration" and d["calibration_f1"]["image"] == 1.0
  assert d["report"]["image"]["f1"] == 1.0 and d["report"]["pixel"]["f1"] == 1.0
  # Fallbacks with a single normal image per class: pooled spread, median still 0.
  loc, scale, info = thresholds.normalisation([1.0, 3.0], [0, 1], 3)
  assert list(loc[:2]) == [1.0, 3.0] and info["loc_source"][2] == "median_of_classes"
  assert info["scale_source"] == ["pooled"] * 3 and scale[0] > 0


def test_overrides_replace_one_threshold(tiny_run):
  run = types.SimpleNamespace(class_names=["chip", "fabric", "gear", "granite"])
  stored = scoring.load_thresholds(run, str(tiny_run["workdir"]))
  over = scoring.load_thresholds(run, str(tiny_run["workdir"]), image_threshold=0.25)
  assert over.image_threshold == 0.25 and over.pixel_threshold == stored.pixel_threshold
  assert over.source == "file+override" and stored.source == "file"
  np.testing.assert_array_equal(over.loc, stored.loc)


# ----------------------------------------------------------------------------- a trained run


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_training_writes_thresholds_from_the_calibration_part(tiny_run):
  d = thresholds.load_dict(os.path.join(tiny_run["workdir"], "thresholds.json"))
  names = d["class_names"]
  rows = _csv(os.path.join(tiny_run["workdir"], "results", "scores_final.csv"))
  score = np.array([float(r["score"]) for r in rows])
  cls = np.array([names.index(r["matched_class"]) for r in rows])
  label = np.array([names.index(r["class"]) for r in rows])
  anomalous = np.array([int(r["is_anomaly"]) for r in rows])
  cal = thresholds.calibration_mask([r["name"] for r in rows], label, anomalous)
  assert d["split"]["calibration_images"] == cal.sum() == 12
  assert d["split"]["report_images"] == 8
  z = thresholds.normalise(score, cls, d["normalisation"]["loc"], d["normalisation"]["scale"])
  for k in range(len(names)):
    normal = cal & (cls == k) & (anomalous == 0)
    assert abs(np.median(z[normal])) < 1e-4  # scores_final.csv holds 6 decimals
  thr, _ = threshold_fit.f1_optimal_threshold(z[cal], anomalous[cal].astype(bool))
  assert abs(thr - d["image_threshold"]) < 1e-3
  assert d["rules"]["image"] == "f1_calibration" and d["rules"]["pixel"] == "f1_calibration"
  assert {"image", "pixel", "per_class"} <= set(d["report"])
  assert d["report"]["image"]["tp"] + d["report"]["image"]["fn"] == 4  # 1 of 3 defects / class
  # The whole-test-set metrics are written as before.
  assert os.path.exists(os.path.join(tiny_run["workdir"], "results", "metrics_final.json"))


def test_predict_command_matches_evaluation_and_skips_bad_files(tiny_run, tmp_path):
  workdir, data = str(tiny_run["workdir"]), str(tiny_run["data_root"])
  bad = tmp_path / "incoming"
  bad.mkdir()
  good_png = os.path.join(data, "chip", "test", "good", "000.png")
  (bad / "truncated.png").write_bytes(open(good_png, "rb").read()[:300])
  (bad / "notes.png").write_text("this is not an image\n")
  out = tmp_path / "pred"
  classes = ["chip", "fabric", "gear", "granite"]
  log = run_module(
      "cras_jax.predict",
      f"--workdir={workdir}",
      f"--output_dir={out}",
      "--pixel_threshold=0.5",
      "--save_maps",
      "--batch_size=8",
      *[os.path.join(data, c, "test") for c in classes],
      str(bad),
  )
  assert "truncated.png" in log and "notes.png" in log and "scored 20 of 22 images" in log

  rows = _csv(out / "results.csv")
  good = {os.path.relpath(r["path"], data).replace(os.sep, "/"): r for r in rows if not r["error"]}
  errors = {os.path.basename(r["path"]): r["error"] for r in rows if r["error"]}
  assert set(errors) == {"truncated.png", "notes.png"}
  assert all(name in msg for name, msg in errors.items())
  # Same scores and classes as the evaluation path (names relative to the data root).
  ev = {r["name"]: r for r in _csv(os.path.join(workdir, "results", "scores_final.csv"))}
  assert set(good) == set(ev)
  for n, r in ev.items():
    p = good[n]
    assert abs(float(p["score"]) - float(r["score"])) < 1e-5, n
    assert p["matched_class"] == r["matched_class"]

  # Stored image threshold, overridden pixel threshold, per-class normalisation.
  d = thresholds.load_dict(os.path.join(workdir, "thresholds.json"))
  summary = json.loads((out / "results.json").read_text())
  assert summary["thresholds"]["image"] == pytest.approx(d["image_threshold"])
  assert summary["thresholds"]["pixel"] == 0.5
  assert summary["thresholds"]["source"] == "file+override"
  assert summary["scored"] == 20 and len(summary["errors"]) == 2
  loc, scale = d["normalisation"]["loc"], d["normalisation"]["scale"]
  maps = np.load(out / "maps.npz")
  for r in good.values():
    k = classes.index(r["matched_class"])
    z = (float(r["score"]) - loc[k]) / scale[k]
    assert abs(float(r["normalised_score"]) - z) < 1e-3
    if abs(float(r["normalised_score"]) - d["image_threshold"]) >= 1e-5:  # 6 decimals in CSV
      assert int(r["anomalous"]) == int(float(r["normalised_score"]) >= d["image_threshold"])
    # the decision is `anomalous`; `is_anomaly` is the ground truth of the scores_*.csv files
    assert "is_anomaly" not in r and "is_anomaly" in next(iter(ev.values()))
  by_name = {r["name"]: r for r in good.values()}
  zmaps = thresholds.normalise_maps(maps["maps"], maps["cls"], loc, scale)
  for i, name in enumerate(maps["names"]):
    r = by_name[str(name)]
    mask = np.asarray(Image.open(out / r["mask"])) > 0
    expect = zmaps[i] >= 0.5
    assert np.mean(mask != expect) < 1e-3, name
    overlay = Image.open(out / r["overlay"])
    assert overlay.size == (64, 64) and overlay.mode == "RGB"


def test_predict_exits_nonzero_when_nothing_can_be_scored(tiny_run, tmp_path):
  missing = tmp_path / "nowhere.png"
  out = subprocess.run(
      [sys.executable, "-m", "cras_jax.predict", f"--workdir={tiny_run['workdir']}", str(missing)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 1
  assert "nowhere.png" in out.stderr and "nothing to score" in out.stderr


def test_calibrate_an_existing_run_reproduces_the_training_thresholds(tiny_run, tmp_path):
  """`--calibrate` on a copy of the run (as an older run without thresholds.json)."""
  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  copy = tmp_path / "old_run"
  copy.mkdir()
  d = predicting.calibrate_run(run, str(copy))
  assert os.path.exists(copy / "thresholds.json")
  ref = thresholds.load_dict(os.path.join(tiny_run["workdir"], "thresholds.json"))
  for key in ("image_threshold", "pixel_threshold"):
    assert d[key] == pytest.approx(ref[key], abs=1e-5)
  np.testing.assert_allclose(d["normalisation"]["loc"], ref["normalisation"]["loc"], atol=1e-6)
  np.testing.assert_allclose(d["normalisation"]["scale"], ref["normalisation"]["scale"], atol=1e-6)
