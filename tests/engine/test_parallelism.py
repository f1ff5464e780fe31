"""train.parallelism: the jit, shard_map and pmap forms of the steps (engine/sharding.py) on 4
simulated CPU devices train to the same parameters and give the same scores, and each equals
the whole-batch step on one device.

Tolerance: 1e-5 relative, as for one step on 4 devices against 1 (tests/golden.py), because
the forms differ only in how the batch's sums are split (per-device partial sums combined by
an all-reduce, in another order than one device's sum); biases whose exact gradient is zero
take Adam steps of rounding noise (up to ±lr per step), compared within 2 lr per step.
"""

import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.engine import sharding
from cras_jax.perf import hlo
from tests.conftest import run_on_cpu_devices

STEPS = 3

SCRIPT = r"""
import json, sys
import jax, numpy as np
from cras_jax.engine import sharding, steps
from cras_jax.perf import hlo
from cras_jax.scoring import scoring
from tests import tiny_step

# Without scoring only the heads are stepped (on stored features): the smallest backbone.
spec, devices, state0, batch = tiny_step.setup(None if sys.argv[4] == "score" else "resnet18")
host_state = jax.device_get(state0)
per_image = steps.ModelSpec(spec.config.copy_and_resolve_references(), 3, spec.grid)
per_image.heads = per_image.heads.__class__(**{**per_image.heads.__dict__, "per_image_matching": True})
rng = np.random.default_rng(1)
features = rng.normal(size=(8, spec.num_patches, spec.heads.embed_dim)).astype(np.float32)
out, facts = {}, {}
for form in sys.argv[2].split(","):
  d = sharding.Devices(parallelism=form)
  flat = {"initial_tail": np.asarray(host_state.params["disc"]["tail"]["kernel"])}
  batches = {"images": batch, "features": {"features": features, "label": batch["label"]}}
  for kind in sys.argv[3].split(","):
    b = batches[kind]
    state = d.put_replicated(host_state)
    step = d.compile_train(spec)
    if kind == sys.argv[3].split(",")[0]:
      facts[form] = hlo.collectives(step.lower(state, d.put_batch(b)).compile().as_text(), d.count)
    for _ in range(%(steps)d):
      state, metrics = step(state, d.put_batch(b))
    tree = {"params": state.params, "batch_stats": state.batch_stats, "metrics": metrics}
    for k, v in jax.tree_util.tree_leaves_with_path(tree):
      flat[f"{kind}{jax.tree_util.keystr(k)}"] = np.asarray(v)
  for name, s in (("batch", spec), ("per_image", per_image)) if sys.argv[4] == "score" else ():
    scorer = scoring.Scorer(s, d, 8, state=d.put_replicated(host_state))
    res = scorer.predict_step(scorer.svars, d.put_batch({"image": batch["image"]})["image"])
    for k in ("scores", "maps", "cls"):
      flat[f"score_{name}_{k}"] = np.asarray(res[k])
  out[form] = flat
np.savez(sys.argv[1], **{f"{form}|{k}": v for form, flat in out.items() for k, v in flat.items()})
with open(sys.argv[1] + ".json", "w") as f:
  json.dump(facts, f)
print("devices", devices.count)
""" % {"steps": STEPS}


def run(n: int, forms: str, kinds: str, path, score: bool = True) -> tuple[dict, dict]:
  stdout = run_on_cpu_devices(n, SCRIPT, path, forms, kinds, "score" if score else "-", timeout=900)
  assert f"devices {n}" in stdout
  res: dict = {}
  for key, v in np.load(path).items():
    form, k = key.split("|", 1)
    res.setdefault(form, {})[k] = v
  import json

  with open(str(path) + ".json") as f:
    return res, json.load(f)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
  """The three forms on 2 devices, training on stored features (the steps' collectives are
  those of the heads): the fast tier's comparison."""
  path = tmp_path_factory.mktemp("forms") / "two.npz"
  return run(2, ",".join(sharding.FORMS), "features", path, score=False)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
  """The three forms on 4 devices: training on stored features and scoring (the backbone
  compiled once per form and matching)."""
  path = tmp_path_factory.mktemp("forms") / "four.npz"
  return run(4, ",".join(sharding.FORMS), "features", path)


def assert_equal(actual: dict, desired: dict):
  t = demo.get_config().train  # the rates the steps used
  # Zero-gradient biases drift by rounding-noise Adam steps (up to 2 lr per step here); the
  # BatchNorm after such a Linear layer sees the drift in its batch mean, and its running
  # mean keeps momentum (0.1) x that.
  drift = {
      "['params']['adapter']['fc0']['bias']": 2 * STEPS * t.lr_adapter,
      "['params']['disc']['block1_fc']['bias']": 2 * STEPS * t.lr_disc,
      "['params']['disc']['block2_fc']['bias']": 2 * STEPS * t.lr_disc,
      "['batch_stats']['disc']['block1_bn']['mean']": 0.1 * 2 * STEPS * t.lr_disc,
      "['batch_stats']['disc']['block2_bn']['mean']": 0.1 * 2 * STEPS * t.lr_disc,
  }
  assert actual.keys() == desired.keys()
  for k in desired:
    if k.startswith("score_") and k.endswith("_cls"):
      np.testing.assert_array_equal(actual[k], desired[k], err_msg=k)
      continue
    path = k[k.find("[") :] if "[" in k else k  # "features['params']..." -> "['params']..."
    scale = max(1.0, float(np.abs(desired[k]).max()))
    atol = drift.get(path, 1e-5 * scale)
    np.testing.assert_allclose(actual[k], desired[k], atol=atol, rtol=1e-5, err_msg=k)


def check_forms_agree(res: dict) -> None:
  for form in ("shard_map", "pmap"):
    assert_equal(res[form], res["jit"])
  # The steps did train (the comparison is not of untouched parameters).
  trained = res["jit"]["features['params']['disc']['tail']['kernel']"]
  assert np.abs(trained - res["jit"]["initial_tail"]).max() > 10 * STEPS * 1e-5


def test_shard_map_and_pmap_train_like_jit_on_two_devices(two):
  check_forms_agree(two[0])


@pytest.mark.slow
def test_shard_map_and_pmap_train_and_score_like_jit_on_four_devices(four):
  res, _ = four
  assert any(k.startswith("score_per_image") for k in res["jit"])
  check_forms_agree(res)


def test_per_device_forms_exchange_only_all_reduces(two):
  """The explicit forms average BatchNorm and DAFS statistics, gradients and metrics with
  all-reduces only; the jit form's partitioned step has no other exchange either (the
  discriminator's logits stay on the device of their rows)."""
  _, facts = two
  for form, items in facts.items():
    kinds = {c["kind"] for c in items}
    assert kinds == {"all-reduce"}, (form, hlo.summarise_collectives(items))


@pytest.mark.slow
def test_each_form_with_the_backbone_on_four_devices_equals_one_device(tmp_path):
  four, facts = run(4, ",".join(sharding.FORMS), "images,features", tmp_path / "four.npz")
  one, _ = run(1, "jit", "images,features", tmp_path / "one.npz")
  for form in sharding.FORMS:
    assert_equal(four[form], one["jit"])
    assert {c["kind"] for c in facts[form]} == {"all-reduce"}, form
