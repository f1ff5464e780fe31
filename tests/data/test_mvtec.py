"""Tests for cras_jax.data (preprocessing, MVTec scanning, the TFDS array_record cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cras_jax.data import layout, mvtec, prepared_digest, preprocess
from cras_jax.data.layout import DatasetError
from cras_jax.data.preprocess import ImageReadError

RESIZE, CROP = 36, 32


# ------------------------------------------------------------------ independent reference


def tv_resize_center_crop(pil: Image.Image, resize: int, crop: int) -> Image.Image:
  """torchvision Resize(int) + CenterCrop(int), written out from torchvision's semantics."""
  w, h = pil.size
  if w <= h:
    ow, oh = resize, int(resize * h / w)
  else:
    oh, ow = resize, int(resize * w / h)
  if (ow, oh) != (w, h):
    pil = pil.resize((ow, oh), Image.BILINEAR)
  top = int(round((oh - crop) / 2.0))
  left = int(round((ow - crop) / 2.0))
  return pil.crop((left, top, left + crop, top + crop))


def _rand_rgb(rng, h, w):
  # Smooth-ish content so that resizing is not trivially noise.
  base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
  img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
  noise = rng.integers(-20, 21, (h, w, 3))
  return np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8)


def make_dataset(
    root: Path,
    classes=("a", "b"),
    n_train=3,
    n_good=2,
    n_bad=2,
    size=(40, 50),
    seed=0,
    defect="crack",
):
  """Tiny MVTec-layout dataset. size = (H, W)."""
  rng = np.random.default_rng(seed)
  h, w = size
  for c in classes:
    for split, kind, n in (
        ("train", "good", n_train),
        ("test", "good", n_good),
        ("test", defect, n_bad),
    ):
      d = root / c / split / kind
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(_rand_rgb(rng, h, w)).save(d / f"{i:03d}.png")
        if kind != "good":
          g = root / c / "ground_truth" / kind
          g.mkdir(parents=True, exist_ok=True)
          m = np.zeros((h, w), np.uint8)
          y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
          m[y : y + 9, x : x + 7] = 255
          Image.fromarray(m).save(g / f"{i:03d}_mask.png")
  return root


# ------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("hw", [(40, 50), (50, 40), (37, 91), (64, 64), (100, 33), (45, 36)])
@pytest.mark.parametrize("resize,crop", [(36, 32), (33, 30), (40, 40)])
def test_resize_and_crop_matches_torchvision_semantics(hw, resize, crop):
  rng = np.random.default_rng(hw[0] * 1000 + hw[1])
  img = _rand_rgb(rng, *hw)
  got = preprocess.resize_and_crop_image(img, resize, crop)
  want = np.asarray(tv_resize_center_crop(Image.fromarray(img), resize, crop))
  assert got.dtype == np.uint8 and got.shape == (crop, crop, 3)
  np.testing.assert_array_equal(got, want)


def test_resized_size_and_crop_offsets():
  assert preprocess.resized_size(40, 50, 36) == (36, 45)  # (H, W): W = int(36*50/40)
  assert preprocess.resized_size(50, 40, 36) == (45, 36)
  assert preprocess.resized_size(37, 91, 36) == (36, int(36 * 91 / 37))
  assert preprocess.resized_size(900, 900, 329) == (329, 329)
  # torchvision: int(round(d / 2.0)) with Python's round half to even
  assert preprocess.center_crop_offsets(45, 36, 32) == (6, 2)  # 6.5 -> 6
  assert preprocess.center_crop_offsets(47, 32, 32) == (8, 0)  # 7.5 -> 8
  assert preprocess.center_crop_offsets(329, 329, 288) == (20, 20)  # 20.5 -> 20


def test_paper_geometry_non_square():
  rng = np.random.default_rng(1)
  img = _rand_rgb(rng, 300, 420)
  got = preprocess.resize_and_crop_image(img, 329, 288)
  want = np.asarray(tv_resize_center_crop(Image.fromarray(img), 329, 288))
  np.testing.assert_array_equal(got, want)


def test_crop_larger_than_image_pads_with_zeros():
  img = np.full((10, 10, 3), 200, np.uint8)
  out = preprocess.resize_and_crop_image(img, 10, 14)
  assert out.shape == (14, 14, 3)
  assert (out[:2] == 0).all() and (out[-2:] == 0).all() and (out[2:12, 2:12] == 200).all()


def test_read_image_modes(tmp_path):
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)

  Image.fromarray(grey).save(tmp_path / "grey.png")
  out = preprocess.read_image(tmp_path / "grey.png")
  assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))

  rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(preprocess.read_image(tmp_path / "rgba.png"), rgb)

  pal = Image.fromarray(rgb).quantize(16)
  pal.save(tmp_path / "pal.png")
  np.testing.assert_array_equal(
      preprocess.read_image(tmp_path / "pal.png"), np.asarray(pal.convert("RGB"))
  )

  Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
  np.testing.assert_array_equal(preprocess.read_image(tmp_path / "rgb.bmp"), rgb)


def test_read_image_16bit(tmp_path):
  tifffile = pytest.importorskip("tifffile")  # a scikit-image dependency
  rng = np.random.default_rng(3)
  g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
  g16[0, :3] = (0, 65535, 257 * 100 + 128)
  c16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
  tifffile.imwrite(tmp_path / "g16.tif", g16)
  tifffile.imwrite(tmp_path / "c16.tiff", c16, photometric="rgb")
  Image.fromarray(g16).save(tmp_path / "g16.png")

  def scaled(a):
    return np.round(a / 257.0).astype(np.uint8)

  for name in ("g16.tif", "g16.png"):
    out = preprocess.read_image(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3), name
    np.testing.assert_array_equal(out, np.repeat(scaled(g16)[..., None], 3, -1))
    assert tuple(out[0, :2, 0]) == (0, 255)
  out = preprocess.read_image(tmp_path / "c16.tiff")
  np.testing.assert_array_equal(out, scaled(c16))


def test_truncated_and_garbage_images_name_the_file(tmp_path):
  rng = np.random.default_rng(4)
  Image.fromarray(_rand_rgb(rng, 60, 60)).save(tmp_path / "ok.png")
  data = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  for name in ("trunc.png", "junk.png", "missing.png"):
    with pytest.raises(ImageReadError, match=name):
      preprocess.read_image(tmp_path / name)
  with pytest.raises(ImageReadError, match="trunc.png"):
    preprocess.read_mask(tmp_path / "trunc.png")


def test_read_mask_formats(tmp_path):
  m = np.zeros((10, 12), np.uint8)
  m[2:5, 3:7] = 255
  m[8, 1] = 1  # noise of a three-valued mask: scaled to 1/255, no defect
  Image.fromarray(m).save(tmp_path / "l.png")
  want = m.astype(np.float32) / 255
  out = preprocess.read_mask(tmp_path / "l.png")
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, want)
  rgba = np.zeros((10, 12, 4), np.uint8)
  rgba[..., 3] = 255  # opaque alpha must not count
  rgba[..., 0] = m
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(preprocess.read_mask(tmp_path / "rgba.png"), want)
  Image.fromarray(m > 0).save(tmp_path / "bits.png")  # mode '1': two-valued, exactly {0, 1}
  np.testing.assert_array_equal(preprocess.read_mask(tmp_path / "bits.png"), m > 0)


def test_mask_binarised_at_half():
  m = np.zeros((40, 50), np.float32)
  m[10:13, 5:30] = 1.0
  m[20:30, 21] = 1.0  # one-pixel line: shrinks below 0.5 after downsampling
  got = preprocess.resize_and_crop_mask(m, 33, 30)
  pil = tv_resize_center_crop(Image.fromarray(m), 33, 30)  # mode 'F'
  resized = np.asarray(pil)
  assert got.dtype == np.uint8 and got.shape == (30, 30)
  np.testing.assert_array_equal(got, (resized > 0.5).astype(np.uint8))
  # Edge pixels strictly between 0.5 and 1 are kept (the reference's int cast drops them).
  assert ((resized > 0.5) & (resized < 1.0)).any()
  assert set(np.unique(got)) <= {0, 1}


def test_normalize():
  x = np.random.default_rng(5).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  got = np.asarray(preprocess.normalize(x))
  want = (x.astype(np.float32) / 255.0 - np.float32(preprocess.IMAGENET_MEAN)) / np.float32(
      preprocess.IMAGENET_STD
  )
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ scanning


def test_scan_layout_and_order(tmp_path):
  root = make_dataset(tmp_path / "ds")
  (root / "a" / "train" / "good" / "notes.txt").write_text("ignored")
  (root / "README.txt").write_text("ignored")
  recs = layout.scan_mvtec(root)
  assert [r.class_name for r in recs] == ["a"] * 7 + ["b"] * 7
  a = [r for r in recs if r.class_name == "a"]
  assert [(r.split, r.defect_type, Path(r.image_path).name) for r in a] == [
      ("train", "good", "000.png"),
      ("train", "good", "001.png"),
      ("train", "good", "002.png"),
      ("test", "crack", "000.png"),
      ("test", "crack", "001.png"),
      ("test", "good", "000.png"),
      ("test", "good", "001.png"),
  ]
  for r in recs:
    assert (r.mask_path is None) == (r.defect_type == "good")
    if r.mask_path:
      assert Path(r.mask_path).name == Path(r.image_path).stem + "_mask.png"
  assert [r.class_name for r in layout.scan_mvtec(root, ["b"])] == ["b"] * 7


def test_scan_errors_are_all_listed(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a", "b", "d"))
  for p in (root / "b" / "train" / "good").iterdir():
    p.unlink()  # b: no training images
  (root / "d" / "ground_truth" / "crack" / "001_mask.png").unlink()  # d: a mask missing
  with pytest.raises(DatasetError) as ei:
    layout.scan_mvtec(root, ["a", "b", "c", "d"])
  msg = str(ei.value)
  assert isinstance(ei.value, ValueError)
  assert "3 problem" in msg
  assert "'b'" in msg and "no training images" in msg
  assert "'c'" in msg and "missing" in msg
  assert "'d'" in msg and "001.png" in msg and "without a mask" in msg
  assert "Expected layout" in msg and "ground_truth" in msg

  with pytest.raises(DatasetError, match="does not exist"):
    layout.scan_mvtec(tmp_path / "nowhere")


def test_scan_accepts_visa_style_mask_names(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  g = root / "a" / "ground_truth" / "crack"
  for p in g.iterdir():
    p.rename(g / p.name.replace("_mask", ""))
  recs = layout.scan_mvtec(root)
  assert all(Path(r.mask_path).name == Path(r.image_path).name for r in recs if r.mask_path)


# ------------------------------------------------------------------ TFDS cache


def _prepared_files(ds):
  d = Path(ds.data_dir)
  return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_builder_round_trip_and_cache(tmp_path, monkeypatch, capsys):
  root = make_dataset(tmp_path / "ds", size=(40, 50))
  cache = tmp_path / "cache"
  ds = mvtec.load_dataset(root, ["b", "a"], RESIZE, CROP, cache)
  out = capsys.readouterr().out
  assert "b: train 3 | test good 2, defective 2 | defect types: crack" in out
  assert ds.class_names == ["b", "a"]
  assert len(ds.train) == 6 and len(ds.test) == 8
  assert any(n.endswith(".array_record-00000-of-00001") for n in _prepared_files(ds))

  recs = layout.scan_mvtec(root, ["b", "a"])
  for split, source in (("train", ds.train), ("test", ds.test)):
    srecs = [r for r in recs if r.split == split]
    np.testing.assert_array_equal(
        mvtec.class_indices(source), [0 if r.class_name == "b" else 1 for r in srecs]
    )
    batch = mvtec.get_batch(source, np.arange(len(source))[::-1])
    assert batch["image"].shape == (len(source), CROP, CROP, 3)
    assert batch["image"].dtype == np.uint8 and batch["mask"].dtype == np.uint8
    assert batch["mask"].shape == (len(source), CROP, CROP)
    assert batch["label"].dtype == np.int32 and batch["is_anomaly"].dtype == np.int32
    for j, r in enumerate(reversed(srecs)):
      image, mask = preprocess.load_example(r.image_path, r.mask_path, RESIZE, CROP)
      np.testing.assert_array_equal(batch["image"][j], image)
      np.testing.assert_array_equal(batch["mask"][j], mask)
      assert batch["is_anomaly"][j] == int(r.defect_type != "good")
      assert batch["defect_type"][j] == r.defect_type
      assert batch["name"][j] == Path(os.path.relpath(r.image_path, root)).as_posix()
      assert isinstance(batch["name"][j], str)
  assert mvtec.get_batch(ds.test, [1])["mask"].sum() > 0  # b/test/crack/001.png

  # Cache reuse: no generation on the second load, files untouched.
  before = _prepared_files(ds)

  def fail(*a, **k):
    raise AssertionError("dataset rebuilt although nothing changed")

  monkeypatch.setattr(mvtec.MVTecFolder, "_generate_examples", fail)
  ds2 = mvtec.load_dataset(root, ["b", "a"], RESIZE, CROP, cache)
  assert ds2.data_dir == ds.data_dir and _prepared_files(ds2) == before
  np.testing.assert_array_equal(
      mvtec.get_batch(ds2.test, [3])["image"], mvtec.get_batch(ds.test, [3])["image"]
  )
  monkeypatch.undo()

  # Other parameters -> another config directory.
  ds3 = mvtec.load_dataset(root, ["b", "a"], 40, 40, cache, verbose=False)
  assert ds3.data_dir != ds.data_dir and mvtec.get_batch(ds3.train, [0])["image"].shape[1] == 40

  # Changed content -> rebuilt, new values, stale directory pruned.
  target = root / "a" / "train" / "good" / "001.png"
  new = np.full((40, 50, 3), 7, np.uint8)
  Image.fromarray(new).save(target)
  st = target.stat()
  os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  ds4 = mvtec.load_dataset(root, ["b", "a"], RESIZE, CROP, cache, verbose=False)
  assert ds4.data_dir != ds.data_dir
  assert not Path(ds.data_dir).exists()  # stale version of the same parameters removed
  assert Path(ds3.data_dir).exists()  # other parameters kept
  idx = mvtec.get_batch(ds4.train, range(len(ds4.train)))["name"].index("a/train/good/001.png")
  np.testing.assert_array_equal(
      mvtec.get_batch(ds4.train, [idx])["image"][0],
      preprocess.resize_and_crop_image(new, RESIZE, CROP),
  )


def test_build_error_names_bad_file(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a",))
  bad = root / "a" / "test" / "good" / "001.png"
  bad.write_bytes(bad.read_bytes()[:100])
  with pytest.raises(DatasetError, match="truncated file .*001.png"):
    mvtec.load_dataset(root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert not (tmp_path / "cache").exists()  # validated before anything is written


def test_build_without_tensorflow_for_splits_over_tfds_memory_buffer(tmp_path, monkeypatch):
  # tfds spills a split larger than shuffle.MAX_MEM_BUFFER_SIZE to temporary files through
  # tf.io.gfile (TensorFlow); load_dataset's builds spill through data/spill.py instead.
  from tensorflow_datasets.core import shuffle as tfds_shuffle

  monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
  root = make_dataset(tmp_path / "ds", classes=("a",), n_train=4)
  ds = mvtec.load_dataset(root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert len(ds.train) == 4 and len(ds.test) == 4
  assert tfds_shuffle.MAX_MEM_BUFFER_SIZE == 1000  # restored


def test_get_batch_rejects_empty_and_class_indices_fallback(tmp_path):
  root = make_dataset(tmp_path / "ds", classes=("a", "b"), n_train=2)
  ds = mvtec.load_dataset(root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  with pytest.raises(ValueError):
    mvtec.get_batch(ds.train, [])
  dup = mvtec.get_batch(ds.train, [3, 0, 3])  # repeated indices (padding) are fine
  assert dup["name"] == ["b/train/good/001.png", "a/train/good/000.png", "b/train/good/001.png"]
  np.testing.assert_array_equal(dup["image"][0], dup["image"][2])
  want = mvtec.class_indices(ds.train)
  np.testing.assert_array_equal(want, [0, 0, 1, 1])

  class Bare:  # a source without tfds metadata: labels are read from the examples

    def __len__(self):
      return len(ds.train)

    def __getitem__(self, i):
      return ds.train[i]

  np.testing.assert_array_equal(mvtec.class_indices(Bare()), want)


def test_prepared_data_read_by_another_live_run_is_not_pruned(tmp_path):
  """Two runs share a cache: the second prepares changed data while the first still reads
  the old directory; it is kept until that run has ended, then pruned."""
  from tests.base.test_leases import end, hold_in_another_process

  root = make_dataset(tmp_path / "ds", classes=("a",), n_train=2, n_good=1, n_bad=1, size=(40, 50))
  cache = tmp_path / "cache"
  old = mvtec.load_dataset(root, ["a"], RESIZE, CROP, cache, verbose=False)
  old_dir = Path(old.data_dir).parent
  first_run = hold_in_another_process(old_dir)
  try:
    target = root / "a" / "train" / "good" / "001.png"
    Image.fromarray(np.full((40, 50, 3), 9, np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = mvtec.load_dataset(root, ["a"], RESIZE, CROP, cache, verbose=False)
    assert new.data_dir != old.data_dir
    assert old_dir.is_dir()  # still read by the first run
    assert len(mvtec.get_batch(old.train, [0, 1])["image"]) == 2
  finally:
    end(first_run)
  mvtec.load_dataset(root, ["a"], RESIZE, CROP, cache, verbose=False)
  assert not old_dir.exists() and Path(new.data_dir).is_dir()  # unused now: pruned


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "record_lost"])
def test_prepared_data_changed_on_disk_is_prepared_again(tmp_path, capsys, damage):
  """A prepared shard with a flipped byte (or cut short, or without the record of its
  contents) is never read as data: the load says so and prepares it again."""
  root = make_dataset(tmp_path / "ds", size=(40, 50))
  cache = tmp_path / "cache"
  ds = mvtec.load_dataset(root, ["b", "a"], RESIZE, CROP, cache, verbose=False)
  want = mvtec.get_batch(ds.train, range(len(ds.train)))["image"]
  shard = next(Path(ds.data_dir).glob("*train.array_record-*"))
  if damage == "flipped_byte":
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
  elif damage == "truncated":
    os.truncate(shard, shard.stat().st_size // 2)
  else:
    (Path(ds.data_dir) / prepared_digest.DIGEST_FILE).unlink()
  capsys.readouterr()
  ds2 = mvtec.load_dataset(root, ["b", "a"], RESIZE, CROP, cache, verbose=False)
  assert "preparing it again" in capsys.readouterr().out
  np.testing.assert_array_equal(mvtec.get_batch(ds2.train, range(len(ds2.train)))["image"], want)
  assert prepared_digest.problem(ds2.data_dir) is None


@pytest.mark.parametrize("stored", [{}, {"a.array_record": ""}, {"a.array_record": 7}])
def test_an_emptied_record_of_prepared_contents_is_not_taken_as_verified(stored, tmp_path):
  """A record stripped of its digests (empty, or empty values) never passes as "every file
  has the recorded bytes"."""
  (tmp_path / prepared_digest.DIGEST_FILE).write_text(json.dumps({"sha256": stored}))
  (tmp_path / "a.array_record").write_bytes(b"changed")
  assert "empty or malformed" in prepared_digest.problem(str(tmp_path))
  prepared_digest.record(str(tmp_path))
  assert prepared_digest.problem(str(tmp_path)) is None
