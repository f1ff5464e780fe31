"""MVTec AD 2 read as released (cras_jax/data/mvtec_ad2.py) on the synthetic writer of its
layout (cras_jax/data/synthetic/mvtec_ad2.py): the three prepared splits, the mask naming, and
the bad folders refused with one message naming the file and the fix, before anything is
written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cras_jax.base import errors, registry
from cras_jax.configs import mvtec_ad2 as config_module
from cras_jax.data import layout, mvtec, mvtec_ad2, preprocess
from cras_jax.data.synthetic import mvtec_ad2 as synthetic_ad2

RESIZE, CROP = 20, 16
CLASSES = ("can", "vial")


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory) -> Path:
  """Two classes of the synthetic MVTec AD 2 at 16 x 20 pixels (read-only: tests copy it)."""
  root = tmp_path_factory.mktemp("ad2") / "mvtec_ad2"
  synthetic_ad2.generate(root, CLASSES, height=16, n_train=3, n_validation=2, n_private=2)
  return root


def _copy(root: Path, tmp_path: Path) -> Path:
  dst = tmp_path / "copy"
  shutil.copytree(root, dst)
  return dst


def test_the_layout_is_read_as_released_with_masks_named_stem_mask(ad2_root):
  records, problems, classes = mvtec_ad2.collect(ad2_root)
  assert problems == [] and classes == list(CLASSES)
  by_split = {s: [r for r in records if r.split == s] for s in ("train", "validation", "test")}
  assert {s: len(v) for s, v in by_split.items()} == {"train": 6, "validation": 4, "test": 10}
  rel = {os.path.relpath(r.image_path, ad2_root) for r in by_split["validation"]}
  assert "can/validation/good/000_regular.png" in rel
  bad = [r for r in by_split["test"] if r.is_anomaly]
  assert len(bad) == 6 and {r.defect_type for r in bad} == {"bad"}
  for r in bad:  # test_public/ground_truth/bad/<image stem>_mask.png, the image's size
    stem = Path(r.image_path).stem
    assert r.mask_path == os.fspath(
        ad2_root / r.class_name / "test_public" / "ground_truth" / "bad" / f"{stem}_mask.png"
    )
    assert Image.open(r.mask_path).size == Image.open(r.image_path).size == (20, 16)
  # the private sets are not prepared; the submission lists them
  names = [p.name for p in mvtec_ad2.private_images(ad2_root, "vial", "test_private_mixed")]
  assert names == ["000_mixed.png", "001_mixed.png"]


def test_the_prepared_copy_holds_train_validation_and_test_preprocessed_as_everywhere(
    ad2_root, tmp_path
):
  ds = mvtec_ad2.load_dataset(ad2_root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (6, 4, 10)
  np.testing.assert_array_equal(mvtec.class_indices(ds.validation), [0, 0, 1, 1])
  batch = mvtec.get_batch(ds.validation, [3])
  path = ad2_root / batch["name"][0]
  assert batch["name"][0] == "vial/validation/good/001_regular.png"
  want, _ = preprocess.load_example(path, None, RESIZE, CROP)
  np.testing.assert_array_equal(batch["image"][0], want)
  test = mvtec.get_batch(ds.test, np.arange(len(ds.test)))
  assert test["is_anomaly"].sum() == 6 and test["mask"][test["is_anomaly"] == 1].any()
  assert set(ds.identity) == {"classes", "train", "test", "validation"}
  assert ds.identity["validation"]["vial"]["images"] == 2
  assert "validation 2 | test_public good 2, defective 3" in ds.summary_lines()[1]
  # reopened: the same prepared copy, not MVTec AD's builder folder
  again = mvtec_ad2.load_dataset(ad2_root, None, RESIZE, CROP, tmp_path / "cache", verbose=False)
  assert again.data_dir == ds.data_dir and "mvtec_ad2_folder" in ds.data_dir


def _refused(root: Path, cache: Path) -> str:
  with pytest.raises(layout.DatasetError) as e:
    mvtec_ad2.load_dataset(root, None, RESIZE, CROP, cache, verbose=False)
  assert isinstance(e.value, errors.UserValueError)  # exit status 2 under errors.run
  assert not cache.exists() or not any(cache.rglob("*.array_record*"))  # nothing prepared
  return str(e.value)


def test_a_class_without_validation_is_refused_naming_the_folder_and_the_fix(ad2_root, tmp_path):
  root = _copy(ad2_root, tmp_path)
  shutil.rmtree(root / "vial" / "validation")
  text = _refused(root, tmp_path / "cache")
  assert os.fspath(root / "vial" / "validation" / "good") in text and "is missing" in text
  assert "thresholds are fitted on its normal validation images" in text
  assert text.count("\n  - ") == 1  # one problem: the other class is fine


def test_masks_or_folders_in_a_private_test_set_are_refused(ad2_root, tmp_path):
  root = _copy(ad2_root, tmp_path)
  mask = root / "can" / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png"
  shutil.copy(mask, root / "can" / "test_private" / "000_regular_mask.png")
  (root / "vial" / "test_private_mixed" / "ground_truth").mkdir()
  text = _refused(root, tmp_path / "cache")
  assert "000_regular_mask.png" in text and os.fspath(root / "can" / "test_private") in text
  assert "releases no ground truth for test_private" in text and "move or delete them" in text
  assert os.fspath(root / "vial" / "test_private_mixed" / "ground_truth") in text
  with pytest.raises(layout.DatasetError, match="000_regular_mask.png"):
    mvtec_ad2.private_images(root, "can", "test_private")


def test_a_defective_image_without_its_mask_is_refused(ad2_root, tmp_path):
  root = _copy(ad2_root, tmp_path)
  (root / "can" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png").unlink()
  text = _refused(root, tmp_path / "cache")
  assert "001_regular.png" in text and "expected <name>_mask.png" in text


def test_the_config_and_the_registry_name_mvtec_ad2():
  config = config_module.get_config()
  entry = registry.dataset("mvtec_ad2")
  assert config.data.name == "mvtec_ad2" and tuple(config.data.classes) == entry.classes
  assert entry.classes == registry.MVTEC_AD2_CLASSES and len(entry.classes) == 8
  assert entry.layout == "mvtec_ad2" and entry.layout in registry.LAYOUTS
  assert not entry.archive_url and entry.how_to_get  # a licence page: put it by hand
