"""The training loop's row (cras_jax/perf/loop_probe.py): its timings on hand-set clocks, and
the stored features' gather on a tiny feature cache."""

import jax
import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.engine import sharding, steps
from cras_jax.perf import loop_probe, rows


def test_loop_timings_from_dispatches_results_and_hooks():
  """One warm step, then 2 reps of 2 steps, a log window of 2 steps. Step 2 is dispatched
  0.6 s after step 1's result (the device waited), step 3 0.2 s after step 2's; steps 1 and 4
  were enqueued before their predecessor finished (no wait)."""
  calls = [(0.0, 0.1), (0.2, 0.3), (2.5, 2.6), (3.7, 3.8), (4.0, 4.1)]
  ready = [1.0, 2.0, 3.6, 4.8, 6.0]
  checks, logs = [(2.0, 2.4), (6.1, 6.2)], [(2.4, 2.45), (6.2, 6.3)]  # the last: after the end
  t = loop_probe.analyse(calls, ready, checks, logs, warm=1, per_rep=2, reps=2, log_every=2)
  # rep 1: steps 1-2, from step 0's result (1.0) to step 2's (3.6); rep 2: 3.6 to 6.0
  assert t["rep_step_times_s"] == pytest.approx([1.3, 1.2])
  assert t["median_s"] == pytest.approx(1.25)
  shares = [0.6 / 2.6, 0.2 / 2.4]
  assert t["rep_host_shares"] == pytest.approx(shares)
  assert t["host_share"] == pytest.approx(sum(shares) / 2)
  assert (t["host_share_min"], t["host_share_max"]) == pytest.approx(shares[::-1])
  assert t["device_wait_s_per_step"] == pytest.approx((0.3 + 0.1) / 2)
  assert t["dispatch_s"] == pytest.approx(0.1)
  # the hooks between the timed dispatches: one check (0.4 s) and one log (0.05 s) per 2 steps
  assert t["check_s_per_step"] == pytest.approx(0.2)
  assert t["log_s_per_step"] == pytest.approx(0.025)
  assert t["host_work_s"] == pytest.approx(0.125)
  # gaps between the dispatches of steps 1-4: 2.2 + 1.1 + 0.2, less the hooks' 0.45, over 3
  assert t["next_wait_s_per_step"] == pytest.approx((3.5 - 0.45) / 3)
  with pytest.raises(RuntimeError, match="expected 5"):
    loop_probe.analyse(calls[:4], ready[:4], [], [], warm=1, per_rep=2, reps=2, log_every=2)


def test_steps_per_rep_and_dataset_are_whole_windows_and_batches():
  config = demo.get_config()  # log every 5 steps
  assert loop_probe.loop_steps(type("A", (), {"loop_steps": 0}), config) == 10
  assert loop_probe.loop_steps(type("A", (), {"loop_steps": 7}), config) == 10
  assert loop_probe.dataset_size(16, 64) == 64 and loop_probe.dataset_size(12, 64) == 72
  assert loop_probe.dataset_size(32, 8) == 64  # at least two batches


def test_stored_features_are_gathered_from_a_committed_cache(tmp_path):
  config = demo.get_config()
  config.data.crop, config.model.embed_dim, config.model.pre_embed_dim = 64, 32, 48
  config.train.feature_cache_dtype = "float16"
  spec = steps.ModelSpec(config, 3)
  cache = loop_probe.make_cache(str(tmp_path), 8, spec, config.train.feature_cache_dtype)
  assert isinstance(cache, np.memmap) and cache.shape == (8, spec.num_patches, 32)
  assert cache.dtype == np.float16 and np.isfinite(cache).all() and cache.std() > 0.5
  assert rows.input_bytes_per_image("train_cached", config, spec) == spec.num_patches * 32 * 2 + 4
  assert rows.input_bytes_per_image("train", config, spec) == 64 * 64 * 3 + 4
  devices = sharding.Devices(devices=jax.devices()[:1])
  rate = loop_probe.producer_rate(devices, np.zeros(8, np.int32), cache, None, 4, 0.05)
  assert rate > 0
