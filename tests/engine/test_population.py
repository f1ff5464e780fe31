"""A population of heads: member k of the population step equals the single-run step of the
same seed and settings (bit for bit with the members mapped, up to float32 rounding with them
vmapped), on one shared batch or on its own batches (a per-member data order), the centre step
likewise, and the population sharded on 4 simulated devices (mesh ("model", "data")) equals it
on 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.engine import population, steps
from tests import golden
from tests.conftest import run_on_cpu_devices

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


# With the members vmapped, leaves that are not trained are equal bit for bit; the trained
# ones are not: the vmapped step is another XLA program (the members' products batched, the reductions over one more
# axis), whose float32 sums round in another order (docs/experiments.md "Populations"). Biases whose
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


def feature_batches(spec, rng, n: int = 3) -> list[dict]:
  return [
      {
          "features": rng.normal(size=(8, spec.num_patches, 32)).astype(np.float32),
          "label": rng.integers(0, 3, 8).astype(np.int32),
      }
      for _ in range(n)
  ]


def member_setup():
  spec = steps.ModelSpec(tiny_config(), 3)
  rng = np.random.default_rng(0)
  centres = jnp.asarray(rng.normal(size=(3, spec.num_patches, 32)), jnp.float32)
  batches = feature_batches(spec, rng)
  members = []
  for values in MEMBERS:
    cfg = tiny_config(values)
    s = steps.create_state(spec, None, values["seed"])
    members.append(s.replace(centres=centres, hparams=steps.hparams_from_config(cfg)))
  return spec, centres, batches, population.stack(members)


def single_runs(centres, batches):
  """Each member's config trained alone (its own spec, hyper-parameters from its config) on
  `batches`, or on `batches[k]` for member k where it is a list per member."""
  out = []
  for k, values in enumerate(MEMBERS):
    alone_spec = steps.ModelSpec(tiny_config(values), 3)
    alone = steps.create_state(alone_spec, None, values["seed"]).replace(centres=centres)
    alone_step = jax.jit(steps.make_train_step(alone_spec))
    for b in batches[k] if isinstance(batches[0], list) else batches:
      alone, metrics = alone_step(alone, b)
    out.append((alone, metrics))
  return out


def own_batches(spec):
  """A per-member data order: member k's own batches, and the population's batches (member k's
  on row k of a leading member axis)."""
  rng = np.random.default_rng(1)
  own = [feature_batches(spec, rng) for _ in MEMBERS]
  stacked = [
      {key: np.stack([own[k][i][key] for k in range(len(MEMBERS))]) for key in own[0][i]}
      for i in range(len(own[0]))
  ]
  return own, stacked


def train_population(spec, state, batches, batching, per_member=False):
  if batching == "map":  # the single run's step (jitted as a single run jits it) per member
    step = population.make_member_loop(jax.jit(steps.make_train_step(spec)), per_member=per_member)
  else:
    step = jax.jit(population.make_population_step(spec, per_member))
  for b in batches:
    state, metrics = step(state, b)
  return state, metrics


def assert_bit_identical(state, metrics, alone_runs):
  for k, (alone, alone_metrics) in enumerate(alone_runs):
    got, want = flat(population.member(state, k).checkpointable()), flat(alone.checkpointable())
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"member {k}: {key}")
    for key, v in alone_metrics.items():
      np.testing.assert_array_equal(metrics[key][k], v, err_msg=f"member {k}: {key}")


def test_mapped_member_is_bit_identical_to_its_single_run():
  spec, centres, batches, state = member_setup()
  state, metrics = train_population(spec, state, batches, "map")
  assert metrics["loss"].shape == (len(MEMBERS),)
  assert_bit_identical(state, metrics, single_runs(centres, batches))


@pytest.mark.slow
def test_mapped_member_on_its_own_batches_is_bit_identical_to_its_single_run():
  """A per-member data order: member k trains on row k of each batch, as its single run
  trains on its own batches, bit for bit."""
  spec, centres, _, state = member_setup()
  own, stacked = own_batches(spec)
  state, metrics = train_population(spec, state, stacked, "map", per_member=True)
  assert metrics["loss"].shape == (len(MEMBERS),)
  assert_bit_identical(state, metrics, single_runs(centres, own))


@pytest.mark.slow
def test_vmapped_member_equals_its_single_run_up_to_rounding():
  spec, centres, batches, state = member_setup()
  state, metrics = train_population(spec, state, batches, "vmap")
  assert metrics["loss"].shape == (len(MEMBERS),)
  for k, (values, (alone, _)) in enumerate(zip(MEMBERS, single_runs(centres, batches))):
    got = flat(population.member(state, k).checkpointable())
    hp = {k: float(v) for k, v in steps.hparams_from_config(tiny_config(values)).items()}
    assert_member_matches(got, flat(alone.checkpointable()), hp, len(batches), f"member {k}")


@pytest.mark.slow
def test_vmapped_member_on_its_own_batches_equals_its_single_run_up_to_rounding():
  spec, centres, _, state = member_setup()
  own, stacked = own_batches(spec)
  state, metrics = train_population(spec, state, stacked, "vmap", per_member=True)
  assert metrics["loss"].shape == (len(MEMBERS),)
  for k, (values, (alone, _)) in enumerate(zip(MEMBERS, single_runs(centres, own))):
    got = flat(population.member(state, k).checkpointable())
    hp = {k: float(v) for k, v in steps.hparams_from_config(tiny_config(values)).items()}
    assert_member_matches(got, flat(alone.checkpointable()), hp, len(stacked), f"member {k}")


@pytest.mark.slow
def test_per_member_images_go_through_the_backbone_once_per_member():
  """Training on images with a per-member order ("map" on the population's devices): member k
  equals its single-run step on the backbone's features of its own images, bit for bit."""
  from tests import tiny_step

  spec, _, state, batch = tiny_step.setup()
  members = [state] + [
      steps.create_state(spec, state.backbone, s).replace(centres=state.centres) for s in (1, 2)
  ]
  devices = population.PopulationDevices(1)
  pstate = devices.put_population(jax.device_get(population.stack(members)))
  rng = np.random.default_rng(2)
  images = np.stack([rng.permutation(batch["image"]) for _ in members])
  labels = np.stack([rng.permutation(batch["label"]) for _ in members])
  step = devices.population_step(spec, pstate, "map", per_member=True)
  pstate, metrics = step(pstate, devices.put_member_batch({"image": images, "label": labels}))
  embed = devices.jit_predict(spec.features)
  single = devices.jit_train(steps.make_train_step(spec))
  for k, alone in enumerate(members):
    features = embed(alone.backbone, devices.put_batch({"image": images[k]})["image"])
    b = {"features": features, "label": devices.put_batch({"label": labels[k]})["label"]}
    alone, alone_metrics = single(devices.put_replicated(jax.device_get(alone)), b)
    got = flat(population.member(pstate, k).checkpointable())
    want = flat(alone.checkpointable())
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"member {k}: {key}")
    np.testing.assert_array_equal(metrics["loss"][k], alone_metrics["loss"])


def test_mapped_centre_step_equals_the_single_one_per_member():
  spec, _, batches, state = member_setup()
  heads = state.replace(backbone=None)
  single = jax.jit(steps.make_centre_step(spec))
  mapped = population.make_member_centre_loop(single)
  t, labels = batches[0]["features"], batches[0]["label"]
  weights, centre_w = np.ones(8, np.float32), np.linspace(0.5, 1.0, 8).astype(np.float32)
  zeros = lambda lead: tuple(jnp.zeros(lead + s) for s in ((3, spec.num_patches, 32), (3,), (), ()))
  got = mapped(zeros((len(MEMBERS),)), heads, t, labels, weights, centre_w)
  for k in range(len(MEMBERS)):
    want = single(zeros(()), population.member(state, k), t, labels, weights, centre_w)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g)[k], np.asarray(w))


def test_auto_batching_maps_on_one_cpu_device_and_vmaps_elsewhere():
  assert population.resolve_batching("auto", 1, "cpu") == "map"
  assert population.resolve_batching("auto", 2, "cpu") == "vmap"
  assert population.resolve_batching("auto", 1, "gpu") == "vmap"
  assert population.resolve_batching("vmap", 1, "cpu") == "vmap"
  with pytest.raises(ValueError, match="population_model_shards=2"):
    population.resolve_batching("map", 2, "cpu")
  with pytest.raises(ValueError, match="choose one of"):
    population.resolve_batching("loop", 1, "cpu")


SCRIPT = r"""
import sys
import jax, numpy as np
from cras_jax.engine import population, steps
from tests import tiny_step

shards, per_member = int(sys.argv[2]), sys.argv[3] == "per_member"
spec, _, state, batch = tiny_step.setup()
members = [state] + [
    steps.create_state(spec, state.backbone, s).replace(centres=state.centres)
    for s in (1, 2, 3)
]
devices = population.PopulationDevices(shards)
pstate = devices.put_population(jax.device_get(population.stack(members)))
assert len(pstate.params["adapter"]["fc0"]["kernel"].sharding.device_set) == jax.device_count()
step = devices.population_step(spec, pstate, "vmap", per_member=per_member)
if per_member:  # member k's own batch: the shared one's rows in k's order
  rng = np.random.default_rng(0)
  orders = [rng.permutation(len(batch["label"])) for _ in members]
  batch = {key: np.stack([v[o] for o in orders]) for key, v in batch.items()}
  pstate, metrics = step(pstate, devices.put_member_batch(batch))
else:
  pstate, metrics = step(pstate, devices.put_batch(batch))
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
    {"params": pstate.params, "batch_stats": pstate.batch_stats, "metrics": metrics})}
np.savez(sys.argv[1], **flat)
print("devices", jax.device_count(), "mesh", dict(devices.mesh.shape))
"""


def run(n, shards, path, order="shared"):
  assert f"devices {n}" in run_on_cpu_devices(n, SCRIPT, path, shards, order)
  return dict(np.load(path))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["shared", "per_member"])
def test_population_on_four_devices_equals_one(tmp_path, order):
  one = run(1, 1, tmp_path / "one.npz", order)
  grid = run(4, 2, tmp_path / "grid.npz", order)  # 2 members per device pair, batch split in two
  t = tiny_config().train
  golden.assert_one_step_equal(grid, one, t.lr_adapter, t.lr_disc)
  assert grid["['metrics']['loss']"].shape == (4,)
