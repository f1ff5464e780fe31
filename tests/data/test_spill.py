"""Preparing in bounded memory (data/spill.py): the prepared copy is the in-memory path's, byte
for byte; the spill holds nothing in memory, keeps the key order, refuses another order and
leaves no temporary file."""

import contextlib
import os

import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle

from cras_jax.data import mvtec, spill
from tests.data.test_mvtec import CROP, RESIZE, make_dataset


def _files(cache) -> dict:
  out = {}
  for d, _, names in os.walk(cache):
    for n in names:
      if ".array_record" in n:
        with open(os.path.join(d, n), "rb") as f:
          out[os.path.relpath(os.path.join(d, n), cache)] = f.read()
  return out


def test_the_spilled_build_writes_the_in_memory_builds_shards(tmp_path, monkeypatch):
  root = make_dataset(tmp_path / "ds", classes=("a", "b"), n_train=5)
  spilled = mvtec.load_dataset(root, None, RESIZE, CROP, tmp_path / "spilled", verbose=False)
  assert not any("spill_" in n for _, _, ns in os.walk(tmp_path / "spilled") for n in ns)
  monkeypatch.setattr(spill, "sequential_spill", contextlib.nullcontext)  # tfds' own shuffler
  memory = mvtec.load_dataset(root, None, RESIZE, CROP, tmp_path / "memory", verbose=False)
  a, b = _files(tmp_path / "spilled"), _files(tmp_path / "memory")
  assert a and a.keys() == b.keys()
  assert all(a[k] == b[k] for k in a)
  assert len(spilled.train) == len(memory.train) == 10
  assert tfds_shuffle.Shuffler is not spill.SequentialSpill  # restored after the build


def test_the_spill_keeps_the_key_order_in_a_file_and_removes_it(tmp_path):
  s = spill.SequentialSpill(tmp_path, "salt", disable_shuffling=True)
  items = [(i, bytes([i]) * (20_000 * i + 1)) for i in (0, 1, 5, 9)]  # past the write buffer
  for k, v in items:
    s.add(k, v)
  assert s.num_examples == 4 and s.size == sum(len(v) for _, v in items)
  assert s.bucket_lengths == [4]
  (spilled,) = list(tmp_path.iterdir())
  assert spilled.stat().st_size >= s.size - 20_000  # on disk, not held (one write buffer)
  assert list(s) == items
  assert not list(tmp_path.iterdir())


def test_the_spill_refuses_keys_out_of_order_and_shuffling(tmp_path):
  s = spill.SequentialSpill(tmp_path, "salt", disable_shuffling=True)
  s.add(3, b"x")
  with pytest.raises(ValueError, match="keys must increase"):
    s.add(3, b"y")
  with pytest.raises(ValueError, match="shuffling must be off"):
    spill.SequentialSpill(tmp_path, "salt", disable_shuffling=False)
