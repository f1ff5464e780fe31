"""MVTec AD 2's scoring (cras_jax/scoring/submission.py, metrics.seg_f1): SegF1 against
scikit-learn and a hand count, the validation threshold rule against NumPy, the inverse of the
preprocessing, and the server-format folder read back, written atomically and refused with one
message where --out cannot be written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import f1_score

from cras_jax.base import errors, registry
from cras_jax.data import layout, preprocess
from cras_jax.data.synthetic import mvtec_ad2 as synthetic_ad2
from cras_jax.deploy import run_onnx
from cras_jax.method import metrics
from cras_jax.scoring import ad2_evaluation, submission, submission_format, thresholds
from tests.conftest import ROOT, run_command, run_module

# ----------------------------------------------------------------------------- SegF1


def test_seg_f1_counts_every_pixel_of_every_image_together():
  masks = np.zeros((2, 2, 3), bool)
  masks[0, 0, :2] = True  # image 0: two defect pixels
  maps = np.zeros((2, 2, 3))
  maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # image 0: one hit, one false alarm
  maps[1, 1, 2] = 1.0  # image 1 (normal): one false alarm
  # pooled: TP 1, FP 2, FN 1 -> 2 / (2 + 2 + 1)
  assert metrics.seg_f1(masks, maps, 0.5) == pytest.approx(0.4)
  # the per-image mean would be (2/4 + 0) / 2 = 0.25: SegF1 is not that
  assert metrics.seg_f1(masks[0], maps[0], 0.5) == pytest.approx(0.5)
  assert metrics.seg_f1(masks, maps, 1.0) == pytest.approx(0.4)  # >= threshold flags
  assert metrics.seg_f1(masks, maps, 1.5) == 0.0  # defects, nothing flagged
  assert np.isnan(metrics.seg_f1(masks[1], maps[1], 1.5))  # no defect, nothing flagged
  assert np.isnan(metrics.seg_f1(masks, maps, float("nan")))


@pytest.mark.parametrize("seed", range(4))
def test_seg_f1_equals_scikit_learn_on_the_flattened_pixels(seed):
  rng = np.random.default_rng(seed)
  masks = rng.random((5, 12, 9)) < 0.1
  maps = rng.normal(size=masks.shape) + 1.5 * masks
  thr = float(rng.normal(1.0, 0.3))
  want = f1_score(masks.ravel(), (maps >= thr).ravel())
  assert metrics.seg_f1(masks.astype(np.uint8) * 255, maps, thr) == pytest.approx(want)


# ----------------------------------------------------------------------------- thresholds


def _validation_res(rng, n_per_class=(5, 4), size=8):
  cls = np.repeat(np.arange(len(n_per_class)), n_per_class)
  scores = rng.normal(1.0 + cls, 0.2 + 0.1 * cls).astype(np.float32)
  maps = rng.normal(scores[:, None, None] - 0.5, 0.3, (len(cls), size, size)).astype(np.float32)
  maps[[0, -1], 0, :3] += 3.0  # a few bright pixels in each class: above mean + 3 std
  return {"scores": scores, "maps": maps, "cls": cls}


def test_validation_thresholds_are_mean_plus_3_std_of_each_class_validation_pixels():
  rng = np.random.default_rng(0)
  res = _validation_res(rng)
  d = ad2_evaluation.fit_validation(res, ["a", "b", "c"])  # "c": no validation image
  maps, cls = res["maps"].astype(np.float64), res["cls"]
  mean = np.array([maps[cls == k].mean() for k in (0, 1)])
  std = np.array([maps[cls == k].std() for k in (0, 1)])
  np.testing.assert_allclose(d["normalisation"]["loc"][:2], mean, rtol=1e-6)
  np.testing.assert_allclose(d["normalisation"]["scale"][:2], std, rtol=1e-6)
  assert d["normalisation"]["scale_source"] == ["class", "class", "median_of_classes"]
  # pixels: flagged exactly where above their own class's mean + 3 std (MVTec's rule)
  zmaps = (res["maps"] - mean[cls][:, None, None]) / std[cls][:, None, None]
  want = res["maps"] >= (mean + 3 * std)[cls][:, None, None]
  assert want.any() and not want.all()
  np.testing.assert_array_equal(zmaps >= d["pixel_threshold"], want)
  assert d["validation"]["pixel"]["flagged_fraction"] == pytest.approx(want.mean())
  # images: the same rule on the normalised scores, pooled
  z = ((res["scores"] - mean[cls]) / std[cls]).astype(np.float64)
  stat = z.mean() + 3 * z.std()
  assert d["validation"]["image"]["statistic"] == pytest.approx(stat, rel=1e-5)
  np.testing.assert_array_equal(z >= d["image_threshold"], z >= stat)
  assert ad2_evaluation.is_validation_fit(d) and d["split"]["validation_images"] == 9
  # thresholds.json's format: scoring reads it as any other
  assert thresholds.problems(d, ["a", "b", "c"]) == []
  assert thresholds.Thresholds.from_dict(d).pixel_threshold == d["pixel_threshold"]


def test_segf1_columns_per_class_at_the_fixed_thresholds():
  rng = np.random.default_rng(1)
  n, size = 8, 6
  label = np.repeat([0, 1], 4)
  is_anomaly = np.tile([0, 0, 1, 1], 2)
  mask = np.zeros((n, size, size), np.uint8)
  mask[is_anomaly == 1, 1:3, 2:4] = 1
  maps = rng.normal(0.0, 1.0, (n, size, size)).astype(np.float32) + 2.0 * mask
  res = {
      "scores": maps.max(axis=(1, 2)),
      "maps": maps,
      "cls": label,
      "label": label,
      "is_anomaly": is_anomaly,
      "mask": mask,
  }
  thr = thresholds.Thresholds(["a", "b"], np.zeros(2), np.ones(2), 2.5, 1.2)
  cols = ad2_evaluation.segf1_columns(res, ["a", "b"], thr)
  for k, name in enumerate(("a", "b")):
    sel = label == k
    want = f1_score(mask[sel].ravel(), (maps[sel] >= 1.2).ravel())
    assert cols[name]["seg_f1"] == pytest.approx(want)
    want_i = f1_score(is_anomaly[sel], res["scores"][sel] >= 2.5, zero_division=np.nan)
    np.testing.assert_allclose(cols[name]["i_f1"], want_i)
  table = ad2_evaluation.with_columns(metrics.summarise({"a": {"i_auroc": 1.0}}), cols)
  assert table["mean"]["seg_f1"] == pytest.approx(np.nanmean([c["seg_f1"] for c in cols.values()]))


def test_a_batch_matching_scorer_gets_one_per_image_copy_holding_its_current_state():
  class Scorer:
    made = 0

    def __init__(self, per_image_matching):
      self.per_image_matching, self.svars, self.model_step = per_image_matching, "v0", 0

    def per_image(self):
      if self.per_image_matching:
        return self
      Scorer.made += 1
      return Scorer(True)

  same = Scorer(True)
  assert ad2_evaluation._per_image(same) is same
  batch = Scorer(False)
  first = ad2_evaluation._per_image(batch)
  batch.svars, batch.model_step = "v1", 10  # the next epoch's state (Scorer.set_state)
  second = ad2_evaluation._per_image(batch)
  assert second is first and Scorer.made == 1  # compiled once
  assert (second.svars, second.model_step) == ("v1", 10)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "hw,resize,crop",
    [((40, 50), 36, 32), ((50, 40), 36, 32), ((45, 80), 45, 45), ((30, 30), 30, 36)],
)
def test_to_original_inverts_the_resize_and_centre_crop(hw, resize, crop):
  h, w = hw
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  original = 0.5 * yy + 0.25 * xx + 1.0  # linear: bilinear resizing keeps it so inside
  rh, rw = preprocess.resized_size(h, w, resize)
  resized = np.asarray(Image.fromarray(original, mode="F").resize((rw, rh), Image.BILINEAR))
  crop_map = preprocess._center_crop(resized, crop)  # the images' geometry (zero padding)
  back, inside = submission_format.to_original(crop_map, h, w, resize, crop)
  assert back.shape == inside.shape == (h, w) and back.dtype == np.float32
  rows, cols = submission_format.window(h, w, resize, crop)
  assert (rows.resized, cols.resized) == (rh, rw)
  # the window: exactly the original pixels whose centres fall within the crop
  for axis, n, keep in ((rows, h, inside.any(axis=1)), (cols, w, inside.any(axis=0))):
    centre = (np.arange(n) + 0.5) * axis.resized / n - 0.5 - axis.offset
    np.testing.assert_array_equal(keep, (centre >= -0.5) & (centre <= crop - 0.5))
  assert inside.sum() == inside.any(axis=1).sum() * inside.any(axis=0).sum()
  if (rh, rw) == (h, w):  # no resize: the crop's pixels go back exactly where they were
    np.testing.assert_array_equal(back[inside], original[inside])
  else:  # away from the crop's border, where resizing bends a ramp: the original
    ys, xs = np.flatnonzero(inside.any(axis=1))[2:-2], np.flatnonzero(inside.any(axis=0))[2:-2]
    np.testing.assert_allclose(back[np.ix_(ys, xs)], original[np.ix_(ys, xs)], rtol=0.02)
  # outside: never seen, the map's lowest value
  assert (back[~inside] == crop_map.min()).all()


def test_to_original_of_an_unresized_uncropped_map_is_the_map():
  m = np.random.default_rng(2).random((16, 16)).astype(np.float32)
  back, inside = submission_format.to_original(m, 16, 16, 16, 16)
  np.testing.assert_array_equal(back, m)
  assert inside.all()


# ----------------------------------------------------------------------------- the folder


class FakeScorer:
  """Scores like `scoring.Scorer` (uint8 crops -> scores, maps, cls), without a model: the
  map is the crop's green channel / 255, the score its maximum, the class 0."""

  batch_size = 3

  def __call__(self, images):
    maps = np.asarray(images)[..., 1].astype(np.float32) / 255.0
    return {"scores": maps.max(axis=(1, 2)), "maps": maps, "cls": np.zeros(len(maps), int)}


@pytest.fixture(scope="module")
def private_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("ad2") / "mvtec_ad2"
  synthetic_ad2.generate(root, ("can", "rice"), height=16, n_train=1, n_validation=1, n_private=4)
  return root


THR = thresholds.Thresholds(["can", "rice"], np.zeros(2), np.ones(2), 0.5, 0.55)


def _items(root):
  return submission_format.private_items(
      os.fspath(root), ["can", "rice"], submission_format.PRIVATE_SPLITS
  )


def test_the_submission_folder_is_the_checkers_and_reads_back_at_original_size(
    private_root, tmp_path
):
  items = _items(private_root)
  out = tmp_path / "submission"
  rec = submission.submit(FakeScorer(), THR, items, os.fspath(out), 20, 16, record={"x": 1})
  assert sorted(os.listdir(out)) == ["anomaly_images", "anomaly_images_thresholded"]
  assert sorted(os.listdir(tmp_path)) == ["submission", "submission.json"]  # no temporaries
  assert rec["images"] == {c: {"test_private": 4, "test_private_mixed": 4} for c in ("can", "rice")}
  assert not rec["complete_for_the_server"] and rec["x"] == 1
  expected = {}
  for it in items:
    expected.setdefault(it.cls, {}).setdefault(it.split, []).append(it.stem)
    raw = preprocess.read_image(it.path)
    tiff = tifffile.imread(out / "anomaly_images" / it.cls / it.split / f"{it.stem}.tiff")
    png = np.asarray(
        Image.open(out / "anomaly_images_thresholded" / it.cls / it.split / f"{it.stem}.png")
    )
    # MVTec's checker: single-channel float16 maps, single-channel {0, 255} masks
    assert tiff.dtype == np.float16 and tiff.shape == raw.shape[:2] == (16, 20)
    assert png.dtype == np.uint8 and png.shape == raw.shape[:2]
    assert set(np.unique(png)) <= {0, 255}
    crop_map = FakeScorer()(preprocess.resize_and_crop_image(raw, 20, 16)[None])["maps"][0]
    full, inside = submission_format.to_original(crop_map, *raw.shape[:2], 20, 16)
    np.testing.assert_allclose(tiff.astype(np.float32), full, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(png == 255, (full >= 0.55) & inside)
    assert it.stem.endswith("_regular" if it.split == "test_private" else "_mixed")
  assert submission_format.structure_problems(os.fspath(out), expected) == []
  assert any(rec["per_image"][k]["flagged"] > 0 for k in rec["per_image"])


def test_an_existing_folder_is_kept_unless_overwrite_and_a_failure_leaves_nothing(
    private_root, tmp_path
):
  items = _items(private_root)[:2]
  out = tmp_path / "sub"
  out.mkdir()
  (out / "old.txt").write_text("x")
  with pytest.raises(errors.UserValueError, match="exists and is not empty.*--overwrite"):
    submission.submit(FakeScorer(), THR, items, os.fspath(out), 20, 16)

  class Failing(FakeScorer):

    def __call__(self, images):
      raise RuntimeError("scoring failed")

  with pytest.raises(RuntimeError, match="scoring failed"):
    submission.submit(Failing(), THR, items, os.fspath(out), 20, 16, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["sub"] and os.listdir(out) == ["old.txt"]
  submission.submit(FakeScorer(), THR, items, os.fspath(out), 20, 16, overwrite=True)
  assert sorted(os.listdir(out)) == ["anomaly_images", "anomaly_images_thresholded"]
  assert sorted(os.listdir(tmp_path)) == ["sub", "sub.json"]


def test_an_unwritable_out_is_refused_before_anything_is_scored(private_root, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(errors.UserValueError) as e:
    run_command(submission, "--workdir=/no/such/run", f"--out={blocker / 'sub'}")
  assert os.fspath(blocker) in str(e.value) and "give --out in a folder you can write to" in str(
      e.value
  )
  with pytest.raises(errors.UserValueError, match="is a file: give a folder"):
    run_command(submission, "--workdir=/no/such/run", f"--out={blocker}")
  if os.geteuid() != 0:  # root writes into read-only folders
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
      with pytest.raises(errors.UserValueError, match="not writable"):
        submission.submit(FakeScorer(), THR, _items(private_root), os.fspath(ro / "s"), 20, 16)
    finally:
      ro.chmod(0o700)


def test_a_run_not_trained_on_mvtec_ad2_is_refused_naming_its_dataset(tiny_run, tmp_path):
  with pytest.raises(errors.UserValueError, match="data.name='synthetic'.*configs/mvtec_ad2.py"):
    run_command(submission, f"--workdir={tiny_run['workdir']}", f"--out={tmp_path / 'sub'}")
  assert os.listdir(tmp_path) == []  # nothing written


def test_missing_private_folders_and_masks_in_them_are_named(private_root, tmp_path):
  root = tmp_path / "copy"
  shutil.copytree(private_root, root)
  shutil.rmtree(root / "rice" / "test_private_mixed")
  (root / "can" / "test_private" / "003_regular_mask.png").write_bytes(b"")
  with pytest.raises(layout.DatasetError) as e:
    _items(root)
  text = str(e.value)
  assert os.fspath(root / "rice" / "test_private_mixed") in text and "is missing" in text
  assert "003_regular_mask.png" in text and "move or delete them" in text
  with pytest.raises(layout.DatasetError, match="give --data_root"):
    _items(tmp_path / "nowhere")


@pytest.mark.slow
def test_the_command_exits_2_naming_an_unwritable_out(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  out = subprocess.run(
      [sys.executable, "-m", "cras_jax.submission", "--workdir=x", f"--out={blocker}/sub"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2 and os.fspath(blocker) in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_train_on_synthetic_mvtec_ad2_then_submit(tmp_path):
  """The whole path: configs/mvtec_ad2.py on the synthetic AD 2 folder (thresholds from its
  validation split, SegF1 in the results), then the submission of its private sets."""
  data = tmp_path / "ad2"
  run_module(
      "cras_jax.synthetic",
      f"--root={data}",
      "--layout=mvtec_ad2",
      "--image_size=48",
      "--n_train=4",
      "--n_validation=2",
      "--n_test_good=1",
      "--n_test_defect_per_type=1",
      "--n_private=2",
  )
  workdir = tmp_path / "run"
  out = run_module(
      "cras_jax.main",
      "--config=configs/mvtec_ad2.py",
      f"--config.data.root={data}",
      f"--workdir={workdir}",
      "--config.model.backbone=efficientnet_lite0",
      "--config.model.weights=",
      "--config.data.resize=55",
      "--config.data.crop=48",
      "--config.model.pre_embed_dim=48",
      "--config.model.embed_dim=32",
      "--config.train.batch_size=8",
      "--config.eval.batch_size=8",
      "--config.train.epochs=1",
      "--config.eval.num_heatmaps=0",
  )
  assert "SegF1" in out and "mean + 3 std of 16 validation images" in out
  d = thresholds.load_dict(os.path.join(workdir, "thresholds.json"))
  assert ad2_evaluation.is_validation_fit(d)
  sub = tmp_path / "submission"
  out = run_module("cras_jax.submission", f"--workdir={workdir}", f"--out={sub}")
  assert "wrote 32 maps and masks" in out
  assert sorted(os.listdir(sub / "anomaly_images")) == list(registry.MVTEC_AD2_CLASSES)
  # A compressed export of it re-fits its thresholds by MVTec AD 2's own rule, on the float16
  # graph's scores of the validation split (all normal): its decisions there are float32's.
  onnx_file = tmp_path / "ad2_fp16.onnx"
  run_module(
      "cras_jax.export",
      f"--workdir={workdir}",
      "--format=onnx",
      "--precision=fp16",
      f"--output={onnx_file}",
  )
  meta = run_onnx.load(str(onnx_file))["meta"]
  refit = meta["compression"]["thresholds"]
  assert refit["choice"] == "re-fitted" and refit["rule"].startswith("MVTec AD 2's validation")
  assert meta["thresholds"]["source"].startswith("file, re-fitted on the fp16 graph")
  at_run, at_refit = (
      refit["threshold_images"][k] for k in ("at_run_thresholds", "at_refit_thresholds")
  )
  assert at_refit["flips"] <= at_run["flips"]
  assert refit["refit"]["image"] == pytest.approx(refit["run"]["image"], rel=0.05)
