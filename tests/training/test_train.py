"""End to end on a tiny synthetic dataset: train, checkpoint, resume, evaluate.

The runs use the real entry point (`python -m cras_jax.main --config=configs/demo.py`)
with command-line overrides that shrink images, dataset and model.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(workdir, data_root, cache, *extra, wait=True):
  cmd = [
      sys.executable,
      "-m",
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={workdir}",
      f"--config.data.root={data_root}",
      f"--config.data.cache_dir={cache}",
      *TINY,
      *extra,
  ]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if not wait:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def metrics(workdir, tag="final"):
  with open(os.path.join(workdir, "results", f"metrics_{tag}.json")) as f:
    return json.load(f)


def final_params(workdir):
  import orbax.checkpoint as ocp

  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  path = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
  return steps[-1], ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def shared(tiny_run):
  """The session's `tiny_run` as (base, its workdir, its output): its data and feature cache are
  `base / "data"` and `base / "cache"`; the tests here write their own runs beside it."""
  base = tiny_run["workdir"].parent
  assert tiny_run["data_root"] == base / "data" and tiny_run["cache_dir"] == base / "cache"
  return base, tiny_run["workdir"], tiny_run["output"].read_text()


def test_uninterrupted_run_writes_everything(tiny_run):
  ref, out = tiny_run["workdir"], tiny_run["output"].read_text()
  m = metrics(ref)
  classes = ["chip", "fabric", "gear", "granite"]
  assert list(m["metrics"]) == classes + ["mean"]
  for row in m["metrics"].values():
    for key in ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro"):
      assert 0.0 <= row[key] <= 1.0
  assert m["protocol"] == "final epoch" and m["step"] == 9  # 24 images / 8 = 3 steps x 3 epochs
  assert os.path.exists(ref / "results" / "metrics_final.csv")
  assert len(os.listdir(ref / "results" / "heatmaps")) >= len(classes)
  assert "| mean |" in out
  lines = [json.loads(l) for l in open(ref / "train_log.jsonl")]
  assert lines[-1]["step"] == 9 and np.isfinite(lines[-1]["loss"])


@pytest.mark.slow
def test_sigint_then_rerun_resumes_to_identical_result(shared):
  base, ref, _ = shared
  work = base / "interrupted"
  proc = run_main(work, base / "data", base / "cache", "--config.train.epochs=3", wait=False)
  ckpt = work / "checkpoints"
  deadline = time.time() + 300
  # Interrupt as soon as the centres' checkpoint (step 0) exists: the training step is
  # compiling then, so the stop lands after step 1, mid-epoch.
  while time.time() < deadline and not (ckpt / "0").exists():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.001)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130 and "stopped at step" in out, out[-3000:]
  assert not (work / "results" / "metrics_final.json").exists()
  out2 = run_main(work, base / "data", base / "cache", "--config.train.epochs=3")
  assert "resumed from step" in out2
  assert assert_same_final_params(work, ref) == 9
  assert metrics(work)["metrics"] == metrics(ref)["metrics"]


@pytest.mark.slow
def test_eval_mode_scores_checkpoint_without_training(shared):
  base, ref, _ = shared
  out = run_main(ref, base / "data", base / "cache", "--mode=eval")
  assert "train:" not in out
  assert metrics(ref, "eval")["metrics"] == metrics(ref)["metrics"]


def test_eval_mode_without_checkpoint_is_a_clear_error(tmp_path):
  cmd = [
      sys.executable,
      "-m",
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path / 'empty'}",
      "--mode=eval",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "no checkpoint to evaluate" in out.stderr


@pytest.mark.slow
def test_feature_cache_matches_backbone_every_step(shared):
  """Training on cached backbone features follows the same trajectory as running the
  backbone in every step (float32 cache: equal up to rounding)."""
  base, _, _ = shared
  logs = {}
  for cache in ("true", "false"):
    work = base / f"cache_{cache}"
    run_main(
        work,
        base / "data",
        base / "cache",
        "--config.train.epochs=1",
        f"--config.train.cache_features={cache}",
        "--config.eval.num_heatmaps=0",
    )
    logs[cache] = [json.loads(l) for l in open(work / "train_log.jsonl")]
  assert [l["step"] for l in logs["true"]] == [l["step"] for l in logs["false"]] == [1, 2, 3]
  for a, b in zip(logs["true"], logs["false"]):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
  # A later run with the same data, backbone and settings reuses the stored features.
  out = run_main(
      base / "cache_again",
      base / "data",
      base / "cache",
      "--config.train.epochs=1",
      "--config.train.cache_features=true",
      "--config.eval.num_heatmaps=0",
  )
  assert "feature cache: reusing" in out
  again = [json.loads(l) for l in open(base / "cache_again" / "train_log.jsonl")]
  assert [l["loss"] for l in again] == [l["loss"] for l in logs["true"]]
  m_true = metrics(base / "cache_true")["metrics"]["mean"]
  m_false = metrics(base / "cache_false")["metrics"]["mean"]
  for key in ("i_auroc", "p_auroc"):
    assert abs(m_true[key] - m_false[key]) < 0.02


# ----------------------------------------------------------------------------- faults


def _copy_run(src, dst):
  import shutil

  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("results", ".lock"))


def assert_same_final_params(work, ref) -> int:
  """The two workdirs' last checkpoints are of the same step, with bit-identical parameters.
  -> that step."""
  step_a, params_a = final_params(ref)
  step_b, params_b = final_params(work)
  assert step_a == step_b
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  return step_a


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid_epoch", "during_save"])
def test_sigkill_then_rerun_ends_bit_identical(shared, when):
  base, ref, _ = shared
  work = base / f"killed_{when}"
  args = ["--config.train.epochs=3", "--config.train.checkpoint_every_steps=1"]
  proc = run_main(work, base / "data", base / "cache", *args, wait=False)
  ckpt = work / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt) if ckpt.exists() else []
    if when == "mid_epoch" and "4" in names:
      break
    if when == "during_save" and "2" in names and any("tmp" in n for n in names):
      break
    time.sleep(0.001)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.kill()  # SIGKILL: no handler runs
  proc.communicate(timeout=60)
  assert not (work / "results" / "metrics_final.json").exists()
  out = run_main(work, base / "data", base / "cache", *args)
  assert "resumed from step" in out
  assert_same_final_params(work, ref)
  assert metrics(work)["metrics"] == metrics(ref)["metrics"]


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_previous(shared):
  base, ref, _ = shared
  work = base / "truncated"
  _copy_run(ref, work)
  # Corrupt the newest checkpoint (step 9): truncate every data file of its state.
  state_dir = work / "checkpoints" / "9" / "state"
  for dirpath, _, files in os.walk(state_dir):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "r+b") as fh:
        fh.truncate(max(os.path.getsize(p) // 3, 0))
  out = run_main(work, base / "data", base / "cache", "--config.train.epochs=3")
  assert "checkpoint 9 is unreadable" in out and "using checkpoint 6" in out
  assert "resumed from step 6" in out
  assert_same_final_params(work, ref)


@pytest.mark.slow
def test_changed_config_is_refused_unless_allowed(shared):
  base, ref, _ = shared
  work = base / "changed"
  _copy_run(ref, work)
  cmd = [
      sys.executable,
      "-m",
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={work}",
      f"--config.data.root={base / 'data'}",
      f"--config.data.cache_dir={base / 'cache'}",
      *TINY,
      "--config.train.epochs=3",
      "--config.model.dafs_beta=0.5",
      "--config.train.lr_disc=0.001",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "model.dafs_beta: saved 0.3, now 0.5" in out.stderr
  assert "train.lr_disc: saved 0.0005, now 0.001" in out.stderr
  assert "--allow_config_change" in out.stderr
  # Fields that do not change results (logging, evaluation) are not refused.
  run_main(
      work,
      base / "data",
      base / "cache",
      "--config.train.epochs=3",
      "--config.train.log_every=3",
      "--config.eval.num_heatmaps=0",
  )
  out = run_main(
      work,
      base / "data",
      base / "cache",
      "--config.train.epochs=3",
      "--config.model.dafs_beta=0.5",
      "--allow_config_change",
  )
  assert "continuing with changed configuration" in out


@pytest.mark.slow
def test_second_run_on_same_workdir_is_refused(shared, tmp_path):
  from cras_jax.runs.workdir import WorkdirLock

  base, _, _ = shared
  work = tmp_path / "locked"
  with WorkdirLock(str(work)):
    cmd = [
        sys.executable,
        "-m",
        "cras_jax.main",
        "--config=configs/demo.py",
        f"--workdir={work}",
        *TINY,
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "is in use by a running job (pid" in out.stderr


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(shared, tmp_path, monkeypatch):
  import jax.numpy as jnp

  from cras_jax.configs import demo
  from cras_jax.engine import steps
  from cras_jax.training import train

  base, _, _ = shared
  make = steps.make_train_step

  def poisoned(spec):
    step = make(spec)

    def wrapped(state, batch):
      new_state, m = step(state, batch)
      m["loss"] = jnp.where(state.step == 4, jnp.nan, m["loss"])  # the 5th step diverges
      return new_state, m

    return wrapped

  monkeypatch.setattr(steps, "make_train_step", poisoned)
  cfg = demo.get_config()
  overrides = dict(a.lstrip("-").split("=", 1) for a in TINY)
  for key, value in overrides.items():
    node, leaf = cfg, key.split(".", 1)[1].split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = type(node[leaf[-1]])(value)
  cfg.data.root = str(base / "data")
  cfg.data.cache_dir = str(base / "cache")
  cfg.train.epochs = 3
  work = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
    train.train_and_evaluate(cfg, str(work))
  steps = sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
  assert steps[-1] == 3  # the epoch-1 checkpoint; nothing saved after the bad step


@pytest.mark.slow
def test_float16_feature_cache_stays_close(shared):
  """float16 storage (the paper configs' default) halves the cache; the training
  trajectory stays within float16's rounding of the float32 one."""
  base, _, _ = shared
  logs, outs = {}, {}
  for dtype in ("float16", "float32"):
    work = base / f"cache_{dtype}"
    outs[dtype] = run_main(
        work,
        base / "data",
        base / "cache",
        "--config.train.epochs=1",
        "--config.train.cache_features=true",
        f"--config.train.feature_cache_dtype={dtype}",
        "--config.eval.num_heatmaps=0",
    )
    logs[dtype] = [json.loads(l)["loss"] for l in open(work / "train_log.jsonl")]
  assert "KiB per image, float16" in outs["float16"]
  np.testing.assert_allclose(logs["float16"], logs["float32"], rtol=2e-3)
