"""Worker threads read exactly the batches of one thread (cras_jax/data/loader.py)."""

import numpy as np

from cras_jax.data import loader, mvtec
from cras_jax.training import loop
from tests.data.test_mvtec import make_dataset


def test_batches_do_not_depend_on_the_worker_count(tmp_path):
  root = make_dataset(tmp_path / "root", classes=("a", "b", "c"), n_train=5, size=(24, 24))
  ds = mvtec.load_dataset(root, None, 24, 24, tmp_path / "cache", verbose=False)
  n = len(ds.train)
  readers = [loader.BatchReader(ds.train, w) for w in (1, 2, 3, 7)]
  assert [r.workers for r in readers] == [1, 2, 3, 7]
  for step in range(5):  # crosses an epoch boundary: 15 examples, batches of 4
    _, idx = loop.batch_indices(seed=3, step=step, n=n, batch_size=4)
    want = mvtec.get_batch(ds.train, idx)
    for r in readers:
      got = r.read(idx)
      assert got.keys() == want.keys()
      for k in want:
        if isinstance(want[k], np.ndarray):
          np.testing.assert_array_equal(got[k], want[k])
        else:
          assert got[k] == want[k]
      assert r.read(idx, ("image", "label")).keys() == {"image", "label"}
  for r in readers:
    r.close()


def test_default_workers_follow_the_host_cores(monkeypatch):
  monkeypatch.setattr(loader.os, "cpu_count", lambda: 2)
  assert loader.default_workers() == 2
  monkeypatch.setattr(loader.os, "cpu_count", lambda: 64)
  assert loader.default_workers() == loader.MAX_DEFAULT_WORKERS
  monkeypatch.setattr(loader.os, "cpu_count", lambda: None)
  assert loader.default_workers() == 1
