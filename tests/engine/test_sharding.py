"""Data parallelism: one jitted, sharded step on 4 simulated CPU devices equals the
same step on 1 device (parameters, BatchNorm statistics, loss, scores)."""

import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.engine import sharding
from tests import golden
from tests.conftest import run_on_cpu_devices

SCRIPT = r"""
import sys
import jax, numpy as np
from cras_jax.engine import steps
from cras_jax.scoring import scoring
from tests import tiny_step

spec, devices, state, batch = tiny_step.setup()
dev_batch = devices.put_batch(batch)
assert len(dev_batch["image"].sharding.device_set) == devices.count
assert len(dev_batch["image"].addressable_shards) == devices.count
assert dev_batch["image"].addressable_shards[0].data.shape[0] == 8 // devices.count
# Scoring first (on the initial state), then one training step.
scorer = scoring.Scorer(spec, devices, 8, state=state)
out = scorer.predict_step(scorer.svars, devices.put_batch({"image": batch["image"]})["image"])
assert len(out["maps"].sharding.device_set) == devices.count
out = jax.tree.map(np.asarray, out)
step = devices.jit_train(steps.make_train_step(spec))
state, metrics = step(state, dev_batch)
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
    {"params": state.params, "batch_stats": state.batch_stats, "metrics": metrics,
     "scores": out["scores"], "maps": out["maps"]})}
np.savez(sys.argv[1], **flat)
print("devices", devices.count)
"""


def run(n, path):
  assert f"devices {n}" in run_on_cpu_devices(n, SCRIPT, path)
  return dict(np.load(path))


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path):
  one = run(1, tmp_path / "one.npz")
  four = run(4, tmp_path / "four.npz")
  t = demo.get_config().train  # the rates the step used
  golden.assert_one_step_equal(four, one, t.lr_adapter, t.lr_disc)


def test_batch_problem_names_the_field_and_the_nearest_batches_that_split_evenly():
  assert sharding.batch_problem(8, 1) is None
  assert sharding.batch_problem(9, 3) is None
  said = sharding.batch_problem(8, 3)
  assert said.startswith("train.batch_size=8: ") and "use 6 or 9" in said
  assert "use 3" in sharding.batch_problem(2, 3, "train.batch_size")
  assert sharding.batch_problem(2, 3).endswith("use 3, or fewer devices")
