"""Hostile configurations and command lines: every bad field is named in one message, refused
before any data work or checkpoint; a run's scoring settings cannot change under it; user
errors exit with status 2 and one message, without a traceback."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cras_jax.base import errors
from cras_jax.config import check as config_check
from cras_jax.configs import demo
from cras_jax.runs import checkpoint, trained
from cras_jax.runs import workdir as runs
from cras_jax.training import train
from tests.conftest import ROOT, TINY

# ----------------------------------------------------------------------------- helpers


def _tiny_config(**over):
  """The demo config at the tests' tiny size, with `over` ({'train.batch_size': -4})."""
  config = demo.get_config()
  for arg in TINY:
    key, value = arg[len("--config.") :].split("=")
    _set(config, key, type(_get(config, key))(value))
  for key, value in over.items():
    _set(config, key, value)
  return config


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def _set(config, key, value):
  *parents, last = key.split(".")
  for part in parents:
    config = config[part]
  config[last] = value


def _copy_run(tiny_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", dst / "checkpoints")
  return dst


def _run(module, *args):
  return subprocess.run(
      [sys.executable, "-m", module, *map(str, args)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
  )


# ----------------------------------------------------------------------------- bad fields


BAD_FIELDS = [
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0"),
    ({"train.batch_size": -4}, "train.batch_size=-4"),
    ({"train.batch_size": 0}, "train.batch_size=0"),
    ({"model.embed_dim": 0}, "model.embed_dim=0"),
    ({"data.crop": 80}, "data.crop=80 is larger than data.resize=73"),
    ({"model.levels": (2, 5)}, "model.levels=(2, 5)"),
    ({"model.backbone": "resnet7"}, "model.backbone='resnet7'"),
    ({"data.classes": ("../../outside",)}, "'../../outside' is not a plain name"),
    ({"data.mask_rule": "any_nonzero"}, "data.mask_rule='any_nonzero'"),
    ({"eval.protocol": "best"}, "eval.protocol='best'"),
    ({"train.epochs": 0}, "train.epochs=0"),
    ({"train.parallelism": "pjit"}, "train.parallelism='pjit'"),
    (
        {"train.parallelism": "pmap", "train.population": "seed=0,1"},
        "a population (train.population) trains with jit only",
    ),
]


@pytest.mark.parametrize("over,message", BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_a_bad_config_field_is_named(over, message):
  with pytest.raises(
      config_check.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
  ):
    config_check.check(_tiny_config(**over))


def test_every_bad_field_is_reported_in_one_error():
  over = {}
  for o, _ in BAD_FIELDS:
    over.update(o)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(_tiny_config(**over))
  text = str(e.value)
  for o, message in BAD_FIELDS:
    if all(over[k] == v for k, v in o.items()):  # else a later value of the field is checked
      assert message in text, message
  assert config_check.problems_of(_tiny_config()) == []
  assert (
      config_check.problems_of(_tiny_config(**{"data.allow_crop_padding": True, "data.crop": 80}))
      == []
  )


def test_keep_checkpoints_zero_never_reaches_the_checkpoint_manager(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoint.manager(str(tmp_path), 0)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "over,message",
    [
        (
            {"model.backbone": "wide_resnet50_2", "model.weights": "/no/such/weights.pth"},
            "no such file",
        ),
        ({"model.backbone": "wide_resnet_50"}, "model.backbone='wide_resnet_50'"),
        ({"data.name": "mvtec", "data.root": "/no/such/dataset"}, "data.root='/no/such/dataset'"),
        ({"data.name": "folder", "data.root": ""}, "data.root is empty"),
    ],
)
def test_config_and_weights_are_checked_before_any_data_work(tmp_path, over, message):
  """Nothing is generated, prepared or cached for a config that cannot run."""
  work = tmp_path / "work"
  config = _tiny_config(**over)
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(config_check.ConfigError, match=message):
    train.train_and_evaluate(config, str(work))
  assert not (tmp_path / "cache").exists()
  assert not (work / "synthetic_data").exists() and not (work / "data_cache").exists()


# ----------------------------------------------------------------------------- config changes of an existing run


def _saved(tiny_run):
  mngr = checkpoint.manager(str(tiny_run["workdir"]), read_only=True)
  return mngr, checkpoint.restore_meta(mngr)


def test_a_shape_changing_config_change_names_the_field(tiny_run, tmp_path):
  work = _copy_run(tiny_run, tmp_path)
  mngr = checkpoint.manager(str(work))
  meta = checkpoint.restore_meta(mngr)
  meta = json.loads(json.dumps(meta))
  meta["config"]["model"]["embed_dim"] = 16
  with pytest.raises(errors.UserValueError, match=r"(?s)model\.embed_dim.*new --workdir"):
    runs.resume(mngr, None, meta, str(work), allow_config_change=True)


@pytest.mark.parametrize(
    "field,value",
    [("data.resize", 80), ("model.map_sigma", 2.0), ("model.score_mode", "reference")],
)
def test_eval_with_scoring_settings_other_than_the_run_is_refused(tiny_run, field, value):
  _, meta = _saved(tiny_run)
  config = ml_collections.ConfigDict(meta["config"])
  config.train.epochs = 99  # training-only and reporting fields may differ
  config.eval.num_heatmaps = 0
  trained.check_eval_config(meta, config, "run")
  _set(config, field, value)
  with pytest.raises(errors.UserValueError, match=field.replace(".", r"\.")):
    trained.load_run(str(tiny_run["workdir"]), config)


# ----------------------------------------------------------------------------- exit status 2


def test_user_errors_exit_2_with_one_message(tmp_path):
  out = _run(
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path / 'w'}",
      "--config.train.batch_size=-4",
      "--config.model.embed_dim=0",
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "train.batch_size=-4" in out.stderr and "model.embed_dim=0" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()
  image = tmp_path / "x.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  out = _run("cras_jax.predict", f"--workdir={tmp_path / 'none'}", image)
  assert out.returncode == 2 and "no checkpoint" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "none").exists()
  out = _run("cras_jax.predict", f"--workdir={tmp_path / 'none'}", "--verbose", image)
  assert out.returncode == 2 and "Traceback" in out.stderr
