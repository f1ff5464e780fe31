"""The scaling command (cras_jax/scaling.py) on 1, 2 and 4 simulated CPU devices, tiny."""

import json

import jax
import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.engine import steps
from cras_jax.perf import scaling_model
from tests.conftest import run_module

# The tiny model every command-line study here compiles (64 px, D 32, 3 classes).
TINY = (
    "--config=configs/demo.py",
    "--image_size=64",
    "--embed_dim=32",
    "--pre_embed_dim=48",
    "--num_classes=3",
)


def _gradients(embed_dim: int, num_classes: int) -> tuple[list[str], int]:
  """The adapter's leaves as HLO shapes (its gradients have the same), and the bytes of the
  whole parameter tree (= of its gradients)."""
  config = demo.get_config()
  config.data.crop, config.model.embed_dim, config.model.pre_embed_dim = 64, embed_dim, 48
  spec = steps.ModelSpec(config, num_classes)
  params = jax.eval_shape(lambda: steps._initial_state(spec, 0)).params
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == np.float32 for x in leaves)
  adapter = jax.tree.leaves(params["adapter"])
  return [f"f32[{','.join(map(str, x.shape))}]" for x in adapter], sum(4 * x.size for x in leaves)


@pytest.mark.slow
def test_scaling_tiny_on_simulated_devices(tmp_path):
  out = tmp_path / "scaling"
  log = run_module(
      "cras_jax.scaling",
      *TINY,
      "--devices=1,2,4",
      "--batch_per_device=2",
      "--modes=train_cached",
      "--measure=1",
      "--reps=1",
      "--loader_images_per_s=1",
      f"--out={out}",
      timeout=1200,
  )
  assert "measured / projected" in log
  result = json.loads((out / "scaling.json").read_text())
  assert (out / "scaling.md").exists() and (out / "scaling.png").stat().st_size > 0
  systems = {"this CPU", "H100 SXM", "H200 SXM", "TPU v5e", "TPU v4"}
  ps = result["projections"]
  assert {p["system"] for p in ps} == systems
  # weak scaling (2 per device) at every device count, on every system
  assert {(p["scaling"], p["devices"], p["global_batch"]) for p in ps} == {
      ("weak b2/device", 1, 2),
      ("weak b2/device", 2, 4),
      ("weak b2/device", 4, 8),
  }
  assert all(p["efficiency"] == 1.0 for p in ps if p["devices"] == 1)
  assert all(p["loader_bound"] for p in ps)  # 1 image/s: every projection is faster
  ratios = result["calibration"]["measured_over_projected"]
  assert list(ratios) == ["train_cached 1 dev batch 2"] and ratios["train_cached 1 dev batch 2"] > 0

  # Data parallel: the gradients are all-reduced once per step, at every device count > 1
  # (XLA combines them with the BatchNorm statistics and the loss's scalars, and may reduce a
  # leaf in parts or transposed: bytes are compared, and the adapter's kernel is found whole).
  adapter, grad_bytes = _gradients(32, 3)
  largest = max(adapter, key=lambda s: np.prod([int(d) for d in s[4:-1].split(",") if d]))
  for r in result["compiled"]:
    reduced = [
        s for c in r["facts"]["collective_list"] if c["kind"] == "all-reduce"
        for s in c["result_shapes"]
    ]  # fmt: skip
    if r["devices"] == 1:
      assert r["facts"]["collectives"] == {}
      continue
    # rows stay on their device: no all-to-all or collective-permute of features
    assert set(r["facts"]["collectives"]) <= {"all-reduce", "all-gather"}, r["facts"]["collectives"]
    assert largest in reduced
    total = r["facts"]["collectives"]["all-reduce"]["operand_bytes"]
    # beyond the gradients: BatchNorm statistics and the loss's scalars only
    assert grad_bytes <= total <= grad_bytes * 1.5, (grad_bytes, total)


def test_weak_and_strong_series():
  assert scaling_model.series([1, 2, 4], [2], [4, 6]) == [
      ("weak b2/device", 1, 2),
      ("weak b2/device", 2, 4),
      ("weak b2/device", 4, 8),
      ("strong B4", 1, 4),
      ("strong B4", 2, 4),
      ("strong B4", 4, 4),
      ("strong B6", 1, 6),
      ("strong B6", 2, 6),  # 4 does not divide 6
  ]


@pytest.mark.slow
def test_parallelism_forms_side_by_side(tmp_path):
  """--parallelism=jit,shard_map,pmap: one study per form and forms.md / forms.json; the
  explicit forms exchange the gradient tree plus the BatchNorm and DAFS statistics and the
  metrics (a few KB), the same in both; the jit form's partitioner exchanges at least that."""
  out = tmp_path / "forms"
  run_module(
      "cras_jax.scaling",
      *TINY,
      "--devices=2",
      "--batch_per_device=2",
      "--modes=train_cached",
      "--measure=",
      "--parallelism=jit,shard_map,pmap",
      f"--out={out}",
      timeout=1200,
  )
  rows = json.loads((out / "forms.json").read_text())
  assert (out / "forms.md").read_text().count("| train_cached |") == 3
  for form in ("jit", "shard_map", "pmap"):
    assert json.loads((out / form / "scaling.json").read_text())["parallelism"] == form
  reduced = {r["form"]: r["collectives"]["all-reduce"]["operand_bytes"] for r in rows}
  _, grad_bytes = _gradients(32, 3)
  assert reduced["shard_map"] == reduced["pmap"]
  assert grad_bytes <= reduced["shard_map"] < grad_bytes + 4096
  assert reduced["jit"] >= reduced["shard_map"]
