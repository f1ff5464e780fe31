"""Tests for the synthetic multi-class anomaly dataset generator."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cras_jax.data import synthetic as S
from cras_jax.data.synthetic import cli, writing
from tests.conftest import run_command

SMALL = dict(image_size=160, n_train=4, n_test_good=4, n_test_defect_per_type=3)
TINY = dict(image_size=96, n_train=2, n_test_good=1, n_test_defect_per_type=1)


def _files(root):
  out = []
  for d, _, fs in os.walk(root):
    for f in fs:
      out.append(os.path.relpath(os.path.join(d, f), root))
  return sorted(out)


def _load(path):
  return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic") / "ds"
  classes = S.generate(str(root), seed=0, **SMALL)
  return str(root), classes


def test_classes_and_split_sizes(small):
  root, classes = small
  assert classes == sorted(classes) == list(S.CLASSES)
  assert len(classes) >= 4
  assert len(S.TEXTURE_CLASSES) >= 2 and len(S.OBJECT_CLASSES) >= 2
  assert set(S.TEXTURE_CLASSES) | set(S.OBJECT_CLASSES) == set(classes)
  assert sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) == classes
  for cls in classes:
    defects = S.DEFECT_TYPES[cls]
    assert 2 <= len(defects) <= 3
    assert len(os.listdir(os.path.join(root, cls, "train", "good"))) == SMALL["n_train"]
    assert sorted(os.listdir(os.path.join(root, cls, "test"))) == sorted(("good",) + defects)
    assert len(os.listdir(os.path.join(root, cls, "test", "good"))) == SMALL["n_test_good"]
    for d in defects:
      assert len(os.listdir(os.path.join(root, cls, "test", d))) == SMALL["n_test_defect_per_type"]
    assert sorted(os.listdir(os.path.join(root, cls, "ground_truth"))) == sorted(defects)
  manifest = json.load(open(os.path.join(root, S.MANIFEST_NAME)))
  assert manifest["version"] == S.GENERATOR_VERSION
  assert manifest["params"] == dict(seed=0, **SMALL)


def test_layout_images_and_masks(small):
  root, classes = small
  size = SMALL["image_size"]
  for cls in classes:
    for split in ("train", "test"):
      for f in os.listdir(os.path.join(root, cls, split, "good")):
        im = Image.open(os.path.join(root, cls, split, "good", f))
        assert im.mode == "RGB" and im.size == (size, size)
        # good images have no masks
        assert not os.path.exists(os.path.join(root, cls, "ground_truth", "good"))
    for d in S.DEFECT_TYPES[cls]:
      for f in sorted(os.listdir(os.path.join(root, cls, "test", d))):
        assert f.endswith(".png")
        im = Image.open(os.path.join(root, cls, "test", d, f))
        assert im.mode == "RGB" and im.size == (size, size)
        mpath = os.path.join(root, cls, "ground_truth", d, f[:-4] + "_mask.png")
        m = Image.open(mpath)
        assert m.mode == "L" and m.size == im.size
        m = np.asarray(m)
        assert m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 255}
        frac = (m > 0).mean()
        assert 0.002 <= frac <= 0.08, (cls, d, f, frac)
        # thick enough to be localised at feature stride 8: survives a 2-px erosion
        assert ndimage.binary_erosion(m > 0, iterations=2).any(), (cls, d, f)
      masks = sorted(os.listdir(os.path.join(root, cls, "ground_truth", d)))
      images = os.listdir(os.path.join(root, cls, "test", d))
      assert masks == sorted(f[:-4] + "_mask.png" for f in images)


def test_single_image_reproducible_on_its_own(small):
  root, classes = small
  for cls in classes:
    img, mask = S.render(cls, 0, "train", 3, None, SMALL["image_size"])
    assert mask is None
    assert np.array_equal(img, _load(os.path.join(root, cls, "train", "good", "003.png")))
    d = S.DEFECT_TYPES[cls][-1]
    img, mask = S.render(cls, 0, "test", 2, d, SMALL["image_size"])
    assert np.array_equal(img, _load(os.path.join(root, cls, "test", d, "002.png")))
    m = _load(os.path.join(root, cls, "ground_truth", d, "002_mask.png"))
    assert np.array_equal(mask, m > 0)


def test_idempotent_no_rewrite(small):
  root, classes = small
  before = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in _files(root)}
  parent = os.path.dirname(root)
  siblings = sorted(os.listdir(parent))
  assert S.generate(root, seed=0, **SMALL) == classes
  after = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in _files(root)}
  assert before == after
  assert sorted(os.listdir(parent)) == siblings  # no temporary dirs left behind


def test_regenerates_cleanly_on_change(tmp_path):
  root = str(tmp_path / "ds")
  S.generate(root, seed=0, **dict(TINY, n_train=3))
  assert os.path.exists(os.path.join(root, "gear", "train", "good", "002.png"))
  S.generate(root, seed=0, **TINY)
  assert not os.path.exists(os.path.join(root, "gear", "train", "good", "002.png"))
  manifest = json.load(open(os.path.join(root, S.MANIFEST_NAME)))
  assert manifest["params"]["n_train"] == TINY["n_train"]
  assert sorted(os.listdir(tmp_path)) == ["ds"]
  # a deleted file makes the tree incomplete: it is regenerated
  os.remove(os.path.join(root, "chip", "test", "good", "000.png"))
  S.generate(root, seed=0, **TINY)
  assert os.path.exists(os.path.join(root, "chip", "test", "good", "000.png"))


def _read(root, f):
  with open(os.path.join(root, f), "rb") as x:
    return x.read()


def test_determinism(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  S.generate(a, seed=0, **TINY)
  S.generate(b, seed=0, **TINY)
  S.generate(c, seed=1, **TINY)
  fa, fb, fc = _files(a), _files(b), _files(c)
  assert fa == fb and len(fa) > 0
  for f in fa:
    with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
      assert x.read() == y.read(), f
  pngs = [f for f in fa if f.endswith(".png") and "ground_truth" not in f]
  assert all(Image.open(os.path.join(a, f)).size == (96, 96) for f in pngs)
  # Another seed gives other images.
  same = [f for f in pngs if f in fc and _read(a, f) == _read(c, f)]
  assert len(same) < len(pngs) // 10, same[:5]
  differ = [
      f for f in pngs if not np.array_equal(_load(os.path.join(a, f)), _load(os.path.join(c, f)))
  ]
  assert differ == pngs  # every image changes with the seed


def test_interrupted_generation_leaves_nothing_complete(tmp_path, monkeypatch):
  root = str(tmp_path / "ds")
  calls = {"n": 0}
  real_save = writing._save_png

  def flaky_save(path, arr):
    calls["n"] += 1
    if calls["n"] > 5:
      raise KeyboardInterrupt("simulated interruption")
    real_save(path, arr)

  monkeypatch.setattr(writing, "_save_png", flaky_save)
  with pytest.raises(KeyboardInterrupt):
    S.generate(root, seed=0, **TINY)
  assert not os.path.exists(os.path.join(root, S.MANIFEST_NAME))
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(writing, "_save_png", real_save)
  assert S.generate(root, seed=0, **TINY) == list(S.CLASSES)
  assert os.path.exists(os.path.join(root, S.MANIFEST_NAME))


def test_refuses_to_replace_foreign_directory(tmp_path):
  root = tmp_path / "mine"
  root.mkdir()
  (root / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError):
    S.generate(str(root), seed=0, **TINY)
  assert (root / "precious.txt").read_text() == "keep me"


def test_cli(tmp_path, capsys):
  root = tmp_path / "cli"
  sheet = tmp_path / "sheet.png"
  rc = run_command(
      cli,
      f"--root={root}",
      "--seed=3",
      "--image_size=64",
      "--n_train=1",
      "--n_test_good=1",
      "--n_test_defect_per_type=1",
      f"--contact_sheet={sheet}",
  )
  assert rc == 0
  manifest = json.load(open(root / S.MANIFEST_NAME))
  assert manifest["params"]["seed"] == 3 and manifest["params"]["image_size"] == 64
  assert Image.open(sheet).size[0] > 64


def _colour_threshold_aurocs(root, cls):
  """Pixel AUROC of single colour channels / grey / distance to the mean train colour."""
  train_dir = os.path.join(root, cls, "train", "good")
  train = np.concatenate(
      [_load(os.path.join(train_dir, f)).reshape(-1, 3) for f in sorted(os.listdir(train_dir))]
  )
  mean = train.astype(np.float64).mean(0)
  xs, ys = [], []
  for d in ("good",) + S.DEFECT_TYPES[cls]:
    dd = os.path.join(root, cls, "test", d)
    for f in sorted(os.listdir(dd)):
      im = _load(os.path.join(dd, f)).reshape(-1, 3).astype(np.float64)
      if d == "good":
        m = np.zeros(len(im), bool)
      else:
        m = _load(os.path.join(root, cls, "ground_truth", d, f[:-4] + "_mask.png")).reshape(-1) > 0
      xs.append(im)
      ys.append(m)
  x, y = np.concatenate(xs), np.concatenate(ys)
  feats = {
      "R": x[:, 0],
      "G": x[:, 1],
      "B": x[:, 2],
      "grey": x.mean(1),
      "dist_to_mean": np.linalg.norm(x - mean, axis=1),
  }
  out = {}
  for k, v in feats.items():
    auc = roc_auc_score(y, v)
    out[k] = auc
    out["-" + k] = 1.0 - auc  # the other sign
  return out


def test_per_pixel_colour_threshold_does_not_solve_localisation(small):
  root, classes = small
  report = {}
  for cls in classes:
    aucs = _colour_threshold_aurocs(root, cls)
    best = max(aucs, key=aucs.get)
    report[cls] = (best, round(aucs[best], 3))
  print("best colour-threshold pixel AUROC per class:", report)
  for cls, (feat, auc) in report.items():
    assert auc < 0.75, (cls, feat, auc, report)
