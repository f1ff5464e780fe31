import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cras_jax.base import errors
from cras_jax.data import identity, layout
from cras_jax.runs import checkpoint, trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate
from tests.conftest import ROOT, TINY


def test_load_run_restores_trained_state_and_config(tiny_run):
  run = trained.load_run(str(tiny_run["workdir"]))
  assert run.config.data.crop == 64 and run.config.model.embed_dim == 32
  assert run.class_names == ["chip", "fabric", "gear", "granite"]
  assert int(run.state.step) == 9
  assert np.abs(np.asarray(run.state.centres)).sum() > 0


# ----------------------------------------------------------------------------- data identity


def _copy(tiny_run, tmp_path):
  """A copy of the tiny run's checkpoints and of its data root."""
  work, data = tmp_path / "run", tmp_path / "data"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  shutil.copytree(tiny_run["data_root"], data)
  return work, data


def _identity(root) -> dict:
  records, _, classes = layout.collect(root, None, check_masks=False)
  digests = identity.file_digests(identity.record_paths(records))
  return identity.of_records(records, classes, root, digests)


def _saved_meta(work) -> tuple:
  mngr = checkpoint.manager(str(work))
  return mngr, json.loads(json.dumps(checkpoint.restore_meta(mngr)))


def _rewrite(path, pixels, mtime_ns=None) -> None:
  """`pixels` written over the PNG at `path` uncompressed (its size then depends on the image
  size alone), with its mtime set back to `mtime_ns`."""
  Image.fromarray(pixels).save(path, compress_level=0)
  if mtime_ns is not None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_checkpoints_record_the_data_and_a_copy_of_it_is_the_same_data(tiny_run, tmp_path):
  work, data = _copy(tiny_run, tmp_path)
  _, meta = _saved_meta(work)
  assert meta["data"]["classes"] == ["chip", "fabric", "gear", "granite"]
  assert meta["data"]["train"]["gear"]["images"] == 6
  assert len(meta["run_id"]) == 16
  assert _identity(data) == meta["data"]  # another root, the same files: the same data


def test_resuming_on_other_training_images_is_refused_naming_them(tiny_run, tmp_path):
  work, data = _copy(tiny_run, tmp_path)
  img = data / "fabric" / "train" / "good" / "003.png"
  pixels = np.asarray(Image.open(img).convert("RGB"))
  _rewrite(img, 255 - pixels, os.stat(img).st_mtime_ns)
  mngr, meta = _saved_meta(work)
  meta["data"] = _identity(data)
  with pytest.raises(
      errors.UserValueError,
      match=r"(?s)training data changed.*train images of class 'fabric': 6 then, 6 now "
      r"\(same count, other contents\).*new --workdir",
  ):
    runs.resume(mngr, None, meta, str(work), allow_config_change=True)


def test_an_image_edited_in_place_is_prepared_again_and_results_say_the_data_differ(
    tiny_run, tmp_path
):
  work, data = _copy(tiny_run, tmp_path)
  _, meta = _saved_meta(work)
  config = runs.config_from_meta(meta)
  config.data.root, config.data.cache_dir = str(data), str(tmp_path / "cache")
  config.log.progress = config.log.tensorboard = False
  name = "gear/test/good/000.png"
  img = data / name
  pixels = np.asarray(Image.open(img).convert("RGB"))
  _rewrite(img, pixels)  # the same image, stored uncompressed: other bytes, same pixels
  results = work / "results"

  def score():
    evaluate.evaluate_checkpoint(config, str(work))
    with open(results / "scores_eval.csv") as f:
      return {r["name"]: float(r["score"]) for r in csv.DictReader(f)}[name]

  before = score()
  stat = os.stat(img)
  edited = pixels.copy()
  edited[8:56, 8:56] = 255 - edited[8:56, 8:56]  # a large "defect"
  _rewrite(img, edited, stat.st_mtime_ns)
  assert os.stat(img).st_size == stat.st_size and os.stat(img).st_mtime_ns == stat.st_mtime_ns
  after = score()
  assert after != pytest.approx(before, abs=1e-6)  # scored from the new bytes
  prepared = [d for d in os.listdir(tmp_path / "cache" / "mvtec_folder") if d != ".leases"]
  assert len(prepared) == 1  # the stale prepared copy was replaced
  # Every result file of the evaluation says that the test images are not the run's.
  m = json.loads((results / "metrics_eval.json").read_text())
  assert "test images of class 'gear': 5 then, 5 now (same count" in m["data_note"]
  assert m["run_id"] == meta["run_id"]
  with open(results / "metrics_eval.csv") as f:
    rows = list(csv.DictReader(f))
  assert all(r["data_note"] == m["data_note"] for r in rows)
  assert f"note: {m['data_note']}" in (results / "metrics_eval.md").read_text()


# ----------------------------------------------------------------------------- config changes


@pytest.mark.parametrize(
    "field,value",
    [
        ("model.centre", "single"),
        ("model.noise_relative", False),
        ("seed", 1),
        ("model.weights", "other.npz"),
        ("data.resize", 80),
    ],
)
def test_a_change_the_saved_state_cannot_reflect_is_refused_naming_the_field(
    tiny_run, tmp_path, field, value
):
  work, _ = _copy(tiny_run, tmp_path)
  mngr, meta = _saved_meta(work)
  node = meta["config"]
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(
      errors.UserValueError, match=rf"(?s)computed from other values.*{field}: saved.*new --workdir"
  ):
    runs.resume(mngr, None, meta, str(work), allow_config_change=True)


@pytest.mark.parametrize("field,value", [("train.population", "seed=0,1"), ("model.embed_dim", 16)])
def test_a_change_of_the_saved_states_shapes_is_refused_naming_the_field(
    tiny_run, tmp_path, field, value
):
  """A population resized (its members are the state's leading axis) or a head resized: one
  message naming the field, even with --allow_config_change, before anything is restored."""
  work, _ = _copy(tiny_run, tmp_path)
  mngr, meta = _saved_meta(work)
  section, last = field.split(".")
  meta["config"][section][last] = value
  with pytest.raises(
      errors.UserValueError, match=rf"(?s)parameter shapes differ.*{field}: saved.*new --workdir"
  ):
    runs.resume(mngr, None, meta, str(work), allow_config_change=True)


def test_adding_a_class_says_the_class_list_changed_in_one_message(tiny_run, tmp_path):
  work, data = _copy(tiny_run, tmp_path)
  shutil.copytree(data / "chip", data / "chip2")
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "cras_jax.main",
          "--config=configs/demo.py",
          f"--workdir={work}",
          f"--config.data.root={data}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
          *TINY,
          "--config.train.epochs=3",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
  )
  assert out.returncode == 2, out.stderr[-3000:]
  errors_said = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors_said) == 1 and "the class list changed" in errors_said[0]
  assert "(added chip2)" in errors_said[0] and "new --workdir" in errors_said[0]
  assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
  assert "Remove the directory" not in out.stdout + out.stderr
  assert sorted(os.listdir(work / "checkpoints")) == sorted(
      os.listdir(tiny_run["workdir"] / "checkpoints")
  )  # every checkpoint kept as it was


def _prune_on_first_read(monkeypatch, ckpt, what):
  """As a training with keep_checkpoints=1 would: while a reader reads its chosen step, step
  12 is saved (a copy of the newest) and every other step is deleted."""
  real, calls = getattr(checkpoint, what), []

  def wrapped(mngr, *args, **kwargs):
    if not calls:
      newest = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
      shutil.copytree(ckpt / str(newest), ckpt / "12")
      for s in os.listdir(ckpt):
        if s.isdigit() and s != "12":
          shutil.rmtree(ckpt / s)
    calls.append(args)
    return real(mngr, *args, **kwargs)

  monkeypatch.setattr(checkpoint, what, wrapped)
  return calls


def test_a_reader_whose_checkpoint_is_pruned_under_it_reads_the_newest(
    tiny_run, tmp_path, monkeypatch, capsys
):
  work = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  ckpt = work / "checkpoints"
  steps_before = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  assert len(steps_before) > 1
  calls = _prune_on_first_read(monkeypatch, ckpt, "restore")
  run = trained.load_run(str(work))
  assert int(run.state.step) == steps_before[-1]  # step 12 holds the newest state
  assert sorted(os.listdir(ckpt)) == ["12"]
  assert len(calls) >= 2  # the pruned step, then step 12 after listing again
  assert "unreadable" not in capsys.readouterr().out  # a pruned step is not a damaged one
  assert not (work / "corrupted_checkpoints").exists()


def test_meta_of_a_checkpoint_pruned_under_the_reader_comes_from_the_newest(
    tiny_run, tmp_path, monkeypatch
):
  work = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  mngr = checkpoint.manager(str(work), read_only=True)
  real_restore = mngr.restore
  state = {"first": True}

  def restore(step, *a, **k):
    if state.pop("first", False):  # the step chosen is pruned as it is read
      shutil.copytree(work / "checkpoints" / str(step), work / "checkpoints" / "12")
      for s in os.listdir(work / "checkpoints"):
        if s.isdigit() and s != "12":
          shutil.rmtree(work / "checkpoints" / s)
    return real_restore(step, *a, **k)

  monkeypatch.setattr(mngr, "restore", restore)
  meta = checkpoint.restore_meta(mngr)
  assert meta is not None and meta["class_names"] == ["chip", "fabric", "gear", "granite"]
