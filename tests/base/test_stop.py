"""SIGINT/SIGTERM stop every long loop at its next boundary with status 128 + signal, leaving
consistent outputs: the feature pass, scoring a split (evaluation), predict."""

import csv
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from cras_jax.base import stop
from cras_jax.runs import trained
from cras_jax.scoring import scoring
from cras_jax.training import train
from tests import predict_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_poll_outside_a_stop_request_does_nothing():
  stop.poll("anything")


def test_signal_inside_a_stop_request_stops_at_the_next_poll():
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(stop.Stopped) as ei:
    with stop.StopRequest():
      stop.poll("before")  # nothing yet
      os.kill(os.getpid(), signal.SIGTERM)
      stop.poll("a loop")
  assert ei.value.code == 128 + signal.SIGTERM == 143
  assert signal.getsignal(signal.SIGTERM) == before and stop.requested() is None


@pytest.fixture(scope="module")
def loaded(tiny_run):
  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  return run, trained.load_run_dataset(run, str(tiny_run["workdir"]))


def test_feature_pass_stops_at_a_batch_and_leaves_no_cache_file(loaded, tmp_path):
  run, dataset = loaded
  cfg = ml_collections.ConfigDict(run.config.to_dict())
  cfg.train.cache_features = True
  cfg.train.feature_cache_dir = str(tmp_path / "features")
  with pytest.raises(stop.Stopped) as ei:
    with stop.StopRequest():
      os.kill(os.getpid(), signal.SIGTERM)
      train.feature_pass(run.state, run.spec, run.devices, dataset, cfg, str(tmp_path))
  assert ei.value.code == 143
  assert [n for n in os.listdir(tmp_path / "features") if n.endswith(".npy")] == []


def test_scoring_a_split_stops_at_a_batch(loaded):
  run, dataset = loaded
  scorer = scoring.Scorer.for_run(run)
  with pytest.raises(stop.Stopped):
    with stop.StopRequest():
      os.kill(os.getpid(), signal.SIGINT)
      scorer.predict_dataset(dataset.test)


_SLOW_PREDICT = """
import sys, time
from cras_jax import predict
from cras_jax.base import errors
from cras_jax.scoring import scoring
from cras_jax.results import writers
def slowly(fn):
  def slow(*a, **k):
    time.sleep(0.4)
    return fn(*a, **k)
  return slow
writers.write_png = slowly(writers.write_png)
writers.write_overlay = slowly(writers.write_overlay)
scoring.Scorer.__call__ = slowly(scoring.Scorer.__call__)
predict.define_flags()
errors.define_verbose_flag()
sys.argv = ["predict", *sys.argv[1:]]
errors.run(predict.main)
"""


@pytest.mark.slow
def test_sigterm_stops_predict_with_only_written_files_listed(tiny_run, tmp_path):
  images = predict_helpers.image_paths(tiny_run["data_root"])
  out = tmp_path / "pred"
  proc = subprocess.Popen(
      [
          sys.executable,
          "-c",
          _SLOW_PREDICT,
          f"--workdir={tiny_run['workdir']}",
          f"--output_dir={out}",
          "--batch_size=1",
          "--workers=1",
          *images,
      ],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  partial = out / "results.csv.partial"
  deadline = time.time() + 240
  while (
      time.time() < deadline
      and not (out / "overlays").is_dir()
      or not list((out / "overlays").glob("*.png"))
  ):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  log = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, log[-3000:]
  assert not (out / "results.csv").exists()
  rows = list(csv.DictReader(open(partial)))
  assert 0 < len(rows) < len(images), log[-2000:]
  for r in rows:
    for col in ("mask", "overlay"):
      assert not r[col] or (out / r[col]).is_file(), (col, r[col])
