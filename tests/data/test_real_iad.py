"""Real-IAD read as released (cras_jax/data/real_iad.py) on the synthetic writer of its layout
(cras_jax/data/synthetic/real_iad.py): the JSON splits, every view an image, masks by the
JSON's mask_path, and the bad inputs refused with one message naming the file and the fix,
before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cras_jax.base import errors, registry
from cras_jax.configs import real_iad as config_module
from cras_jax.data import layout, mvtec, preprocess, real_iad
from cras_jax.data.synthetic import real_iad as synthetic_real_iad

RESIZE, CROP = 24, 16
CLASSES = ("audiojack", "pcb", "zipper")


@pytest.fixture(scope="module")
def ri_root(tmp_path_factory) -> Path:
  """Three categories, 2 train + 1 good + 2 defective samples x 5 views at 32 px (read-only:
  tests that change it copy it)."""
  root = tmp_path_factory.mktemp("ri") / "Real-IAD"
  synthetic_real_iad.generate(root, CLASSES, n_test_bad=2)
  return root


def _copy(root: Path, tmp_path: Path) -> Path:
  dst = tmp_path / "copy"
  shutil.copytree(root, dst)
  return dst


def _json(root: Path, cls: str, split_set: str = "realiad_jsons") -> Path:
  return root / "realiad_jsons" / split_set / f"{cls}.json"


def test_every_view_is_an_image_labelled_and_masked_by_its_json_entry(ri_root):
  records, problems, classes = real_iad.collect(ri_root)
  assert problems == [] and classes == list(CLASSES)
  train = [r for r in records if r.split == "train"]
  test = [r for r in records if r.split == "test"]
  assert len(train) == 3 * 2 * 5 and len(test) == 3 * 3 * 5  # a sample's 5 views: 5 images
  assert {Path(r.image_path).stem.split("_C")[-1][0] for r in train} == set("12345")
  doc = json.loads(_json(ri_root, "pcb").read_text())
  assert set(doc) == {"meta", "train", "test"} and doc["meta"]["normal_class"] == "OK"
  base = ri_root / "realiad_32" / "pcb"
  want = {
      os.fspath(base / e["image_path"]): (
          "good" if e["anomaly_class"] == "OK" else e["anomaly_class"],
          e["mask_path"] and os.fspath(base / e["mask_path"]),
      )
      for e in doc["test"]
  }
  got = {r.image_path: (r.defect_type, r.mask_path) for r in test if r.class_name == "pcb"}
  assert got == want  # each label and mask is its entry's, in the file's (shuffled) order
  # the view of a defective sample that does not show the defect is a normal image
  hidden = [r for r in test if "/NG/" in r.image_path and not r.is_anomaly]
  assert len(hidden) == 3 * 2 and all(r.mask_path is None for r in hidden)
  # the single-view split set: view C1 only
  sv, problems, _ = real_iad.collect(ri_root, split_set="realiad_jsons_sv")
  assert problems == [] and len(sv) == 3 * 5 and all("_C1_" in r.image_path for r in sv)


def test_a_mask_is_the_one_its_entry_names_whatever_its_file_name(ri_root, tmp_path):
  root = _copy(ri_root, tmp_path)
  path = _json(root, "zipper")
  doc = json.loads(path.read_text())
  entry = next(e for e in doc["test"] if e["mask_path"])
  moved = "NG/elsewhere.png"
  shutil.move(
      root / "realiad_32" / "zipper" / entry["mask_path"], root / "realiad_32/zipper" / moved
  )
  entry["mask_path"] = moved
  path.write_text(json.dumps(doc))
  records, problems, _ = real_iad.collect(root, ["zipper"])
  assert problems == []
  (rec,) = [r for r in records if r.image_path.endswith(entry["image_path"])]
  assert rec.mask_path == os.fspath(root / "realiad_32" / "zipper" / "NG" / "elsewhere.png")


def test_split_files_directly_under_the_root_as_the_readme_lists_them(ri_root, tmp_path):
  root = _copy(ri_root, tmp_path)
  nested = root / "realiad_jsons"
  shutil.move(nested / "realiad_jsons_sv", root / "realiad_jsons_sv")
  for p in (nested / "realiad_jsons").iterdir():  # <root>/realiad_jsons/<category>.json
    shutil.move(p, nested / p.name)
  (nested / "realiad_jsons").rmdir()
  want, _, _ = real_iad.collect(ri_root)
  assert real_iad.collect(root) == ([_moved(r, ri_root, root) for r in want], [], list(CLASSES))
  sv, problems, _ = real_iad.collect(root, split_set="realiad_jsons_sv")
  assert problems == [] and len(sv) == 15


def _moved(r, old: Path, new: Path):
  swap = lambda p: p and os.fspath(new / os.path.relpath(p, old))  # noqa: E731
  return layout.Record(r.class_name, r.split, r.defect_type, swap(r.image_path), swap(r.mask_path))


def test_the_prepared_copy_holds_each_listed_image_preprocessed_as_everywhere(ri_root, tmp_path):
  ds = real_iad.load_dataset(ri_root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert (len(ds.train), len(ds.test)) == (30, 45)
  np.testing.assert_array_equal(np.bincount(mvtec.class_indices(ds.test)), [15, 15, 15])
  test = mvtec.get_batch(ds.test, np.arange(len(ds.test)))
  assert test["is_anomaly"].sum() == 3 * 2 * 4 and test["mask"][test["is_anomaly"] == 1].any()
  assert not test["mask"][test["is_anomaly"] == 0].any()
  k = int(np.flatnonzero(test["is_anomaly"])[0])
  name = test["name"][k]
  rec = next(r for r in ds.records if r.image_path == os.fspath(ri_root / name))
  image, mask = preprocess.load_example(rec.image_path, rec.mask_path, RESIZE, CROP)
  np.testing.assert_array_equal(test["image"][k], image)
  np.testing.assert_array_equal(test["mask"][k], mask)
  again = real_iad.load_dataset(ri_root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert again.data_dir == ds.data_dir


def _refused(root: Path, cache: Path, classes=None) -> str:
  with pytest.raises(layout.DatasetError) as e:
    real_iad.load_dataset(root, classes, RESIZE, CROP, cache, verbose=False)
  assert isinstance(e.value, errors.UserValueError)  # exit status 2 under errors.run
  assert not cache.exists() or not any(cache.rglob("*.array_record*"))  # nothing prepared
  return str(e.value)


def test_a_json_naming_a_missing_image_or_mask_is_refused_naming_the_file(ri_root, tmp_path):
  root = _copy(ri_root, tmp_path)
  doc = json.loads(_json(root, "pcb").read_text())
  image = doc["train"][3]["image_path"]
  mask = next(e["mask_path"] for e in doc["test"] if e["mask_path"])
  (root / "realiad_32" / "pcb" / image).unlink()
  (root / "realiad_32" / "pcb" / mask).unlink()
  text = _refused(root, tmp_path / "cache")
  assert text.count("\n  - ") == 2 and os.fspath(_json(root, "pcb")) in text
  assert f"names images that are missing under {os.fspath(root / 'realiad_32' / 'pcb')!r}" in text
  assert image in text and mask in text and "restore them from the release" in text


def test_a_json_that_is_not_real_iads_or_a_category_without_one_is_refused(ri_root, tmp_path):
  root = _copy(ri_root, tmp_path)
  _json(root, "audiojack").write_text(json.dumps({"meta": {}, "samples": []}))
  _json(root, "pcb").unlink()
  text = _refused(root, tmp_path / "cache", CLASSES)
  assert f"{os.fspath(_json(root, 'audiojack'))!r} is not a Real-IAD split file" in text
  assert "lacks the keys train, test" in text
  assert os.fspath(_json(root, "pcb")) in text and "unzip the release's realiad_jsons.zip" in text
  assert text.count("\n  - ") == 2  # zipper is fine


def test_the_config_and_the_registry_name_real_iad():
  config = config_module.get_config()
  entry = registry.dataset("real_iad")
  assert config.data.name == "real_iad" and tuple(config.data.classes) == entry.classes
  assert len(entry.classes) == 30 and entry.layout == "real_iad" in registry.LAYOUTS
  assert not entry.archive_url and entry.how_to_get
