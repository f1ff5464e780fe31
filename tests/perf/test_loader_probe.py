"""The benchmark's loader rate (cras_jax/perf/loader_probe.py) on a tiny prepared set."""

import jax

from cras_jax.perf import loader_probe


def test_loader_rate_reads_batches_with_each_worker_count(tmp_path):
  source = loader_probe.synthetic_source(str(tmp_path), image_size=16, n_images=8)
  assert len(source) == 8
  for workers in (1, 2):
    r = loader_probe.loader_rate(source, 4, workers, jax.devices()[:1], seconds=0.1)
    assert r["workers"] == workers and r["batch_size"] == 4 and r["images_per_s"] > 0
