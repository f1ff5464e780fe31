"""Dataset validation (cras_jax.data.validate), other layouts (BTAD, VisA conversion), registry."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cras_jax.data import datasets, layout, mvtec, preprocess, validate
from cras_jax.data.layout import DatasetError
from tests.conftest import run_command
from tests.data.test_mvtec import _rand_rgb, make_dataset
from tools import convert_visa

RESIZE, CROP = 36, 32


def _load(root, cache, classes=None, **kw):
  return mvtec.load_dataset(root, classes, RESIZE, CROP, cache, verbose=False, **kw)


def _fails(root, cache, classes=None, **kw) -> str:
  with pytest.raises(DatasetError) as ei:
    _load(root, cache, classes, **kw)
  assert "Expected layout" in str(ei.value)
  assert not Path(cache).exists() or not any(Path(cache).iterdir()), "cache written"
  return str(ei.value)


def _mask(h, w, seed=0):
  m = np.zeros((h, w), np.uint8)
  rng = np.random.default_rng(seed)
  y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
  m[y : y + 11, x : x + 11] = 255
  return m


# ------------------------------------------------------------------ single problems


def test_truncated_png_named_and_cache_untouched(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  bad = root / "a" / "train" / "good" / "001.png"
  bad.write_bytes(bad.read_bytes()[:150])
  cache = tmp_path / "cache"
  cache.mkdir()  # an existing, empty cache dir stays empty
  msg = _fails(root, cache)
  assert "1 problem(s)" in msg
  assert "truncated" in msg and "001.png" in msg
  assert list(cache.iterdir()) == []


def test_16bit_tiff_and_rgba_images_load(tmp_path):
  tifffile = pytest.importorskip("tifffile")
  root = make_dataset(tmp_path / "ds", classes=("a",), size=(40, 50))
  rng = np.random.default_rng(1)
  g16 = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
  c16 = rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16)
  tifffile.imwrite(root / "a" / "train" / "good" / "100.tif", g16)
  tifffile.imwrite(root / "a" / "train" / "good" / "101.tiff", c16, photometric="rgb")
  rgba = np.concatenate([_rand_rgb(rng, 40, 50), rng.integers(0, 256, (40, 50, 1), np.uint8)], -1)
  Image.fromarray(rgba).save(root / "a" / "train" / "good" / "102.png")
  Image.fromarray(_rand_rgb(rng, 40, 50)[..., 0]).save(root / "a" / "train" / "good" / "103.jpg")
  ds = _load(root, tmp_path / "cache")
  assert len(ds.train) == 7
  batch = mvtec.get_batch(ds.train, range(len(ds.train)))
  names = batch["name"]
  for fname in ("100.tif", "101.tiff", "102.png", "103.jpg"):
    path = root / "a" / "train" / "good" / fname
    want = preprocess.resize_and_crop_image(preprocess.read_image(path), RESIZE, CROP)
    np.testing.assert_array_equal(batch["image"][names.index(f"a/train/good/{fname}")], want)
  np.testing.assert_array_equal(
      batch["image"][names.index("a/train/good/102.png")],
      preprocess.resize_and_crop_image(rgba[..., :3], RESIZE, CROP),
  )


def test_missing_mask_error_and_image_level_only(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a", "b"))
  (root / "b" / "ground_truth" / "crack" / "001_mask.png").unlink()
  msg = _fails(root, tmp_path / "cache")
  assert "1 problem(s)" in msg
  assert "'b'" in msg and "without a mask" in msg and "001.png" in msg
  assert "allow_image_level_only" in msg

  ds = _load(root, tmp_path / "cache", allow_image_level_only=True)
  names = mvtec.get_batch(ds.test, range(len(ds.test)))["name"]
  has = mvtec.has_mask(ds.test)
  assert mvtec.split_metadata(ds.test)["has_mask"] == has.tolist()
  i = names.index("b/test/crack/001.png")
  assert has[i] == 0 and has.sum() == len(has) - 1
  assert mvtec.get_batch(ds.test, [i])["mask"].sum() == 0
  assert mvtec.get_batch(ds.test, [i])["is_anomaly"][0] == 1
  assert mvtec.has_mask(ds.train).tolist() == [1] * len(ds.train)
  # The prepared cache does not let a strict load through: layout checks always run.
  with pytest.raises(DatasetError, match="without a mask"):
    _load(root, tmp_path / "cache")


def test_prepared_cache_is_not_decoded_again(tmp_path, monkeypatch):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  ds = _load(root, tmp_path / "cache")

  def fail(path, *limits):
    raise AssertionError(f"{path} decoded again")

  monkeypatch.setattr(validate, "image_size", fail)
  assert _load(root, tmp_path / "cache").data_dir == ds.data_dir
  # A changed file changes the cache key: everything is validated (and decoded) again.
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "a" / "train" / "good" / "9.png")
  with pytest.raises(AssertionError, match="decoded again"):
    _load(root, tmp_path / "cache")


def test_size_mismatched_mask_names_both_sizes(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",), size=(40, 50))
  m = root / "a" / "ground_truth" / "crack" / "000_mask.png"
  Image.fromarray(_mask(30, 45)).save(m)
  msg = _fails(root, tmp_path / "cache")
  assert "1 problem(s)" in msg
  assert "000_mask.png is 45x30" in msg and "000.png is 50x40" in msg


def test_empty_class(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  (root / "e" / "train" / "good").mkdir(parents=True)
  (root / "e" / "test" / "good").mkdir(parents=True)
  msg = _fails(root, tmp_path / "cache")
  assert "2 problem(s)" in msg
  assert "class 'e': no training images" in msg and "class 'e': no test images" in msg


def test_mask_without_image(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  Image.fromarray(_mask(40, 50)).save(root / "a" / "ground_truth" / "crack" / "007_mask.png")
  (root / "a" / "ground_truth" / "scratch").mkdir()
  Image.fromarray(_mask(40, 50)).save(root / "a" / "ground_truth" / "scratch" / "000_mask.png")
  msg = _fails(root, tmp_path / "cache")
  assert "2 problem(s)" in msg
  assert "masks without a matching test image" in msg
  assert "007_mask.png" in msg and "scratch" in msg
  with pytest.raises(DatasetError, match="007_mask.png"):  # scan alone reports it too
    layout.scan_mvtec(root)


def test_all_problems_listed_in_one_error(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a", "b", "d"), size=(40, 50))
  (root / "a" / "test" / "good" / "000.png").write_bytes(b"junk")  # unreadable
  Image.fromarray(_mask(20, 20)).save(root / "a" / "ground_truth" / "crack" / "001_mask.png")
  (root / "b" / "ground_truth" / "crack" / "000_mask.png").unlink()  # missing mask
  Image.fromarray(_mask(40, 50)).save(root / "b" / "ground_truth" / "crack" / "009_mask.png")
  for p in (root / "d" / "train" / "good").iterdir():
    p.unlink()
  msg = _fails(root, tmp_path / "cache", ["a", "b", "c", "d"])
  lines = [ln for ln in msg.splitlines() if ln.startswith("  - ")]
  assert "6 problem(s)" in msg and len(lines) == 6, msg
  assert any("'c'" in ln and "is missing" in ln for ln in lines)
  assert any("'d'" in ln and "no training images" in ln for ln in lines)
  assert any("'b'" in ln and "without a mask" in ln and "000.png" in ln for ln in lines)
  assert any("009_mask.png" in ln and "without a matching test image" in ln for ln in lines)
  assert any("unreadable" in ln and "a/test/good/000.png" in ln.replace("\\", "/") for ln in lines)
  assert any("001_mask.png is 20x20" in ln and "is 50x40" in ln for ln in lines)


def test_validate_directly_and_missing_root(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  records = layout.scan_mvtec(root)
  validate.validate(records, root)  # passes: returns None
  msg = _fails(tmp_path / "nowhere", tmp_path / "cache")
  assert "does not exist" in msg


# ------------------------------------------------------------------ other layouts


def _make_btad(root: Path, cls: str, img_ext: str, mask_ext: str, seed=0):
  rng = np.random.default_rng(seed)
  h, w = 48, 40
  for split, kind, n in (("train", "ok", 3), ("test", "ok", 2), ("test", "ko", 2)):
    d = root / cls / split / kind
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(_rand_rgb(rng, h, w)).save(d / f"{i:04d}{img_ext}")
      if kind == "ko":
        g = root / cls / "ground_truth" / "ko"
        g.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_mask(h, w, seed + i)).save(g / f"{i:04d}{mask_ext}")


def test_btad_layout_loads(tmp_path):
  root = tmp_path / "btad"
  _make_btad(root, "01", ".bmp", ".png")
  _make_btad(root, "02", ".png", ".png", seed=1)
  _make_btad(root, "03", ".bmp", ".bmp", seed=2)
  ds = _load(root, tmp_path / "cache", datasets.resolve_classes("btad", ()))
  assert ds.class_names == ["01", "02", "03"]
  assert len(ds.train) == 9 and len(ds.test) == 12
  test = mvtec.get_batch(ds.test, range(len(ds.test)))
  assert test["defect_type"][:4] == ["ko", "ko", "good", "good"]
  assert test["is_anomaly"].tolist() == [1, 1, 0, 0] * 3
  assert test["name"][:3] == ["01/test/ko/0000.bmp", "01/test/ko/0001.bmp", "01/test/ok/0000.bmp"]
  for r, j in zip([r for r in ds.records if r.split == "test"], range(12)):
    if r.is_anomaly:
      assert Path(r.mask_path).parent.name == "ko"
      assert Path(r.mask_path).stem == Path(r.image_path).stem
    image, mask = preprocess.load_example(r.image_path, r.mask_path, RESIZE, CROP)
    np.testing.assert_array_equal(test["image"][j], image)
    np.testing.assert_array_equal(test["mask"][j], mask)
    assert (mask.sum() > 0) == r.is_anomaly
  assert mvtec.get_batch(ds.train, [0])["name"] == ["01/train/ok/0000.bmp"]


def test_visa_conversion_then_load(tmp_path):
  conv = convert_visa
  visa = tmp_path / "VisA"
  rng = np.random.default_rng(5)
  rows = []
  for cls in ("candle", "pcb1"):
    for kind, n in (("Normal", 5), ("Anomaly", 2)):
      d = visa / cls / "Data" / "Images" / kind
      d.mkdir(parents=True)
      for i in range(n):
        name = f"{i:03d}.JPG"
        Image.fromarray(_rand_rgb(rng, 48, 64)).save(d / name, format="JPEG")
        row = {
            "object": cls,
            "split": "train" if kind == "Normal" and i < 3 else "test",
            "label": kind.lower(),
            "image": f"{cls}/Data/Images/{kind}/{name}",
            "mask": "",
        }
        if kind == "Anomaly":
          md = visa / cls / "Data" / "Masks" / "Anomaly"
          md.mkdir(parents=True, exist_ok=True)
          m = np.zeros((48, 64), np.uint8)
          m[10:20, 10:30] = 1 + i  # VisA masks hold small label values
          Image.fromarray(m).save(md / f"{i:03d}.png")
          row["mask"] = f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
        rows.append(row)
  (visa / "split_csv").mkdir()
  with open(visa / "split_csv" / "1cls.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
    wr.writeheader()
    wr.writerows(rows)

  out = tmp_path / "visa_mvtec"
  logs = []
  counts = conv.convert(visa, out, log=logs.append)
  assert counts == {"written": 18, "skipped": 0} and logs[-1].startswith("done")
  assert sorted(p.name for p in (out / "candle" / "train" / "good").iterdir()) == [
      "000.JPG",
      "001.JPG",
      "002.JPG",
  ]
  assert sorted(p.name for p in (out / "pcb1" / "test" / "good").iterdir()) == [
      "003.JPG",
      "004.JPG",
  ]
  mask = np.asarray(Image.open(out / "pcb1" / "ground_truth" / "bad" / "001_mask.png"))
  assert set(np.unique(mask)) == {0, 255} and mask[15, 15] == 255
  assert (out / "pcb1" / "test" / "bad" / "001.JPG").read_bytes() == (
      visa / "pcb1" / "Data" / "Images" / "Anomaly" / "001.JPG"
  ).read_bytes()
  # Idempotent: nothing rewritten.
  assert conv.convert(visa, out, log=logs.append) == {"written": 0, "skipped": 18}
  # Missing sources are all reported before anything is written.
  (visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
  (visa / "pcb1" / "Data" / "Images" / "Normal" / "004.JPG").unlink()
  with pytest.raises(conv.ConversionError) as ei:
    conv.convert(visa, tmp_path / "other", log=logs.append)
  assert "2 problem(s)" in str(ei.value) and "000.png" in str(ei.value)
  assert not (tmp_path / "other").exists()
  with pytest.raises(conv.ConversionError):  # a user error: the command exits 2
    run_command(conv, str(visa), str(tmp_path / "other"))

  ds = _load(out, tmp_path / "cache", datasets.resolve_classes("visa", ["candle", "pcb1"]))
  assert len(ds.train) == 6 and len(ds.test) == 8
  test = mvtec.get_batch(ds.test, range(8))
  assert test["defect_type"] == ["bad", "bad", "good", "good"] * 2
  assert (test["mask"][:2].sum(axis=(1, 2)) > 0).all()


def test_registry_and_configs():
  assert len(datasets.get("mvtec").classes) == 15 and len(datasets.get("visa").classes) == 12
  assert len(datasets.get("mpdd").classes) == 6 and len(datasets.get("itdd").classes) == 4
  assert datasets.get("btad").classes == ("01", "02", "03")
  assert datasets.resolve_classes("folder", ()) is None
  assert datasets.resolve_classes("synthetic", ()) is None
  assert datasets.resolve_classes("mvtec", ["bottle"]) == ["bottle"]
  assert datasets.resolve_classes("btad", ()) == ["01", "02", "03"]
  from cras_jax.configs import btad, folder, itdd, mpdd, visa
  from cras_jax.configs import mvtec as mvtec_cfg

  for mod in (mvtec_cfg, visa, mpdd, itdd, btad):
    cfg = mod.get_config()
    assert tuple(cfg.data.classes) == datasets.get(cfg.data.name).classes
  cfg = folder.get_config()
  assert cfg.data.name == "folder" and tuple(cfg.data.classes) == ()
