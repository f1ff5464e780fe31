"""Runs under faults: readers never change a run, even one training beside them; a late failure
keeps what was written and leaves no temporaries; damaged checkpoints, caches and weights are
named or passed over; results files are strict JSON."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cras_jax import export
from cras_jax.base import errors
from cras_jax.deploy import run_exported
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import tables as results
from cras_jax.results import writers
from cras_jax.runs import feature_cache, trained
from cras_jax.scoring import predicting
from tests.conftest import ROOT, TINY

# ----------------------------------------------------------------------------- helpers


def _copy_run(tiny_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", dst / "checkpoints")
  return dst


# ----------------------------------------------------------------------------- readers change nothing


@pytest.mark.slow
def test_readers_never_change_a_run_that_is_training(tiny_run, tmp_path):
  """predict/export/eval open a run read-only: looping over it while a training checkpoints
  every step and prunes all but the newest disturbs nothing, every read after the first
  checkpoint succeeds (a step pruned while it is read: the newest is read instead), and the
  training ends bit-identical to the undisturbed one."""
  missing = tmp_path / "not_a_run"
  with pytest.raises(errors.UserFileNotFoundError):
    trained.load_run(str(missing))
  assert not missing.exists()  # no checkpoints/ created

  work = tmp_path / "busy"
  args = [
      "--config=configs/demo.py",
      f"--workdir={work}",
      f"--config.data.root={tiny_run['data_root']}",
      f"--config.data.cache_dir={tiny_run['cache_dir']}",
      *TINY,
      "--config.train.epochs=3",
      "--config.train.checkpoint_every_steps=1",
      "--config.train.keep_checkpoints=1",
  ]
  proc = subprocess.Popen(
      [sys.executable, "-m", "cras_jax.main", *args],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  reads, failures = 0, []
  try:
    while proc.poll() is None:
      try:
        trained.load_run(str(work))  # what predict, export, robustness and figures open
        reads += 1
      except errors.UserFileNotFoundError:  # no checkpoint yet
        assert reads == 0, "a checkpoint went missing after the first one was read"
      except Exception as e:  # noqa: BLE001 - every other failure is the reader's bug
        failures.append(f"{type(e).__name__}: {e}")
  finally:
    out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert reads > 0 and not failures, failures[:3]
  busy = trained.load_run(str(work))
  calm = trained.load_run(str(tiny_run["workdir"]))
  assert int(busy.state.step) == int(calm.state.step)
  for a, b in zip(
      jax.tree.leaves(busy.state.checkpointable()), jax.tree.leaves(calm.state.checkpointable())
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_without_its_meta_item_falls_back(tiny_run, tmp_path):
  work = _copy_run(tiny_run, tmp_path)
  steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert len(steps) >= 2
  shutil.rmtree(work / "checkpoints" / str(steps[-1]) / "meta")
  before = sorted(os.listdir(work / "checkpoints"))
  run = trained.load_run(str(work))
  assert int(run.state.step) == steps[-2]
  assert sorted(os.listdir(work / "checkpoints")) == before  # a reader moves nothing
  assert not (work / "corrupted_checkpoints").exists()


# ----------------------------------------------------------------------------- failures keep what was written


def test_predict_that_fails_late_keeps_every_scored_row(tiny_run, tmp_path, monkeypatch):
  from tests import predict_helpers

  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  paths = predict_helpers.image_paths(tiny_run["data_root"])[:3]
  from cras_jax.scoring import scoring

  thr = scoring.load_thresholds(run, str(tiny_run["workdir"]))

  def full_disk(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(writers.json, "dump", full_disk)
  out = tmp_path / "pred"
  with pytest.raises(OSError, match="No space"):
    predicting.predict_paths(
        run, thr, paths, str(out), batch_size=2, write_overlays=False, progress=False
    )
  assert not (out / "results.csv").exists() and not (out / "results.json").exists()
  with open(out / writers.PARTIAL_CSV) as f:
    rows = list(__import__("csv").DictReader(f))
  assert [r["path"] for r in rows] == paths  # every image scored, in order
  assert all(r["score"] and not r["error"] for r in rows)


def test_a_failed_export_write_leaves_no_temporary(tmp_path, monkeypatch):
  out = tmp_path / "model.npz"

  def full_disk(file, **arrays):
    file.write(b"partial")  # the open temporary beside `out`
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "savez", full_disk)
  with pytest.raises(OSError):
    export.write_npz(str(out), {"a": np.zeros(3)})
  assert os.listdir(tmp_path) == []


def test_feature_cache_temporaries_and_truncation(tmp_path, capsys):
  file = str(tmp_path / "train_0123abcd.npy")
  w = feature_cache.Writer(file, (4, 3, 2), "float16")
  w.array[:] = 1
  w.commit()
  dead = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  stale = f"{file}.tmp-{int(dead.stdout)}.npy"
  live = f"{file}.tmp-{os.getpid()}.npy"
  for p in (stale, live):
    open(p, "wb").write(b"x" * 100)
  assert feature_cache.load(file, (4, 3, 2)).shape == (4, 3, 2)
  assert not os.path.exists(stale) and os.path.exists(live)  # a running writer's is kept
  os.truncate(file, os.path.getsize(file) - 4)
  assert feature_cache.load(file, (4, 3, 2)) is None
  assert not os.path.exists(file)
  assert f"{file} cannot be reused (" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["in_place_same_size", "record_lost", "record_garbage"])
def test_a_feature_cache_changed_since_it_was_written_is_recomputed(tmp_path, capsys, change):
  """Overwritten in place at the same size (header and length still right), or without its
  record of contents: never reused."""
  file = str(tmp_path / "train_0123abcd.npy")
  w = feature_cache.Writer(file, (4, 3, 2), "float16", data_dir=str(tmp_path))
  w.array[:] = 1
  w.commit()
  assert feature_cache.load(file, (4, 3, 2)) is not None  # as written: reused
  record = file[: -len(".npy")] + ".json"
  if change == "in_place_same_size":
    arr = np.load(file, mmap_mode="r+")
    arr[0, 0, 0] = 2
    arr.flush()
    del arr
  elif change == "record_lost":
    os.remove(record)
  else:
    with open(record, "w") as f:
      f.write("[1, 2")
  size = os.path.getsize(file)
  assert feature_cache.load(file, (4, 3, 2)) is None
  assert not os.path.exists(file)
  out = capsys.readouterr().out
  assert f"{file} cannot be reused (" in out and "recomputing it" in out
  assert size == 4 * 3 * 2 * 2 + 128  # the header and length alone could not tell


# ----------------------------------------------------------------------------- damaged weights


def test_non_finite_weights_are_refused_when_exporting_and_loading(tiny_run, tmp_path):
  from tests import predict_helpers

  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  params = jax.tree.map(np.asarray, run.state.params)
  leaf = jax.tree.leaves(params)[0]
  leaf = leaf.copy()
  leaf.flat[0] = np.nan
  broken = jax.tree.unflatten(jax.tree.structure(params), [leaf, *jax.tree.leaves(params)[1:]])
  bad_run = run._replace(state=run.state.replace(params=broken))
  from cras_jax.scoring import scoring

  thr = scoring.load_thresholds(run, str(tiny_run["workdir"]))
  with pytest.raises(errors.UserValueError, match="NaN or inf"):
    export.export_run(bad_run, thr, str(tmp_path / "m.npz"))
  assert not (tmp_path / "m.npz").exists()
  paths = predict_helpers.image_paths(tiny_run["data_root"])[:2]
  with pytest.raises(errors.UserValueError, match="non-finite scores"):  # not "all normal"
    predicting.predict_paths(
        bad_run, thr, paths, str(tmp_path / "p"), write_overlays=False, progress=False
    )
  meta = {"num_weights": 2}
  np.savez(
      tmp_path / "bad.npz",
      meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
      exported=np.zeros(4, np.uint8),
      w000000=np.ones(3, np.float32),
      w000001=np.array([1.0, np.inf], np.float32),
  )
  with pytest.raises(run_exported.ExportError, match="w000001"):
    run_exported.load(str(tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- strict JSON


def test_a_class_without_defects_gives_null_and_a_labelled_mean(tmp_path):
  res = {
      "label": np.array([0, 0, 0, 1, 1]),
      "is_anomaly": np.array([0, 1, 1, 0, 0]),  # class 1: no defective images
      "scores": np.array([0.1, 0.9, 0.8, 0.2, 0.3]),
      "cls": np.array([0, 0, 0, 1, 1]),
      "mask": np.zeros((5, 8, 8), np.uint8),
      "maps": np.zeros((5, 8, 8), np.float32),
  }
  res["mask"][1:3, 2:4, 2:4] = 1
  res["maps"][1:3, 2:4, 2:4] = 1.0
  table = results.class_metrics(res, ["a", "b"])
  results.write_results(table, str(tmp_path), "final", {"protocol": "final epoch"})

  def no_nan(token):
    raise AssertionError(f"non-JSON token {token}")

  doc = json.loads((tmp_path / "metrics_final.json").read_text(), parse_constant=no_nan)
  assert doc["metrics"]["b"]["i_auroc"] is None
  assert doc["metrics"]["mean"]["i_auroc"] == doc["metrics"]["a"]["i_auroc"] == 1.0
  assert doc["mean_covers"]["i_auroc"] == ["a"]
  assert (
      "I-AUROC over 1 of 2 classes (undefined for b)" in (tmp_path / "metrics_final.md").read_text()
  )
  # read back (best_epoch selection, single-class gathering): null counts as undefined
  again = metrics_lib.summarise({k: v for k, v in doc["metrics"].items() if k != "mean"})
  assert math.isnan(again["b"]["i_auroc"]) and again["mean"]["i_auroc"] == 1.0


def test_rows_of_a_killed_predict_are_kept_and_a_running_one_is_not_disturbed(tmp_path, capsys):
  """kill -9 leaves results.csv.partial with the rows scored so far: the next predict into the
  folder keeps them beside it and says so; while a predict holds the folder, another is
  refused (it would truncate the first's rows)."""
  from cras_jax.results import writers

  partial = tmp_path / writers.PARTIAL_CSV
  header = ",".join(writers.CSV_FIELDS)
  partial.write_text(f"{header}\na.png,/x/a.png,1.0\nb.png,/x/b.png,2.0\n")
  first = writers.PredictionWriter(str(tmp_path), (0.0, 1.0), masks=False, overlays=False)
  err = capsys.readouterr().err
  (kept,) = tmp_path.glob("results.interrupted-*.csv")
  assert f"the 2 row(s) it had scored are kept in {kept}" in err
  assert kept.read_text().splitlines()[1:] == ["a.png,/x/a.png,1.0", "b.png,/x/b.png,2.0"]
  with pytest.raises(errors.UserValueError, match="another predict is writing into"):
    writers.PredictionWriter(str(tmp_path), (0.0, 1.0), masks=False, overlays=False)
  first.row({"name": "c.png", "score": 3.0})
  first.close()
  rows = partial.read_text().splitlines()
  assert rows[0] == header and rows[1].startswith("c.png,") and len(rows) == 2
  # closed without finishing (a stopped predict): its row is kept by the next one too
  second = writers.PredictionWriter(str(tmp_path), (0.0, 1.0), masks=False, overlays=False)
  assert len(list(tmp_path.glob("results.interrupted-*.csv"))) == 2
  # one that finishes leaves no partial rows: the next one keeps nothing
  second.close()
  second.finish([], {}, [])
  writers.PredictionWriter(str(tmp_path), (0.0, 1.0), masks=False, overlays=False).close()
  assert len(list(tmp_path.glob("results.interrupted-*.csv"))) == 2
