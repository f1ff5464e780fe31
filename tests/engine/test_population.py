"""A population of heads: member k of the vmapped step equals the single-run step of the same
seed and settings, and the population sharded on 4 simulated devices (mesh ("model", "data"))
equals it on 1."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.configs import demo
from cras_jax.engine import population, steps
from tests import golden

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEMBERS = [
    {"seed": 0},
    {"seed": 1, "model.noise_sigma": 0.3},
    {"seed": 2, "train.lr_disc": 1e-3, "model.dafs_beta": 0.5},
]


def tiny_config(values=None):
  cfg = demo.get_config()
  cfg.data.crop = 64
  cfg.model.pre_embed_dim = 48
  cfg.model.embed_dim = 32
  for field, v in (values or {}).items():
    if field != "seed":
      section, key = field.split(".")
      cfg[section][key] = v
  return cfg


def flat(tree) -> dict:
  return {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


# Leaves that are not trained are equal bit for bit; the trained ones are not: the vmapped
# step is another XLA program (the members' products batched, the reductions over one more
# axis), whose float32 sums round in another order (README "Populations"). Biases whose
# gradient is zero in exact arithmetic (`golden.assert_one_step_equal`) take Adam steps of
# rounding noise of up to +-lr each step, and the BatchNorm means that follow them as much.
EXACT = ("['step']", "['rng']", "['centres']", "['noise_std']")
ZERO_GRAD = {
    "['adapter']['fc0']['bias']": "lr_adapter",
    "['disc']['block1_fc']['bias']": "lr_disc",
    "['disc']['block2_fc']['bias']": "lr_disc",
    "['disc']['block1_bn']['mean']": "lr_disc",
    "['disc']['block2_bn']['mean']": "lr_disc",
}


def assert_member_matches(got: dict, want: dict, hparams: dict, n_steps: int, label: str):
  """got/want: flattened checkpointable trees of a member and of its single run."""
  assert got.keys() == want.keys()
  for key in want:
    msg = f"{label}: {key}"
    if key in EXACT:
      np.testing.assert_array_equal(got[key], want[key], err_msg=msg)
      continue
    lr = next((hparams[v] for k, v in ZERO_GRAD.items() if key.endswith(k)), None)
    if lr is not None and not key.startswith("['opt_state']"):
      np.testing.assert_allclose(got[key], want[key], atol=2 * n_steps * lr, err_msg=msg)
      continue
    scale = max(1.0, float(np.abs(want[key]).max()))
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5 * scale, err_msg=msg)


def test_member_equals_its_single_run():
  spec = steps.ModelSpec(tiny_config(), 3)
  rng = np.random.default_rng(0)
  centres = jnp.asarray(rng.normal(size=(3, spec.num_patches, 32)), jnp.float32)
  batches = [
      {
          "features": rng.normal(size=(8, spec.num_patches, 32)).astype(np.float32),
          "label": rng.integers(0, 3, 8).astype(np.int32),
      }
      for _ in range(3)
  ]
  members = []
  for values in MEMBERS:
    cfg = tiny_config(values)
    s = steps.create_state(spec, None, values["seed"])
    members.append(s.replace(centres=centres, hparams=steps.hparams_from_config(cfg)))
  state = population.stack(members)
  step = jax.jit(population.make_population_step(spec))
  for b in batches:
    state, metrics = step(state, b)
  assert metrics["loss"].shape == (len(MEMBERS),)
  for k, values in enumerate(MEMBERS):
    alone_spec = steps.ModelSpec(tiny_config(values), 3)
    alone = steps.create_state(alone_spec, None, values["seed"]).replace(centres=centres)
    alone_step = jax.jit(steps.make_train_step(alone_spec))
    for b in batches:
      alone, _ = alone_step(alone, b)
    got = flat(population.member(state, k).checkpointable())
    hp = {k: float(v) for k, v in steps.hparams_from_config(tiny_config(values)).items()}
    assert_member_matches(got, flat(alone.checkpointable()), hp, len(batches), f"member {k}")


SCRIPT = r"""
import sys
import jax, numpy as np
from cras_jax.engine import population, steps
from tests import tiny_step

shards = int(sys.argv[2])
spec, _, state, batch = tiny_step.setup()
members = [state] + [
    steps.create_state(spec, state.backbone, s).replace(centres=state.centres)
    for s in (1, 2, 3)
]
devices = population.PopulationDevices(shards)
pstate = devices.put_population(jax.device_get(population.stack(members)))
assert len(pstate.params["adapter"]["fc0"]["kernel"].sharding.device_set) == jax.device_count()
step = devices.jit_population(population.make_population_step(spec), pstate)
pstate, metrics = step(pstate, devices.put_batch(batch))
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
    {"params": pstate.params, "batch_stats": pstate.batch_stats, "metrics": metrics})}
np.savez(sys.argv[1], **flat)
print("devices", jax.device_count(), "mesh", dict(devices.mesh.shape))
"""


def run(n, shards, path):
  env = dict(
      os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
  )
  out = subprocess.run(
      [sys.executable, "-c", SCRIPT, str(path), str(shards)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"devices {n}" in out.stdout
  return dict(np.load(path))


def test_population_on_four_devices_equals_one(tmp_path):
  one = run(1, 1, tmp_path / "one.npz")
  grid = run(4, 2, tmp_path / "grid.npz")  # 2 members per device pair, batch split in two
  t = tiny_config().train
  golden.assert_one_step_equal(grid, one, t.lr_adapter, t.lr_disc)
  assert grid["['metrics']['loss']"].shape == (4,)
