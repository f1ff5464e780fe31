"""A population run end to end on the tiny demo: every member's results, an exact resume after
SIGKILL, member k against the single run of its config, and the config check's refusals."""

import json
import os
import time

import jax
import numpy as np
import pytest

from cras_jax.configs import demo
from cras_jax.runs import config_check, trained
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
def test_member_is_bit_identical_to_the_single_run_of_its_config(population_run):
  """On the CPU the population runs the single run's compiled step per member
  (`train.population_batching` "auto" -> "map"): centres, training and scores are the run
  alone's, bit for bit."""
  base = population_run
  out = run_main(
      base / "alone",
      base / "data",
      base / "cache",
      "--config.train.epochs=2",
      "--config.seed=1",
      "--config.train.data_seed=0",
  )
  assert "resumed" not in out
  _, pop = final_params(base / "pop")
  _, alone = final_params(base / "alone")
  member = flat(jax.tree.map(lambda x: np.asarray(x)[1], pop))
  alone = flat(alone)
  assert member.keys() == alone.keys()
  for key in alone:
    np.testing.assert_array_equal(member[key], alone[key], err_msg=key)
  got = json.load(open(base / "pop" / "results" / "seed1" / "metrics_final.json"))["metrics"]
  assert got == json.load(open(base / "alone" / "results" / "metrics_final.json"))["metrics"]
  scores = (base / "pop" / "results" / "seed1" / "scores_final.csv").read_text()
  assert scores == (base / "alone" / "results" / "scores_final.csv").read_text()


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
