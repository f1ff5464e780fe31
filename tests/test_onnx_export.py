"""The ONNX export: the whole scoring function as one .onnx file, scored by onnxruntime (and
OpenVINO) in a process where JAX cannot be imported, equal to the JAX scorer."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

from cras_jax.base import errors
from cras_jax.configs import demo
from cras_jax.data import preprocess
from cras_jax.deploy import compress, exporting, onnx_export, onnx_graph, onnx_metadata, run_onnx
from cras_jax.engine import steps
from cras_jax.runs import trained
from cras_jax.scoring import scoring, thresholds
from tests import predict_helpers
from tests.conftest import ROOT, run_command
from tests.deploy import predict_decisions

# Float32 parity with the JAX scorer, relative to each output's largest magnitude.
RTOL = 1e-4

# Run in a fresh process in which `import jax` fails: scores crops.npy, saves every output, and
# prints the top-level modules it loaded.
NO_JAX = """
import json, runpy, sys
sys.modules["jax"] = None  # any import of jax now raises ImportError
model, crops, out, runtime = sys.argv[1:5]
sys.argv = ["run_onnx", model, crops, f"--output={out}", f"--runtime={runtime}", "--batch_size=3", "--quiet"]
try:
  runpy.run_module("cras_jax.run_onnx", run_name="__main__")
except SystemExit as e:
  assert e.code in (0, None), e.code
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules if sys.modules[m]})))
"""
# openvino_telemetry: `import openvino` would send a usage event from a forked process
# (run_onnx._import_openvino)
FORBIDDEN = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax",
    "tensorflow",
    "torch",
    "onnx",
    "openvino_telemetry",
)


def _close(got: dict, want: dict, image_threshold: float):
  assert set(got) == set(want)
  for name, value in want.items():
    value = np.asarray(value)
    assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
    if value.dtype.kind == "f":
      scale = max(float(np.abs(value).max()), 1e-6)
      np.testing.assert_allclose(got[name], value, rtol=0, atol=RTOL * scale, err_msg=name)
  np.testing.assert_array_equal(got["cls"], want["cls"])
  # A decision may flip only where the normalised score lies within tolerance of the threshold.
  z = want["normalised_scores"]
  flipped = got["is_anomaly"] != want["is_anomaly"]
  near = np.abs(z - image_threshold) <= RTOL * max(float(np.abs(z).max()), 1e-6)
  assert not (flipped & ~near).any(), (z[flipped], image_threshold)
  # Pixels likewise (their normalised values are not an output): at most 0.1% of them.
  assert (got["masks"] != want["masks"]).mean() <= 1e-3


def _no_jax_run(model: str, crops: str, out: str, runtime: str = "onnxruntime") -> dict:
  res = subprocess.run(
      [sys.executable, "-c", NO_JAX, model, crops, out, runtime],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  modules = json.loads(res.stdout.split("MODULES ", 1)[1])
  assert not set(FORBIDDEN) & set(modules), set(FORBIDDEN) & set(modules)
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
  """The tiny demo run (EfficientNet-Lite0) exported as ONNX, its test crops and the JAX
  scorer's outputs on them (the export's function, with the run's thresholds)."""
  workdir = str(tiny_run["workdir"])
  run = predict_helpers.loaded_run(workdir)
  images, _ = predict_helpers.reference_outputs(workdir, str(tiny_run["data_root"]))
  tmp = tmp_path_factory.mktemp("onnx")
  thr = scoring.load_thresholds(run, workdir)
  meta = onnx_export.export_onnx(run, thr, str(tmp / "model.onnx"))
  np.save(tmp / "crops.npy", images)
  return {
      "dir": tmp,
      "meta": meta,
      "thr": thr,
      "images": images,
      "want": _jax_outputs(run, thr, images),
      "run": run,
  }


def _jax_outputs(run, thr, images) -> dict:
  """The JAX export's function (cras_jax.export) on `images`: the predict step plus the
  normalisation and decisions at the stored thresholds."""
  scorer, tree = exporting.score_tree(run, thr)
  leaves, treedef = jax.tree.flatten(tree)
  fn = jax.jit(exporting.make_score_fn(scorer.step_fn, treedef))
  ithr = np.float32(np.nan if thr.image_threshold is None else thr.image_threshold)
  pthr = np.float32(np.nan if thr.pixel_threshold is None else thr.pixel_threshold)
  return {k: np.asarray(v) for k, v in fn(leaves, images, ithr, pthr).items()}


def test_onnx_file_holds_the_run_meta_and_a_symbolic_batch(exported, tiny_run):
  path = exported["dir"] / "model.onnx"
  model = onnx.load(str(path))
  onnx.checker.check_model(model, full_check=True)
  props = {p.key: p.value for p in model.metadata_props}
  meta = json.loads(props[run_onnx.META_KEY])
  assert meta == json.loads(json.dumps(exported["meta"]))
  assert meta["class_names"] == ["chip", "fabric", "gear", "granite"]
  assert meta["input"]["resize"] == 73 and meta["input"]["crop"] == 64
  d = thresholds.load_dict(os.path.join(tiny_run["workdir"], "thresholds.json"))
  assert meta["thresholds"]["image"] == pytest.approx(d["image_threshold"])
  assert meta["run_id"] and meta["versions"]["onnx"] == onnx.__version__
  images = model.graph.input[0]
  assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert images.type.tensor_type.shape.dim[0].dim_param == "b"
  assert {o.name for o in model.graph.output} == set(meta["outputs"])
  # the metadata as the no-JAX reader parses it from the bytes, and the checksum holds
  data = path.read_bytes()
  assert onnx_metadata.metadata_props(data) == props
  assert run_onnx.file_checksum(data, props[run_onnx.SUM_KEY]) == props[run_onnx.SUM_KEY]


def test_onnxruntime_without_jax_equals_the_jax_scorer(exported):
  """Lite0: every output within 1e-4 (relative to its scale) of the JAX export's function, in
  batches of 3 (the last one short), in a process where JAX cannot be imported."""
  tmp = exported["dir"]
  got = _no_jax_run(str(tmp / "model.onnx"), str(tmp / "crops.npy"), str(tmp / "ort.npz"))
  _close(got, exported["want"], exported["thr"].image_threshold)
  assert len(set(got["cls"].tolist())) > 1  # several classes matched: the gather is exercised
  # predict's decisions, on every test image of the run: the same (its thresholds lie between
  # calibration scores, half a gap from each, not on one within the runtimes' 1e-6)
  decided = predict_decisions.predict_decisions(
      exported["run"], exported["thr"], exported["images"]
  )
  np.testing.assert_array_equal(got["is_anomaly"], decided["anomalous"])
  assert (got["masks"] != decided["masks"]).mean() <= 1e-3  # pixels within 1e-6 may flip


def test_openvino_runs_the_same_file(exported):
  pytest.importorskip("openvino", reason="OpenVINO is optional (requirements-openvino.txt)")
  tmp = exported["dir"]
  got = _no_jax_run(
      str(tmp / "model.onnx"), str(tmp / "crops.npy"), str(tmp / "ov.npz"), "openvino"
  )
  _close(got, exported["want"], exported["thr"].image_threshold)


def test_openvino_scores_alike_at_every_batch_size(exported):
  """OpenVINO runs the graph compiled for each batch size it is called with, keeping the
  `OPENVINO_SIZES_KEPT` used last: 1 to 6 images a call (the fifth size evicts one, batch 1
  comes back after) score 7 images as one call of all 7 does."""
  pytest.importorskip("openvino", reason="OpenVINO is optional (requirements-openvino.txt)")
  model = run_onnx.load(str(exported["dir"] / "model.onnx"), "openvino")
  x = exported["images"][:7]
  assert len(x) == 7 and run_onnx.OPENVINO_SIZES_KEPT < 6
  want = run_onnx.score(model, x)
  for bs in (1, 2, 3, 4, 5, 6, 1):
    got = run_onnx.score(model, x, bs)
    for name in ("scores", "maps", "normalised_scores"):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got["cls"], want["cls"])


@pytest.mark.slow  # the fast tier converts the demo's EfficientNet-Lite0 exactly (above)
def test_resnet_backbone_converts_exactly(tmp_path):
  """ResNet-18 (max pooling, strided convolutions, residual adds; random weights and centres):
  onnxruntime equals the JAX scorer at two batch sizes."""
  cfg = demo.get_config()
  cfg.model.backbone, cfg.model.weights = "resnet18", "random"
  cfg.data.resize, cfg.data.crop = 73, 64
  cfg.model.pre_embed_dim, cfg.model.embed_dim = 48, 32
  names = ["a", "b", "c"]
  spec, devices, state = trained.initial(cfg, len(names))
  rng = np.random.default_rng(1)
  state = state.replace(centres=jnp.asarray(rng.normal(size=state.centres.shape), jnp.float32))
  run = trained.Run(cfg, spec, devices, state, {"class_names": names, "run_id": "resnet-test"})
  thr = thresholds.Thresholds(names, np.zeros(3, np.float32), np.ones(3, np.float32), 0.6, 0.6)
  onnx_export.export_onnx(run, thr, str(tmp_path / "r18.onnx"))
  model = run_onnx.load(str(tmp_path / "r18.onnx"))
  images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
  want = _jax_outputs(run, thr, images)
  for bs in (2, 5):
    _close(run_onnx.score(model, images, batch_size=bs), want, thr.image_threshold)


def test_scoring_an_export_without_thresholds_says_decisions_are_absent(exported, tmp_path, capsys):
  """A run without thresholds.json exported: run_onnx prints n/a, not 0, where it applies no
  threshold, and says why on stderr; a threshold passed decides again."""
  run = exported["run"]
  bare = str(tmp_path / "bare.onnx")
  onnx_export.export_onnx(run, thresholds.Thresholds.identity(run.class_names), bare)
  crops = str(exported["dir"] / "crops.npy")
  capsys.readouterr()
  for args, absent in (([], ["image", "pixel"]), (["--image_threshold=0.5"], ["pixel"])):
    run_onnx.main([bare, crops, *args])
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.strip().splitlines()[1:]]
    assert len(rows) == len(exported["images"])
    assert all((r[4] == "n/a") == ("image" in absent) for r in rows), rows[:2]
    assert all((r[5] == "n/a") == ("pixel" in absent) for r in rows), rows[:2]
    assert f"no {' and '.join(absent)} threshold" in err and "not decided" in err


# A bfloat16 run's JAX scorer against the float32 graph: bfloat16 keeps 8 significant bits
# (a relative rounding of 2^-9, 0.2%, at each of the heads' layers); on the tiny run the image
# scores differ by 1.6% of their largest magnitude. 5%: that, with room for other weights.
BF16_SCORE_RTOL = 0.05


@pytest.mark.slow
def test_a_bfloat16_run_exports_computing_in_float32(exported, tmp_path):
  """model.dtype=bfloat16 (the shared run's state under a bfloat16 config: a run's state is the
  same whatever its dtype): the graph computes in float32 on the run's weights, says so in
  its meta, equals the float32 JAX scorer of those weights (RTOL) and the run's own bfloat16
  scorer within bfloat16's rounding (BF16_SCORE_RTOL), with the same matched classes."""
  run, thr, images = exported["run"], exported["thr"], exported["images"]
  cfg = copy.deepcopy(run.config)
  cfg.model.dtype = "bfloat16"
  bf16 = run._replace(
      config=cfg, spec=steps.ModelSpec(cfg, run.spec.num_classes, run.meta.get("grid"))
  )
  meta = onnx_export.export_onnx(bf16, thr, str(tmp_path / "bf16.onnx"))
  assert meta["compute_dtype"] == "float32" and meta["run_dtype"] == "bfloat16"
  assert "computes in float32" in meta["dtype_note"]
  assert exported["meta"]["run_dtype"] == "float32" and "dtype_note" not in exported["meta"]
  got = run_onnx.score(run_onnx.load(str(tmp_path / "bf16.onnx")), images)
  _close(got, exported["want"], thr.image_threshold)  # the float32 function of these weights
  want = _jax_outputs(bf16, thr, images)  # the run's own scorer, in bfloat16
  assert not np.array_equal(want["scores"], exported["want"]["scores"])  # bfloat16 did compute
  scale = float(np.abs(want["scores"]).max())
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=BF16_SCORE_RTOL * scale)
  np.testing.assert_array_equal(got["cls"], want["cls"])


def test_preprocess_helper_gives_the_loaders_pixels(tiny_run):
  """run_onnx.preprocess (numpy and Pillow only) equals the training's loader, pixel for pixel,
  on the demo images, a wide and a small image (padded by the centre crop)."""
  paths = predict_helpers.image_paths(tiny_run["data_root"])[:4]
  tmp = tiny_run["workdir"].parent / "preprocess_check"
  tmp.mkdir(exist_ok=True)
  rng = np.random.default_rng(2)
  for name, size in (("wide.png", (130, 75)), ("small.png", (40, 50))):
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp / name)
    paths.append(str(tmp / name))
  for p in paths:
    want = preprocess.load_example(p, None, 73, 64)[0]
    np.testing.assert_array_equal(run_onnx.preprocess(p, 73, 64), want, err_msg=p)


# ----------------------------------------------------------------------------- bad input


def _cli(*args, env=None, pre=""):
  code = pre + "import runpy, sys; sys.argv = ['run_onnx', *sys.argv[1:]]; "
  code += "runpy.run_module('cras_jax.run_onnx', run_name='__main__')"
  return subprocess.run(
      [sys.executable, "-c", code, *map(str, args)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


def test_bad_files_and_inputs_give_one_message_and_status_2(exported, tmp_path):
  good = exported["dir"] / "model.onnx"
  crops = exported["dir"] / "crops.npy"
  data = good.read_bytes()
  empty = tmp_path / "empty.onnx"
  empty.write_bytes(b"")
  tampered = tmp_path / "tampered.onnx"
  raw = bytearray(data)
  raw[len(raw) // 2] ^= 0x01  # one bit inside the weights
  tampered.write_bytes(bytes(raw))
  other = tmp_path / "other.onnx"
  node = onnx.helper.make_node("Identity", ["x"], ["y"])
  info = onnx.helper.make_tensor_value_info
  graph = onnx.helper.make_graph(
      [node],
      "g",
      [info("x", onnx.TensorProto.FLOAT, [1])],
      [info("y", onnx.TensorProto.FLOAT, [1])],
  )
  onnx.save(onnx.helper.make_model(graph), str(other))
  garbage = tmp_path / "garbage.onnx"
  garbage.write_bytes(b"\xff" * 100)
  stripped = tmp_path / "stripped.onnx"  # a weight changed and the checksum entry removed
  model = onnx.load(str(good))
  keep = [(p.key, p.value) for p in model.metadata_props if p.key != run_onnx.SUM_KEY]
  del model.metadata_props[:]
  onnx.helper.set_model_props(model, dict(keep))
  weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
  changed = onnx.numpy_helper.to_array(weight).copy()
  changed.flat[0] += 1
  weight.CopyFrom(onnx.numpy_helper.from_array(changed, weight.name))
  onnx.save(model, str(stripped))
  wrong_shape = tmp_path / "wrong.npy"
  np.save(wrong_shape, np.zeros((2, 32, 32, 3), np.uint8))
  floats = tmp_path / "floats.npy"
  np.save(floats, exported["images"].astype(np.float32))
  cases = [
      ((empty, crops), "empty (0 bytes)"),
      ((tampered, crops), "do not match the checksum"),
      ((stripped, crops), "no checksum of its contents"),
      ((other, crops), "not written by cras_jax"),
      ((garbage, crops), "not an ONNX file"),
      ((good, wrong_shape), "expected uint8 images [N, 64, 64, 3]"),
      ((good, floats), "expected uint8 images"),
      ((good, crops, "--image_threshold=nan"), "must be a finite number"),
      ((good, crops, f"--output={tmp_path}"), "is a folder; name the .npz file"),
      ((good, crops, f"--output={tmp_path}/no/s.npz"), "does not exist"),
      ((good, tmp_path / "missing.png"), "no such file or folder"),
      ((tmp_path / "missing.onnx", crops), "cannot be read"),
  ]
  for args, message in cases:
    res = _cli(*args)
    assert res.returncode == 2, (args, res.stderr[-2000:])
    assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    named = [
        str(a) for a in args if str(a) in res.stderr or f"--{str(a).lstrip('-')}" in res.stderr
    ]
    assert named, (args, res.stderr)  # the message names the file or the flag


def test_a_missing_runtime_names_the_install(exported):
  res = _cli(
      exported["dir"] / "model.onnx",
      exported["dir"] / "crops.npy",
      pre="import sys; sys.modules['onnxruntime'] = None; ",
  )
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "pip install onnxruntime==1.32.0" in res.stderr


def test_a_function_without_an_onnx_form_is_one_message(tiny_run, tmp_path, monkeypatch):
  """A primitive the converter cannot write: the export command names it and the other
  format (exit status 2 under errors.run), and writes nothing."""
  from cras_jax import export

  def refuse(run, thr, output, *compression):
    raise onnx_graph.UnsupportedPrimitive("no ONNX form for the JAX primitive 'sort'")

  monkeypatch.setattr(onnx_export, "export_onnx", refuse)
  with pytest.raises(errors.UserValueError, match=r"--format=onnx.*'sort'.*--format=jax"):
    run_command(
        export,
        f"--workdir={tiny_run['workdir']}",
        "--format=onnx",
        f"--output={tmp_path / 'm.onnx'}",
    )
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--format=onnx", "--output={tmp}/model.npz"], "pass --format=jax"),
        pytest.param(["--output={tmp}/model.onnx"], "pass --format=onnx", marks=pytest.mark.slow),
        pytest.param(
            ["--format=onnx", "--platforms=cpu"], "drop --platforms", marks=pytest.mark.slow
        ),
        pytest.param(["--format=tflite"], "one of <jax|onnx>", marks=pytest.mark.slow),
    ],
)
def test_export_command_refuses_flags_of_the_other_format(tiny_run, tmp_path, flags, message):
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "cras_jax.export",
          f"--workdir={tiny_run['workdir']}",
          *[f.format(tmp=tmp_path) for f in flags],
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- compressed exports


@pytest.fixture(scope="module")
def int8(exported, tiny_run):
  """The tiny run's float32 export (the `exported` fixture's file) quantised to int8 as
  `python -m cras_jax.export --precision=int8` does, calibrated on its training images."""
  data, meta32 = run_onnx.read(str(exported["dir"] / "model.onnx"))
  model = onnx.load_from_string(data)
  del model.metadata_props[:]
  images = onnx_export.check_images(exported["run"], str(tiny_run["workdir"]), 200)
  out, meta = compress.compress(model, meta32, "int8", images)
  path = exported["dir"] / "int8.onnx"
  path.write_bytes(out)
  return {"path": path, "meta": meta, "model32": model, "meta32": meta32, "images": images}


def test_int8_file_records_precision_calibration_versions_and_its_checksum(int8, tmp_path):
  data, meta = run_onnx.read(str(int8["path"]))  # the checksum verifies
  assert meta == json.loads(json.dumps(int8["meta"])) and meta["precision"] == "int8"
  c = meta["compression"]
  cal = c["calibration"]  # the tiny run's 24 normal training images, all of them
  assert cal["count"] == 24 and cal["split"] == "train" and "SHA-256" in cal["selection"]
  assert len(cal["sha256_crops"]) == len(cal["sha256_names"]) == 64
  assert (
      cal["sha256_crops"]
      == compress.image_identity(int8["images"].calibration, [], "", "")["sha256_crops"]
  )
  assert meta["versions"]["onnxruntime"] == onnxruntime.__version__ and meta["versions"]["onnx"]
  assert c["tool"] == "onnxruntime.quantization.quantize_static" and c["format"] == "QDQ"
  assert c["quantised_convolutions"] > 30 and c["runtimes"]["onnxruntime"]["verified"]
  assert "test split's 8 normal images" in c["check"]["images"]  # too few training images left
  model = onnx.load_from_string(data)
  assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version == 18
  assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
  assert len(data) < 0.5 * len(int8["model32"].SerializeToString())
  # the re-fitted thresholds are the file's, the run's kept beside them
  t = c["thresholds"]
  assert t["choice"] == "re-fitted" and meta["thresholds"]["image"] == t["refit"]["image"]
  assert t["run"]["image"] == int8["meta32"]["thresholds"]["image"]
  # one bit changed anywhere (a weight, the graph, the meta) and the file is refused
  raw = bytearray(data)
  raw[len(raw) // 3] ^= 0x01
  tampered = tmp_path / "tampered_int8.onnx"
  tampered.write_bytes(bytes(raw))
  with pytest.raises(run_onnx.ExportError, match="do not match the checksum"):
    run_onnx.read(str(tampered))


def test_int8_flags_the_same_images_as_fp32_within_the_bound(int8, exported):
  """The tiny run's int8 export decides its held-back normal images (the test split's, as the
  run has too few training images) as float32 does within the stated bound, and every test
  image within it too, at its re-fitted thresholds."""
  check = int8["meta"]["compression"]["check"]["runtimes"]["onnxruntime"]
  assert check["flip_rate"] <= compress.DEFAULT_MAX_FLIP_RATE, check
  got = run_onnx.score(run_onnx.load(str(int8["path"])), exported["images"], 8)
  want = exported["want"]  # the JAX scorer at the run's thresholds
  flips = got["is_anomaly"] != want["is_anomaly"]
  assert flips.mean() <= compress.DEFAULT_MAX_FLIP_RATE, (flips.sum(), len(flips))
  np.testing.assert_array_equal(got["cls"], want["cls"])


def test_the_flip_bound_refuses_with_the_figures_and_the_override_writes(int8):
  """A bound below the measured flip rate (here any: -1) refuses with the figures and the
  override flags; --force writes, saying so in the meta. fp16: the same check."""
  args = (int8["model32"], int8["meta32"], "fp16", int8["images"])
  with pytest.raises(compress.CompressionRefused) as e:
    compress.compress(*args, max_flip_rate=-1.0, runtimes=["onnxruntime"])
  message = str(e.value)
  assert isinstance(e.value, errors.UserValueError)  # exit status 2 under errors.run
  for part in ("--precision=fp16", "flip rate 0.000 > --max_flip_rate=-1", "drift max", "--force"):
    assert part in message, message
  data, meta = compress.compress(*args, max_flip_rate=-1.0, force=True, runtimes=["onnxruntime"])
  assert meta["compression"]["check"]["forced"] and meta["precision"] == "fp16"
  assert onnx_metadata.metadata_props(data)[run_onnx.SUM_KEY] == run_onnx.file_checksum(
      data, onnx_metadata.metadata_props(data)[run_onnx.SUM_KEY]
  )


def test_a_compressed_file_refuses_a_runtime_its_export_did_not_check(int8, exported, tmp_path):
  """An int8 file whose export checked onnxruntime alone: run_onnx --runtime=openvino is one
  message naming the file and the runtime, exit status 2; onnxruntime scores it."""
  meta = json.loads(json.dumps(int8["meta"]))
  meta["compression"]["runtimes"] = {"onnxruntime": {"verified": True}}
  path = tmp_path / "int8_ort.onnx"
  path.write_bytes(compress.stamp(onnx.load(str(int8["path"])), meta))
  res = _cli(path, exported["dir"] / "crops.npy", "--runtime=openvino", "--quiet")
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
  assert str(path) in res.stderr and "cannot be scored with openvino" in res.stderr
  assert len(run_onnx.score(run_onnx.load(str(path)), exported["images"])["scores"]) == len(
      exported["images"]
  )


def test_int8_file_runs_without_jax_and_alike_in_openvino(int8, exported):
  """run_onnx reads an int8 file with nothing more than an fp32 one needs (no JAX, no onnx). The
  export's check verified OpenVINO for this EfficientNet-Lite0 file, and OpenVINO scores it as
  onnxruntime does, up to the rounding of int8 arithmetic: the same matched classes, decisions
  within the flip bound. (OpenVINO 2026.4 computed this graph wrongly with a symbolic batch,
  drifting by ~4 normalised units: run_onnx compiles it for each batch size; batch 3 gives a
  ragged last batch. OpenVINO without JAX: `test_openvino_runs_the_same_file`.)"""
  tmp = exported["dir"]
  got = _no_jax_run(str(int8["path"]), str(tmp / "crops.npy"), str(tmp / "int8_out.npz"))
  assert got["scores"].shape == (len(exported["images"]),)
  pytest.importorskip("openvino", reason="OpenVINO is optional (requirements-openvino.txt)")
  assert len(exported["images"]) % 3, "the batch of 3 should leave a ragged last batch"
  assert int8["meta"]["compression"]["runtimes"]["openvino"] == {"verified": True}
  ov = run_onnx.score(run_onnx.load(str(int8["path"]), "openvino"), exported["images"], 3)
  np.testing.assert_array_equal(ov["cls"], got["cls"])
  assert (ov["is_anomaly"] != got["is_anomaly"]).mean() <= compress.DEFAULT_MAX_FLIP_RATE
  assert np.abs(ov["normalised_scores"] - got["normalised_scores"]).mean() < 0.5


def test_export_command_refuses_compression_flags_where_they_mean_nothing(tiny_run, tmp_path):
  from cras_jax import export  # noqa: PLC0415

  for flags, message in (
      (["--precision=int8"], "--precision applies to --format=onnx"),
      (["--format=onnx", "--calibration_images=10"], "only with --precision=fp16 or int8"),
  ):
    with pytest.raises(errors.UserValueError, match=message):
      run_command(export, f"--workdir={tiny_run['workdir']}", f"--output={tmp_path}/m.x", *flags)
  with pytest.raises(SystemExit) as e:
    run_command(export, f"--workdir={tiny_run['workdir']}", "--calibration_images=0")
  assert e.value.code == 2
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_export_command_writes_int8_and_refuses_beyond_the_bound(tiny_run, tmp_path, monkeypatch):
  """The command end to end: --precision=int8 writes a checked file; a measured flip rate over
  --max_flip_rate is one message with the figures (exit status 2) and nothing written;
  --force writes it."""
  from cras_jax import export  # noqa: PLC0415

  base = [f"--workdir={tiny_run['workdir']}", "--format=onnx", "--precision=int8"]
  run_command(export, *base, f"--output={tmp_path / 'a.onnx'}", "--calibration_images=12")
  meta = run_onnx.load(str(tmp_path / "a.onnx"))["meta"]
  assert meta["compression"]["calibration"]["count"] == 12
  assert "the test split's 8 normal images" in meta["compression"]["check"]["images"]
  compare = compress.compare

  def all_flipped(got, want, image_threshold):
    return {**compare(got, want, image_threshold), "flip_rate": 1.0, "flips": 8}

  monkeypatch.setattr(compress, "compare", all_flipped)
  with pytest.raises(compress.CompressionRefused, match=r"flip rate 1\.000 > --max_flip_rate=0.1"):
    run_command(export, *base, f"--output={tmp_path / 'b.onnx'}", "--max_flip_rate=0.1")
  assert not (tmp_path / "b.onnx").exists()
  run_command(export, *base, f"--output={tmp_path / 'b.onnx'}", "--force")
  assert run_onnx.read(str(tmp_path / "b.onnx"))[1]["compression"]["check"]["forced"]
