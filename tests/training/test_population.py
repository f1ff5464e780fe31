"""A population run end to end on the tiny demo: every member's results, an exact resume after
SIGKILL, member k against the single run of its config (its own data order on the demo's
stored features, or the base seed's shared one), what the spread spans, and the config
check's refusals."""

import json
import os
import time

import jax
import numpy as np
import pytest

from cras_jax.config import check as config_check
from cras_jax.config import population as population_lib
from cras_jax.configs import demo
from cras_jax.runs import trained
from cras_jax.training import loop
from tests.training.test_train import final_params, run_main

POP = ["--config.train.population=seed=0,1", "--config.train.epochs=2"]


def flat(tree) -> dict:
  return {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("population")
  run_main(base / "pop", base / "data", base / "cache", *POP)
  return base


@pytest.mark.slow
def test_population_writes_each_members_results(population_run):
  results = population_run / "pop" / "results"
  for member in ("seed0", "seed1"):
    for name in (
        "metrics_final.json",
        "metrics_final.csv",
        "scores_final.csv",
        "thresholds.json",
    ):
      assert (results / member / name).exists(), (member, name)
    log = [json.loads(l) for l in open(results / member / "train_log.jsonl")]
    assert log[-1]["step"] == 6 and np.isfinite(log[-1]["loss"])
  summary = json.load(open(results / "population_final.json"))
  assert summary["members"] == ["seed0", "seed1"]
  # The demo trains on stored features: each member draws its own data order.
  assert summary["variance_sources"] == "initialisation + noise + data order"
  assert (
      "Variance sources: initialisation + noise + data order"
      in (results / "population_final.md").read_text()
  )
  per = [json.load(open(results / m / "metrics_final.json"))["metrics"] for m in ("seed0", "seed1")]
  for c, row in summary["spread"].items():
    want = [p[c]["i_auroc"] for p in per]
    assert row["i_auroc"]["mean"] == pytest.approx(np.mean(want))
    assert row["i_auroc"]["std"] == pytest.approx(np.std(want, ddof=1))
  mean = json.load(open(results / "metrics_final.json"))
  assert mean["members"] == ["seed0", "seed1"] and mean["protocol"] == "final epoch"


@pytest.mark.slow
def test_population_sigkill_then_rerun_ends_bit_identical(population_run):
  base = population_run
  work = base / "killed"
  args = [*POP, "--config.train.checkpoint_every_steps=1"]
  proc = run_main(work, base / "data", base / "cache", *args, wait=False)
  ckpt = work / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpt.exists() and "3" in os.listdir(ckpt):
      break
    time.sleep(0.001)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.kill()
  proc.communicate(timeout=60)
  assert not (work / "results" / "population_final.json").exists()
  out = run_main(work, base / "data", base / "cache", *args)
  assert "resumed from step" in out
  step_a, a = final_params(base / "pop")
  step_b, b = final_params(work)
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  for m in ("seed0", "seed1"):
    got = json.load(open(work / "results" / m / "metrics_final.json"))["metrics"]
    assert got == json.load(open(base / "pop" / "results" / m / "metrics_final.json"))["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "order,alone_args",
    [
        ("per_member", []),  # member seed1 reads the batches of the run `seed=1` alone
        ("shared", ["--config.train.data_seed=0"]),  # ... of the base seed 0
    ],
)
def test_member_is_bit_identical_to_the_single_run_of_its_config(population_run, order, alone_args):
  """On the CPU the population runs the single run's compiled step per member
  (`train.population_batching` "auto" -> "map"): centres, training and scores are the run
  alone's, bit for bit, with a per-member data order (the demo's default on stored features)
  and with a shared one."""
  base = population_run
  pop_dir = base / "pop"
  if order == "shared":
    pop_dir = base / "pop_shared"
    run_main(
        pop_dir, base / "data", base / "cache", *POP, "--config.train.member_data_order=shared"
    )
  alone_dir = base / ("alone" if order == "per_member" else "alone_shared")
  out = run_main(
      alone_dir,
      base / "data",
      base / "cache",
      "--config.train.epochs=2",
      "--config.seed=1",
      *alone_args,
  )
  assert "resumed" not in out
  summary = json.load(open(pop_dir / "results" / "population_final.json"))
  want = "initialisation + noise" + (" + data order" if order == "per_member" else "")
  assert summary["variance_sources"] == want
  _, pop = final_params(pop_dir)
  _, alone = final_params(alone_dir)
  member = flat(jax.tree.map(lambda x: np.asarray(x)[1], pop))
  alone = flat(alone)
  assert member.keys() == alone.keys()
  for key in alone:
    np.testing.assert_array_equal(member[key], alone[key], err_msg=key)
  got = json.load(open(pop_dir / "results" / "seed1" / "metrics_final.json"))["metrics"]
  assert got == json.load(open(alone_dir / "results" / "metrics_final.json"))["metrics"]
  scores = (pop_dir / "results" / "seed1" / "scores_final.csv").read_text()
  assert scores == (alone_dir / "results" / "scores_final.csv").read_text()


class _HostDevices:
  """One process, one device; batches stay host arrays."""

  count = 1
  local_slice = staticmethod(lambda n: slice(0, n))
  put_batch = put_member_batch = staticmethod(lambda batch: batch)


def test_per_member_batches_are_each_members_single_run_batches():
  """With one data-order seed per member, row k of every batch (stored features and labels)
  is the batch the single run of seed k reads at that step, across an epoch's end."""
  n, bs = 13, 4
  cache = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
  labels = np.arange(n, dtype=np.int32) % 3
  devices = _HostDevices()
  batches = list(loop.train_batches(2, 7, [5, 6, 7], bs, devices, labels, cache))
  singles = {s: list(loop.train_batches(2, 7, s, bs, devices, labels, cache)) for s in (5, 6, 7)}
  assert [step for step, _ in batches] == list(range(2, 7))
  for i, (_, batch) in enumerate(batches):
    assert batch["features"].shape[0] == batch["label"].shape[0] == 3
    for k, s in enumerate((5, 6, 7)):
      want = singles[s][i][1]
      np.testing.assert_array_equal(batch["features"][k], want["features"])
      np.testing.assert_array_equal(batch["label"][k], want["label"])
  assert not all(np.array_equal(b["label"][0], b["label"][1]) for _, b in batches)


def test_per_member_order_is_the_default_only_on_stored_features():
  cfg = demo.get_config()
  cfg.train.population = "seed=0,1,2"
  assert cfg.train.cache_features and population_lib.data_order(cfg) == "per_member"
  members = population_lib.member_configs(cfg)
  assert [population_lib.order_seed(c) for _, c in members] == [0, 1, 2]
  assert all(c.train.data_seed == -1 for _, c in members)  # each the single run `seed=k`
  cfg.train.cache_features = False  # the backbone in the step: per-member batches cost it S times
  assert population_lib.data_order(cfg) == "shared"
  assert [population_lib.order_seed(c) for _, c in population_lib.member_configs(cfg)] == [0] * 3
  cfg.train.cache_features, cfg.train.data_seed = True, 5  # a pinned data seed: one order
  assert population_lib.data_order(cfg) == "shared"
  cfg.train.member_data_order, cfg.model.weights = "per_member", "random"
  members = population_lib.member_configs(cfg)
  assert [population_lib.order_seed(c) for _, c in members] == [0, 1, 2]
  assert [population_lib.backbone_seed(c) for _, c in members] == [5] * 3  # one random backbone


def test_population_tables_name_what_the_spread_spans(tmp_path):
  from cras_jax.training import population

  cfg = demo.get_config()
  cfg.train.population = "seed=0,1"
  names = ["seed0", "seed1"]
  tables = [{"a": {"i_auroc": v}, "mean": {"i_auroc": v}} for v in (0.8, 0.9)]
  (tmp_path / "results" / "seed0").mkdir(parents=True)
  (tmp_path / "results" / "seed0" / "metrics_final.json").write_text('{"step": 6}')
  sources = population_lib.variance_sources(c for _, c in population_lib.member_configs(cfg))
  assert sources == "initialisation + noise + data order"
  population.write_summary(tables, names, str(tmp_path), "final", cfg, sources)
  results = tmp_path / "results"
  assert json.load(open(results / "population_final.json"))["variance_sources"] == sources
  assert json.load(open(results / "metrics_final.json"))["variance_sources"] == sources
  assert f"Variance sources: {sources}" in (results / "population_final.md").read_text()
  rows = (results / "population_final.csv").read_text().splitlines()
  assert rows[0].endswith(",n,variance_sources") and rows[1].endswith(f",{sources}")
  cfg.train.member_data_order = "shared"
  shared = population_lib.variance_sources(c for _, c in population_lib.member_configs(cfg))
  assert shared == "initialisation + noise"


def test_config_check_refuses_fields_a_population_cannot_vary():
  cfg = demo.get_config()
  cfg.train.population = "seed=0,1;model.hpi=True,False"
  (problem,) = config_check.problems_of(cfg, check_files=False)
  assert "'model.hpi' cannot vary within a population" in problem
  cfg.train.population = "seed=0,1;train.lr_disc=0.001,-1"
  problems = config_check.problems_of(cfg, check_files=False)
  assert [p.split(":")[0] for p in problems] == [
      "train.population member seed0_lr_disc-1",
      "train.population member seed1_lr_disc-1",
  ]
  assert all("train.lr_disc=-1" in p for p in problems)
  cfg.train.population = "seed=0,1"
  cfg.setting = "single_class"
  assert any("one multi-class model per member" in p for p in config_check.problems_of(cfg, False))


@pytest.mark.parametrize("value", ["per-member", "PER_MEMBER", "", None])
def test_config_check_names_a_bad_data_order(value):
  cfg = demo.get_config()
  cfg.train.population = "seed=0,1"
  cfg.train.member_data_order = value
  (problem,) = config_check.problems_of(cfg, check_files=False)
  assert problem == (
      f"train.member_data_order={value!r}: choose one of 'auto', 'shared', 'per_member'"
  )


def test_config_check_refuses_a_per_member_order_with_a_pinned_data_seed():
  cfg = demo.get_config()
  cfg.train.population = "seed=0,1"
  cfg.train.member_data_order = "per_member"
  cfg.train.data_seed = 3
  (problem,) = config_check.problems_of(cfg, check_files=False)
  assert problem.startswith("train.member_data_order='per_member' with train.data_seed=3:")
  assert "set train.data_seed=-1" in problem and "train.member_data_order='shared'" in problem
  cfg.model.weights = "random"  # then the data seed seeds the members' one random backbone
  assert config_check.problems_of(cfg, check_files=False) == []


@pytest.mark.slow
def test_each_member_has_its_own_tensorboard(population_run):
  from tensorboard.backend.event_processing import event_accumulator

  results = population_run / "pop" / "results"
  for member in ("seed0", "seed1"):
    acc = event_accumulator.EventAccumulator(str(results / member / "tensorboard"))
    acc.Reload()
    log = [json.loads(l) for l in open(results / member / "train_log.jsonl")]
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [e["step"] for e in log]
    np.testing.assert_allclose([e.value for e in losses], [e["loss"] for e in log], rtol=1e-6)
    metrics = json.load(open(results / member / "metrics_final.json"))["metrics"]
    (e,) = acc.Scalars("eval/mean/i_auroc")
    np.testing.assert_allclose(e.value, metrics["mean"]["i_auroc"], rtol=1e-6)
  assert not (population_run / "pop" / "tensorboard").exists()


@pytest.mark.slow
def test_a_member_loads_as_a_run_and_others_are_refused_with_the_fix(population_run):
  from cras_jax.base import errors

  work = str(population_run / "pop")
  _, pop = final_params(population_run / "pop")
  run = trained.load_run(work, member="seed1")
  assert run.member == "seed1" and run.config.seed == 1 and not run.config.train.population
  assert trained.run_home(run, work).endswith(os.path.join("results", "seed1"))
  got = flat(run.state.checkpointable()["params"])
  want = flat(jax.tree.map(lambda x: np.asarray(x)[1], pop)["params"])
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(errors.UserValueError, match=r"population of 2 models \(seed0, seed1\)"):
    trained.load_run(work)
  with pytest.raises(errors.UserValueError, match="--member=seed7 is not one of them"):
    trained.load_run(work, member="seed7")
  alone = str(population_run / "alone")
  if os.path.isdir(alone):
    with pytest.raises(errors.UserValueError, match="holds one model, not a population"):
      trained.load_run(alone, member="seed0")


@pytest.mark.slow
def test_predict_scores_a_member_with_its_thresholds(population_run, tmp_path):
  from tests.conftest import run_module

  work = population_run / "pop"
  images = sorted((population_run / "data").glob("*/test/*/*.png"))[:2]
  out = run_module(
      "cras_jax.predict",
      f"--workdir={work}",
      "--member=seed1",
      f"--output_dir={tmp_path}",
      *images,
  )
  assert "error" not in out.lower()
  assert len((tmp_path / "results.csv").read_text().splitlines()) == 3  # header + 2 images
  summary = json.load(open(tmp_path / "results.json"))
  thr = json.load(open(work / "results" / "seed1" / "thresholds.json"))
  assert summary["step"] == 6 and summary["thresholds"]["source"] != "none"
  assert summary["thresholds"]["image"] == thr["image_threshold"]


@pytest.mark.slow
def test_eval_mode_scores_every_member_as_at_the_end_of_training(population_run):
  work = population_run / "pop"
  run_main(work, population_run / "data", population_run / "cache", *POP, "--mode=eval")
  for member in ("seed0", "seed1"):
    got = json.load(open(work / "results" / member / "metrics_eval.json"))["metrics"]
    assert got == json.load(open(work / "results" / member / "metrics_final.json"))["metrics"]
  summary = json.load(open(work / "results" / "population_eval.json"))
  assert summary["members"] == ["seed0", "seed1"]


@pytest.mark.slow
def test_member_names_that_leave_the_workdir_are_refused(population_run, tmp_path):
  """A tampered checkpoint whose member names are paths: refused before any path is built."""
  import shutil

  from cras_jax.base import errors

  work = tmp_path / "tampered"
  shutil.copytree(population_run / "pop" / "checkpoints", work / "checkpoints")
  for step in os.listdir(work / "checkpoints"):
    path = work / "checkpoints" / step / "meta" / "metadata"
    meta = json.load(open(path))
    meta["population"] = ["../../outside", "seed1"]
    json.dump(meta, open(path, "w"))
  with pytest.raises(errors.UserValueError, match="member names are unusable"):
    trained.load_run(str(work), member="../../outside")


def test_population_centres_and_noise_scale_are_each_members_single_run_values():
  """The noise scale's arithmetic on a vector of members rounds differently from the single
  run's on its scalars (about a third of random cases differ on a CPU): each member's is
  computed on its own scalars."""
  import types

  import jax.numpy as jnp

  from cras_jax.training import population, train

  rng = np.random.default_rng(0)
  s, k, hw, d, n = 6, 3, 4, 5, 240
  acc = (
      jnp.asarray(rng.normal(size=(s, k, hw, d)), jnp.float32),
      jnp.asarray(rng.integers(1, 9, (s, k)), jnp.float32),
      jnp.asarray(rng.normal(size=s) * 50, jnp.float32),
      jnp.asarray(np.abs(rng.normal(size=s)) * 5000, jnp.float32),
  )
  dataset = types.SimpleNamespace(train=[None] * n, class_names=["a", "b", "c"])
  config = demo.get_config()
  state = types.SimpleNamespace(
      hparams={"noise_sigma": jnp.full((s,), 0.2)}, replace=lambda **kw: kw
  )
  names = [f"seed{i}" for i in range(s)]
  got = population.compute_centres(state, acc, dataset, config, names)
  for i in range(s):
    one = types.SimpleNamespace(replace=lambda **kw: kw)
    want = train.compute_centres(one, tuple(x[i] for x in acc), dataset, config)
    np.testing.assert_array_equal(np.asarray(got["noise_std"])[i], np.asarray(want["noise_std"]))
    np.testing.assert_array_equal(np.asarray(got["centres"])[i], np.asarray(want["centres"]))


def test_a_population_saved_before_the_data_order_switch_keeps_its_shared_order():
  """A run saved without `train.member_data_order` had a shared order: resuming it under
  "auto" on stored features (per member) is a result-changing difference; "auto" following
  `train.cache_features` changes nothing for a single run, whose order is its seed's."""
  from cras_jax.runs import workdir

  cfg = demo.get_config()
  cfg.train.population = "seed=0,1"
  saved = cfg.to_dict()
  del saved["train"]["member_data_order"]
  assert workdir.config_differences(saved, cfg.to_dict()) == [
      "train.member_data_order: saved 'shared', now 'per_member'"
  ]
  cfg.train.member_data_order = "shared"
  assert workdir.config_differences(saved, cfg.to_dict()) == []
  single = demo.get_config()
  uncached = demo.get_config()
  uncached.train.cache_features = False
  assert workdir.config_differences(single.to_dict(), uncached.to_dict()) == []


@pytest.mark.slow
def test_population_on_the_devices_equals_the_host_run(population_run):
  """data.on_device=true: each member gathers its own batches (a per-member order) on the
  devices; the final state is the host run's, bit for bit, and so are the results."""
  base = population_run
  work = base / "on_device"
  out = run_main(work, base / "data", base / "cache", *POP, "--config.data.on_device=true")
  assert "data.on_device=true: " in out
  step_a, a = final_params(base / "pop")
  step_b, b = final_params(work)
  assert step_a == step_b
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  for m in ("seed0", "seed1"):
    want = json.load(open(base / "pop" / "results" / m / "metrics_final.json"))["metrics"]
    got = json.load(open(work / "results" / m / "metrics_final.json"))["metrics"]
    assert got == want
