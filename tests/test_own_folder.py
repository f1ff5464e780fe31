"""Own images (configs/folder.py), the progress shown while a person waits, TensorBoard event
files read back with tensorboard's own reader, the curves picture, and the install files."""

import io
import json
import os
import re
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from cras_jax.base import progress, schema
from cras_jax.data.synthetic import writing
from cras_jax.results import summaries
from tests.conftest import ROOT, run_module

# Shrinks configs/folder.py for test speed only (sizes, epochs, logging).
SHRINK = [
    "--config.data.resize=64",
    "--config.data.crop=64",
    "--config.model.pre_embed_dim=48",
    "--config.model.embed_dim=32",
    "--config.eval.batch_size=8",
    "--config.train.epochs=2",
    "--config.train.log_every=1",
    "--config.eval.num_heatmaps=1",
]


def _read_board(logdir: str):
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  acc.Reload()
  return acc


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """A plain MVTec-layout folder (no synthetic-dataset config involved) trained with
  configs/folder.py from another directory. -> (workdir, data root, output)."""
  base = tmp_path_factory.mktemp("own_folder")
  root, workdir, elsewhere = base / "my_images", base / "run", base / "elsewhere"
  writing.generate(str(root), 0, 64, 6, 2, 1)
  elsewhere.mkdir()
  out = run_module(
      "cras_jax.main",
      f"--config={os.path.join(ROOT, 'configs', 'folder.py')}",
      f"--workdir={workdir}",
      f"--config.data.root={root}",
      *SHRINK,
      cwd=elsewhere,
  )
  return workdir, root, out


def test_folder_config_defaults_are_offline_lite0():
  from cras_jax.configs import folder, mvtec

  c = folder.get_config()
  assert c.data.name == "folder" and tuple(c.data.classes) == ()
  assert (c.model.backbone, c.model.weights) == ("efficientnet_lite0", "")
  assert c.model.noise_relative and c.model.noise_sigma == 0.3
  assert (c.data.resize, c.data.crop, c.model.embed_dim, c.train.epochs) == (160, 160, 512, 20)
  assert c.train.cache_features and c.log.progress and c.log.tensorboard
  paper = mvtec.get_config()  # the paper config is unchanged
  assert (paper.model.backbone, paper.model.noise_sigma, paper.model.noise_relative) == (
      "wide_resnet50_2",
      0.015,
      False,
  )
  assert paper.train.lr_adapter == c.train.lr_adapter and paper.train.lr_disc == c.train.lr_disc


@pytest.mark.slow
def test_own_folder_trains_and_scores(folder_run):
  workdir, _, out = folder_run
  res = json.load(open(workdir / "results" / "metrics_final.json"))
  assert sorted(res["metrics"]) == ["chip", "fabric", "gear", "granite", "mean"]
  for row in res["metrics"].values():
    assert 0.0 <= row["i_auroc"] <= 1.0 and 0.0 <= row["p_auroc"] <= 1.0
  assert res["test_images"] == 4 * (2 + 3)
  # Every stage shows progress; tfds' own lines with its temporary paths are gone.
  for bar in ("prepare train", "prepare test", "features", "train", "score"):
    assert re.search(rf"{bar}: +100%", out), bar
  assert "incomplete." not in out and "Shuffling" not in out
  assert "Downloading and preparing" not in out
  assert "preparing the dataset (24 train, 20 test images" in out


@pytest.mark.slow
def test_tensorboard_scalars_and_images(folder_run):
  workdir, _, _ = folder_run
  acc = _read_board(str(workdir / "tensorboard"))
  tags = acc.Tags()
  log = [json.loads(line) for line in open(workdir / "train_log.jsonl")]
  steps = [e["step"] for e in log]
  assert steps == [1, 2, 3, 4, 5, 6]  # 24 images in batches of 8: 3 steps an epoch, 2 epochs
  for key in ("loss", "loss_true", "loss_fake", "p_true", "p_fake", "images_per_s"):
    events = acc.Scalars(f"train/{key}")
    assert [e.step for e in events] == steps
    np.testing.assert_allclose([e.value for e in events], [e[key] for e in log], rtol=1e-6)
  assert {e.value for e in acc.Scalars("lr/adapter")} == {np.float32(1e-4)}
  assert {e.value for e in acc.Scalars("lr/disc")} == {np.float32(2e-4)}
  metrics = json.load(open(workdir / "results" / "metrics_final.json"))["metrics"]
  for cls in ("chip", "granite", "mean"):
    for key in ("i_auroc", "p_auroc", "aupro", "match_acc"):
      (e,) = acc.Scalars(f"eval/{cls}/{key}")
      assert e.step == steps[-1]
      np.testing.assert_allclose(e.value, metrics[cls][key], rtol=1e-6)
  heat = sorted(t for t in tags["images"] if t.startswith("heatmaps/"))
  assert heat == ["heatmaps/chip", "heatmaps/fabric", "heatmaps/gear", "heatmaps/granite"]
  img = acc.Images("heatmaps/gear")[0]
  assert (img.width, img.height) == (3 * 64, 64)
  png = Image.open(io.BytesIO(img.encoded_image_string))
  assert png.size == (3 * 64, 64) and png.mode == "RGB"


@pytest.mark.slow
def test_curves_picture(folder_run):
  workdir, _, _ = folder_run
  path = workdir / "results" / "curves.png"
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert Image.open(path).size == (900, 324)  # 10 x 3.6 inches at 90 dpi
  assert summaries.evaluation_points(str(workdir))[-1][0] == 6


@pytest.mark.slow
def test_quiet_mode_and_eval_events(folder_run):
  workdir, root, _ = folder_run
  before = len(_read_board(str(workdir / "tensorboard")).Scalars("eval/mean/i_auroc"))
  out = run_module(
      "cras_jax.main",
      f"--config={os.path.join(ROOT, 'configs', 'folder.py')}",
      f"--workdir={workdir}",
      f"--config.data.root={root}",
      "--mode=eval",
      "--config.log.progress=false",
      *SHRINK,
      cwd=workdir.parent,
  )
  assert "%|" not in out and not re.search(r"score: +\d+%", out)  # no bars
  assert "[eval] step 6" in out
  assert len(_read_board(str(workdir / "tensorboard")).Scalars("eval/mean/i_auroc")) == before + 1


def test_event_writer_framing(tmp_path):
  assert summaries.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  w = summaries.EventWriter(str(tmp_path))
  w.scalars(7, {"a/b": 0.25, "skipped": float("nan")})
  w.close()
  with open(w.path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    records.append(data[pos + 12 : pos + 12 + n])
    pos += 16 + n
  assert pos == len(data) and len(records) == 2
  acc = _read_board(str(tmp_path))
  assert acc.Tags()["scalars"] == ["a/b"]
  assert [(e.step, e.value) for e in acc.Scalars("a/b")] == [(7, 0.25)]


def test_progress_switch(monkeypatch):
  monkeypatch.delenv("TQDM_DISABLE", raising=False)
  progress.configure(ml_collections.ConfigDict({"log": {"progress": False}}))
  try:
    assert progress.bar(3, "x").disable
  finally:
    progress.set_enabled(True)
  assert not progress.bar(3, "x").disable
  progress.configure(schema.filled({"train": {}}))  # a run saved before log.*, as read
  assert progress.enabled()


def test_sweep_eta(tmp_path):
  from cras_jax.experiments import sweep

  pending = [{"workdir": str(tmp_path / n)} for n in ("c", "d", "e")]
  assert sweep._eta({}, pending) == ""
  assert sweep._eta({"a": 60.0, "b": 120.0}, pending) == " [3m00s so far, about 4m30s left]"
  assert sweep._clock(3725) == "1h02m"


def test_two_processes_write_one_event_file(tmp_path, monkeypatch):
  """Only process 0 writes TensorBoard events (the others' Summaries do nothing)."""
  config = ml_collections.ConfigDict({"log": {"tensorboard": True}})
  monkeypatch.setattr(summaries.jax, "process_index", lambda: 1)
  s = summaries.Summaries(str(tmp_path), config.log.tensorboard)
  s.evaluation(3, {"mean": {"i_auroc": 0.5}})
  assert s.writer is None and not (tmp_path / "tensorboard").exists()
  (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0, "p_true": 0.5}\n')
  assert summaries.write_curves(str(tmp_path)) is None
  assert not (tmp_path / "results").exists()
  monkeypatch.setattr(summaries.jax, "process_index", lambda: 0)
  assert summaries.write_curves(str(tmp_path)) == str(tmp_path / "results" / "curves.png")
  s = summaries.Summaries(str(tmp_path), enabled=False)
  assert s.writer is None and not (tmp_path / "tensorboard").exists()


def test_training_loads_no_tensorboard_tensorflow_or_torch():
  code = (
      "import sys, cras_jax.main, cras_jax.training.train, cras_jax.results.summaries; "
      "print(sorted(m for m in ('torch', 'tensorflow', 'tensorboard', 'tensorboardX') "
      "if m in sys.modules))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"
