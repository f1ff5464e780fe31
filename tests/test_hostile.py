"""Faults and hostile inputs (issue 13): each case loses no data, reports nothing silently wrong
and exhausts no memory; user errors are one message and exit status 2."""

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cras_jax import export, predict, run_exported
from cras_jax.backbones import torch_pickle
from cras_jax.base import errors
from cras_jax.configs import demo
from cras_jax.data import layout, preprocess, validate
from cras_jax.method import metrics as metrics_lib
from cras_jax.runs import checkpoint, config_check, feature_cache, results
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


def _png_with_chunk(path, array, kind: bytes, data: bytes):
  """Saves `array` as PNG with an extra chunk inserted after IHDR (PIL writes no sBIT)."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  raw = buf.getvalue()
  ihdr_end = 8 + 8 + 13 + 4
  chunk = struct.pack(">I", len(data)) + kind + data
  chunk += struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  path.write_bytes(raw[:ihdr_end] + chunk + raw[ihdr_end:])


def _png_header(path, width, height):
  """A PNG declaring width x height (8-bit grey) with one tiny IDAT: a few dozen bytes."""

  def chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  idat = zlib.compress(b"\x00" * (width + 1))
  path.write_bytes(
      b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
  )


# ----------------------------------------------------------------------------- 1: read-only readers


def test_readers_never_change_a_run_that_is_training(tiny_run, tmp_path):
  """predict/export/eval open a run read-only: looping over it while a training checkpoints
  every step disturbs nothing, and the training ends bit-identical to the undisturbed one."""
  missing = tmp_path / "not_a_run"
  with pytest.raises(errors.UserFileNotFoundError):
    runs.load_run(str(missing))
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
  reads = 0
  try:
    while proc.poll() is None:
      try:
        runs.load_run(str(work))  # what predict, export, robustness and figures open
        reads += 1
      except Exception:  # noqa: BLE001 - before the first checkpoint, or one being replaced
        pass
  finally:
    out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert reads > 0
  busy = runs.load_run(str(work))
  calm = runs.load_run(str(tiny_run["workdir"]))
  assert int(busy.state.step) == int(calm.state.step)
  for a, b in zip(
      jax.tree.leaves(busy.state.checkpointable()), jax.tree.leaves(calm.state.checkpointable())
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- 2, 8, 14 and issue 14.2


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
  for _, message in BAD_FIELDS:
    if "batch_size=-4" not in message:  # the later value (0) of the same field is checked
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
        ({"data.name": "mvtec", "data.root": ""}, "data.root is empty"),
    ],
)
def test_config_and_weights_are_checked_before_any_data_work(tmp_path, over, message):
  """Issue 14 item 2: nothing is generated, prepared or cached for a config that cannot run."""
  work = tmp_path / "work"
  config = _tiny_config(**over)
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(config_check.ConfigError, match=message):
    train.train_and_evaluate(config, str(work))
  assert not (tmp_path / "cache").exists()
  assert not (work / "synthetic_data").exists() and not (work / "data_cache").exists()


def test_class_names_that_are_paths_are_refused(tmp_path):
  (tmp_path / "ds").mkdir()
  records, problems, _ = layout.collect(tmp_path / "ds", ["../escape"])
  assert records == [] and "'../escape' is not a plain name" in problems[0]
  for name in ("a/b", "..", ".hidden", "x\\y"):
    assert layout.plain_name_problem(name), name
  for name in ("metal_nut", "pcb1", "Schraube M4"):
    assert layout.plain_name_problem(name) is None, name


# ----------------------------------------------------------------------------- 3: results survive


def test_predict_that_fails_late_keeps_every_scored_row(tiny_run, tmp_path, monkeypatch):
  from tests import predict_helpers

  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  paths = predict_helpers.image_paths(tiny_run["data_root"])[:3]
  from cras_jax.runs import scoring

  thr = scoring.load_thresholds(run, str(tiny_run["workdir"]))

  def full_disk(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(predict.json, "dump", full_disk)
  out = tmp_path / "pred"
  with pytest.raises(OSError, match="No space"):
    predict.predict_paths(
        run, thr, paths, str(out), batch_size=2, write_overlays=False, progress=False
    )
  assert not (out / "results.csv").exists() and not (out / "results.json").exists()
  with open(out / predict.PARTIAL_CSV) as f:
    rows = list(__import__("csv").DictReader(f))
  assert [r["path"] for r in rows] == paths  # every image scored, in order
  assert all(r["score"] and not r["error"] for r in rows)


def test_a_failed_export_write_leaves_no_temporary(tmp_path, monkeypatch):
  out = tmp_path / "model.npz"

  def full_disk(file, **arrays):
    with open(file, "wb") as f:
      f.write(b"partial")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export.np, "savez", full_disk)
  with pytest.raises(OSError):
    export.write_npz(str(out), {"a": np.zeros(3)})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 4: unique names


def test_output_names_never_collide():
  names = ["sub/b.png", "sub__b.png", "sub/b.jpg", "x/A.png", "x/a.png", "c.png"]
  stems = predict.output_stems(names)
  assert len({s.lower() for s in stems}) == len(names)
  assert stems[-1] == "c"  # names that do not collide keep the plain stem
  assert predict.output_stems(names) == stems  # deterministic


# ----------------------------------------------------------------------------- 5: missing meta


def test_a_checkpoint_without_its_meta_item_falls_back(tiny_run, tmp_path):
  work = _copy_run(tiny_run, tmp_path)
  steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert len(steps) >= 2
  shutil.rmtree(work / "checkpoints" / str(steps[-1]) / "meta")
  before = sorted(os.listdir(work / "checkpoints"))
  run = runs.load_run(str(work))
  assert int(run.state.step) == steps[-2]
  assert sorted(os.listdir(work / "checkpoints")) == before  # a reader moves nothing
  assert not (work / "corrupted_checkpoints").exists()


# ----------------------------------------------------------------------------- 6, 9: config changes


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
  runs.check_eval_config(meta, config, "run")
  _set(config, field, value)
  with pytest.raises(errors.UserValueError, match=field.replace(".", r"\.")):
    runs.load_run(str(tiny_run["workdir"]), config)


# ----------------------------------------------------------------------------- 7: feature cache


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
  assert f"{file} is damaged" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 10: mask values


def test_non_binary_masks_follow_the_documented_rule(tmp_path, capsys):
  rng = np.random.default_rng(0)
  m = rng.integers(0, 4, (60, 80)).astype(np.uint8)  # JPEG-like noise 0..3
  m[20:30, 30:50] = 255
  m[20:30, 50] = 200  # a soft edge
  Image.fromarray(m).save(tmp_path / "m.png")
  Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "i.png")
  _, binarised = preprocess.load_example(tmp_path / "i.png", tmp_path / "m.png", 60, 60)
  # independent reference: scaled to [0, 1], PIL 'F' bilinear, centre crop, > 0.5
  f = np.asarray(Image.fromarray(m.astype(np.float32) / 255).resize((80, 60), Image.BILINEAR))
  want = (f[:, 10:70] > 0.5).astype(np.uint8)
  np.testing.assert_array_equal(binarised, want)
  assert 0.03 < binarised.mean() < 0.06  # not the 75 % of "any non-zero sample"
  _, ref = preprocess.load_example(
      tmp_path / "i.png", tmp_path / "m.png", 60, 60, "reference_int_cast"
  )
  np.testing.assert_array_equal(ref, (m[:, 10:70] == 255).astype(np.uint8))
  # downsampled: only pixels that stay exactly 255 count under the reference's rule
  _, ref_small = preprocess.load_example(
      tmp_path / "i.png", tmp_path / "m.png", 30, 30, "reference_int_cast"
  )
  small = np.asarray(Image.fromarray(m).resize((40, 30), Image.BILINEAR))[:, 5:35]
  np.testing.assert_array_equal(ref_small, (small == 255).astype(np.uint8))
  # validation names the mask
  validate.validate(
      [layout.Record("a", "test", "bad", str(tmp_path / "i.png"), str(tmp_path / "m.png"))],
      tmp_path,
      class_names=[],
  )
  assert "m.png (6 values)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 11: strict JSON


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


# ----------------------------------------------------------------------------- 12: NaN weights


def test_non_finite_weights_are_refused_when_exporting_and_loading(tiny_run, tmp_path):
  from tests import predict_helpers

  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  params = jax.tree.map(np.asarray, run.state.params)
  leaf = jax.tree.leaves(params)[0]
  leaf = leaf.copy()
  leaf.flat[0] = np.nan
  broken = jax.tree.unflatten(jax.tree.structure(params), [leaf, *jax.tree.leaves(params)[1:]])
  bad_run = run._replace(state=run.state.replace(params=broken))
  from cras_jax.runs import scoring

  thr = scoring.load_thresholds(run, str(tiny_run["workdir"]))
  with pytest.raises(errors.UserValueError, match="NaN or inf"):
    export.export_run(bad_run, thr, str(tmp_path / "m.npz"))
  assert not (tmp_path / "m.npz").exists()
  paths = predict_helpers.image_paths(tiny_run["data_root"])[:2]
  with pytest.raises(errors.UserValueError, match="non-finite scores"):  # not "all normal"
    predict.predict_paths(
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


# ----------------------------------------------------------------------------- 13: 12-bit PNGs


def test_twelve_bit_pngs_use_their_significant_bits(tmp_path):
  a = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)
  _png_with_chunk(tmp_path / "sbit.png", a, b"sBIT", bytes([12]))
  assert preprocess.png_significant_bits(tmp_path / "sbit.png") == 12
  img = preprocess.read_image(tmp_path / "sbit.png")
  np.testing.assert_array_equal(img[..., 0], np.round(a / 4095 * 255).astype(np.uint8))
  Image.fromarray(a).save(tmp_path / "plain.png")
  with pytest.warns(UserWarning, match="plain.png.*below 4096"):
    dark = preprocess.read_image(tmp_path / "plain.png")
  assert dark.max() == 16  # round(4095 / 257): as stored, but said so
  full = (a.astype(np.uint32) * 16).astype(np.uint16)
  Image.fromarray(full).save(tmp_path / "full.png")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert preprocess.read_image(tmp_path / "full.png").max() == 255


# ----------------------------------------------------------------------------- 15: huge images


def test_images_declaring_huge_sizes_are_refused_by_name(tmp_path):
  Image.fromarray(np.zeros((1, 30000), np.uint8)).save(tmp_path / "strip.png")
  assert os.path.getsize(tmp_path / "strip.png") < 1000
  _png_header(tmp_path / "bomb.png", 14000, 14000)
  for name, why in (("strip.png", "aspect ratio"), ("bomb.png", "pixels|too large")):
    with pytest.raises(preprocess.ImageReadError, match=f"{name}.*({why})"):
      preprocess.read_image(tmp_path / name)
    with pytest.raises(ValueError, match=name):
      validate.image_size(tmp_path / name)
  records = [layout.Record("a", "train", "good", str(tmp_path / "strip.png"))]
  with pytest.raises(layout.DatasetError, match="strip.png"):
    validate.validate(records, tmp_path, class_names=[])
  got = list(predict.read_images([str(tmp_path / "strip.png")], 73, 64, 1))
  assert got[0][1] is None and "strip.png" in got[0][2]
  roomy = preprocess.Limits(max_pixels=10**6, max_aspect_ratio=40000.0)
  assert preprocess.read_image(tmp_path / "strip.png", roomy).shape == (1, 30000, 3)


# ----------------------------------------------------------------------------- 16: .pth reader


def _zip_pth(path, pkl: bytes, entries=(), compress=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    for name, data in entries:
      z.writestr(f"archive/data/{name}", data, compress_type=compress)


def test_torch_reader_bounds_and_build(tmp_path):
  torch = pytest.importorskip("torch")
  # stride 0: one stored element declared as a 2**28-element tensor
  torch.save({"w": torch.zeros(1).expand(2**28)}, tmp_path / "stride0.pth")
  assert os.path.getsize(tmp_path / "stride0.pth") < 4096
  with pytest.raises(torch_pickle.TorchPickleError, match="more elements than its storage"):
    torch_pickle.load_torch_state_dict(tmp_path / "stride0.pth")
  # a deflated storage entry declaring far more than the file holds
  torch.save({"w": torch.zeros(2**20)}, tmp_path / "ok.pth")
  with zipfile.ZipFile(tmp_path / "ok.pth") as z:
    items = [(i.filename, z.read(i)) for i in z.infolist()]
  with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in items:
      z.writestr(name, data)
  assert os.path.getsize(tmp_path / "bomb.pth") < 64 * 1024
  with pytest.raises(torch_pickle.TorchPickleError, match="compressed"):
    torch_pickle.load_torch_state_dict(tmp_path / "bomb.pth")
  assert torch_pickle.load_torch_state_dict(tmp_path / "ok.pth")["w"].shape == (2**20,)
  # BUILD on the shared storage stand-in: refused, and nothing changed for later loads
  evil = b"\x80\x02ctorch\nFloatStorage\nN}X\x04\x00\x00\x00nameX\x04\x00\x00\x00Evils\x86b."
  _zip_pth(tmp_path / "build.pth", evil)
  with pytest.raises(torch_pickle.TorchPickleError, match="BUILD"):
    torch_pickle.load_torch_state_dict(tmp_path / "build.pth")
  assert torch_pickle.ALLOWED_GLOBALS[("torch", "FloatStorage")].name == "FloatStorage"
  # a state dict's own OrderedDict state (torch's _metadata) is still read
  sd = torch.nn.Linear(2, 3).state_dict()
  torch.save(sd, tmp_path / "linear.pth")
  got = torch_pickle.load_torch_state_dict(tmp_path / "linear.pth")
  np.testing.assert_array_equal(got["weight"], sd["weight"].numpy())


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
