"""Feature-cache files of replaced data are pruned once no live process reads them."""

import os

import numpy as np

from cras_jax.runs import feature_cache
from tests.base.test_leases import end, hold_in_another_process


def _commit(folder, key, data_dir):
  w = feature_cache.Writer(str(folder / f"train_{key}.npy"), (2, 3, 4), "float16", str(data_dir))
  w.array[:] = 1
  w.commit()
  return folder / f"train_{key}.npy"


def test_files_of_replaced_data_are_pruned_only_when_unused(tmp_path):
  folder = tmp_path / "features"
  live_data, gone_data = tmp_path / "data_new", tmp_path / "data_old"
  live_data.mkdir()
  gone_data.mkdir()
  current = _commit(folder, "aaaa", live_data)
  old = _commit(folder, "bbbb", gone_data)
  gone_data.rmdir()  # the prepared data it came from was pruned (newer contents)
  reader = hold_in_another_process(old)  # a run still training on the old features
  try:
    assert feature_cache.prune_unused(str(folder)) == []
    assert old.exists()
  finally:
    end(reader)
  assert feature_cache.prune_unused(str(folder)) == [str(old)]
  assert not old.exists() and not (folder / "train_bbbb.json").exists()
  assert current.exists()  # its data still exists: reusable by later runs
  np.testing.assert_array_equal(feature_cache.load(str(current), (2, 3, 4)), np.ones((2, 3, 4)))


def test_load_prunes_and_leases_its_file(tmp_path):
  folder = tmp_path / "features"
  gone = tmp_path / "gone"
  gone.mkdir()
  old = _commit(folder, "cccc", gone)
  gone.rmdir()
  assert feature_cache.load(str(folder / "train_dddd.npy"), (2, 3, 4)) is None
  assert not old.exists()
  assert any(n.startswith("train_dddd.npy@") for n in os.listdir(folder / ".leases"))
