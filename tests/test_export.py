"""The portable export: jax.export with a symbolic batch, reloaded by cras_jax.deploy.run_exported
in a fresh process that imports only jax and numpy (and of cras_jax only the scorer's modules)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax import export
from cras_jax.deploy import exporting
from cras_jax.runs import specs
from cras_jax.scoring import scoring, thresholds
from tests import predict_helpers
from tests.conftest import ROOT
from tests.deploy import predict_decisions

# Libraries the exported model must not need (the project beyond the scorer, its model/data
# libraries). (scipy may appear: jaxlib's CPU runtime loads scipy.linalg.cython_blas, a
# dependency of jax itself.)
FORBIDDEN = (
    "flax",
    "optax",
    "orbax",
    "ml_collections",
    "tensorflow",
    "tensorflow_datasets",
    "PIL",
    "skimage",
    "matplotlib",
    "torch",
    "absl",
    "tqdm",
)

# Of cras_jax, the scorer may load only itself and the deploy modules it shares with run_onnx.
SCORER_MODULES = {
    "cras_jax",
    "cras_jax.deploy",
    "cras_jax.deploy.run_exported",
    "cras_jax.deploy.outputs",
    "cras_jax.base",
    "cras_jax.base.image_limits",
}

RUNNER = """
import json, sys
from cras_jax.deploy import run_exported
model, crops, out = sys.argv[1:4]
for bs in (3, 8):
  run_exported.main([model, crops, f"--batch_size={bs}", f"--output={out}_{bs}.npz", "--quiet"])
print("MODULES " + json.dumps(sorted(m for m in sys.modules if sys.modules[m])))
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
  workdir = str(tiny_run["workdir"])
  run = predict_helpers.loaded_run(workdir)
  images, ref = predict_helpers.reference_outputs(workdir, str(tiny_run["data_root"]))
  tmp = tmp_path_factory.mktemp("export")
  thr = scoring.load_thresholds(run, workdir)
  meta = export.export_run(run, thr, str(tmp / "model.npz"))
  np.save(tmp / "crops.npy", images)
  return {"dir": tmp, "meta": meta, "thr": thr, "images": images, "ref": ref, "run": run}


def test_exported_file_holds_function_weights_and_settings(exported, tiny_run):
  meta, thr = exported["meta"], exported["thr"]
  with np.load(exported["dir"] / "model.npz", allow_pickle=False) as f:
    stored = json.loads(f["meta"].tobytes().decode())
    assert stored == json.loads(json.dumps(meta))
    assert f["exported"].dtype == np.uint8 and f["exported"].size > 1000
    assert sum(k.startswith("w") for k in f.files) == meta["num_weights"]
  d = thresholds.load_dict(os.path.join(tiny_run["workdir"], "thresholds.json"))
  assert meta["class_names"] == ["chip", "fabric", "gear", "granite"]
  assert meta["input"]["shape"] == ["b", 64, 64, 3] and meta["input"]["resize"] == 73
  assert meta["thresholds"]["image"] == pytest.approx(d["image_threshold"])
  assert meta["thresholds"]["pixel"] == pytest.approx(d["pixel_threshold"])
  np.testing.assert_allclose(meta["normalisation"]["loc"], thr.loc, rtol=1e-6)
  # The run's state holds only the backbone stages its levels use: nothing left to drop.
  assert meta["weights_dropped_unused"] == 0
  assert set(meta["platforms"]) == {"cpu", "cuda"}


def test_the_meta_records_absent_thresholds_as_absent_and_the_image_limits(exported):
  """A run without thresholds: the meta says the thresholds are absent and that is_anomaly and
  masks then decide nothing (not null alone, which a reader may print as 0); every export
  records the image-size limits its scorers refuse by (predict's)."""
  run = exported["run"]
  meta = exporting.run_meta(run, thresholds.Thresholds.identity(run.class_names))
  t = meta["thresholds"]
  assert t["image"] is None and t["pixel"] is None and t["absent"] == ["image", "pixel"]
  assert "decides nothing" in t["note"] and "not 'normal'" in t["note"]
  assert "--image_threshold" in t["note"] and "--calibrate" in t["note"]
  partial = _run_meta_with(run, image_threshold=0.5)
  assert (
      partial["thresholds"]["absent"] == ["pixel"]
      and "no stored pixel" in partial["thresholds"]["note"]
  )
  stored = exported["meta"]["thresholds"]  # the run's own: both present, no note
  assert stored["absent"] == [] and "note" not in stored
  limits = specs.limits(run.config)
  assert exported["meta"]["input"]["max_image_pixels"] == limits.max_pixels == 50_000_000
  assert exported["meta"]["input"]["max_aspect_ratio"] == limits.max_aspect_ratio == 10.0


def _run_meta_with(run, **overrides) -> dict:
  thr = thresholds.Thresholds.identity(run.class_names).with_overrides(**overrides)
  return exporting.run_meta(run, thr)


def test_only_the_weights_the_traced_function_reads_are_kept():
  def fn(leaves, images, image_thr, pixel_thr):
    del pixel_thr
    return {"score": images.astype(jnp.float32).sum() * leaves[0].sum() + leaves[2] + image_thr}

  shapes = [
      jax.ShapeDtypeStruct((3,), jnp.float32),
      jax.ShapeDtypeStruct((5, 5), jnp.float32),  # never read
      jax.ShapeDtypeStruct((), jnp.float32),
  ]
  assert exporting.used_weights(fn, shapes, crop=4) == [0, 2]


def test_exported_function_in_a_fresh_process_equals_the_predict_step(exported):
  tmp = exported["dir"]
  out = subprocess.run(
      [
          sys.executable,
          "-c",
          RUNNER,
          str(tmp / "model.npz"),
          str(tmp / "crops.npy"),
          str(tmp / "out"),
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  modules = json.loads(out.stdout.split("MODULES ", 1)[1])
  top = {m.split(".")[0] for m in modules}
  assert "jax" in top and "numpy" in top
  assert not top & set(FORBIDDEN), top & set(FORBIDDEN)
  ours = {m for m in modules if m.split(".")[0] == "cras_jax"}
  assert ours <= SCORER_MODULES, ours - SCORER_MODULES

  ref, thr = exported["ref"], exported["thr"]
  # predict's decisions on the same crops: the image decisions must be the same, on every
  # test image of the run (its thresholds lie between calibration scores, not on one)
  decided = predict_decisions.predict_decisions(exported["run"], thr, exported["images"])
  z_ref = thresholds.normalise(ref["scores"], ref["cls"], thr.loc, thr.scale)
  zmaps_ref = thresholds.normalise_maps(ref["maps"], ref["cls"], thr.loc, thr.scale)
  for bs in (3, 8):  # one file, two batch sizes (20 images: padded last batches)
    got = np.load(tmp / f"out_{bs}.npz")
    assert got["scores"].shape == (20,)
    for key in ("scores", "maps", "patch"):
      np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(got["cls"], ref["cls"])
    np.testing.assert_allclose(got["normalised_scores"], z_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got["is_anomaly"], decided["anomalous"])
    assert (got["masks"] != decided["masks"]).mean() <= 1e-3  # pixels within 1e-6 may flip
    near = np.abs(zmaps_ref - thr.pixel_threshold) < 1e-4
    np.testing.assert_array_equal(got["masks"][~near], (zmaps_ref >= thr.pixel_threshold)[~near])


def test_scoring_an_export_without_thresholds_says_decisions_are_absent(exported, tmp_path, capsys):
  """A run without thresholds.json exported: run_exported prints n/a, not 0, where it applies
  no threshold, and says why on stderr; a threshold passed decides again."""
  from cras_jax.deploy import run_exported

  run = exported["run"]
  bare = str(tmp_path / "bare.npz")
  export.export_run(run, thresholds.Thresholds.identity(run.class_names), bare, ("cpu",))
  crops = str(exported["dir"] / "crops.npy")
  capsys.readouterr()
  for args, absent in (([], ["image", "pixel"]), (["--pixel_threshold=0.5"], ["image"])):
    run_exported.main([bare, crops, *args])
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.strip().splitlines()[1:]]
    assert len(rows) == len(exported["images"])
    assert all((r[4] == "n/a") == ("image" in absent) for r in rows), rows[:2]
    assert all((r[5] == "n/a") == ("pixel" in absent) for r in rows), rows[:2]
    assert f"no {' and '.join(absent)} threshold" in err and "not decided" in err


def test_exported_file_names_its_run_and_a_content_checksum(exported, tiny_run):
  from cras_jax.runs import checkpoint

  meta = exported["meta"]
  saved = checkpoint.restore_meta(checkpoint.manager(str(tiny_run["workdir"]), read_only=True))
  assert meta["run_id"] == saved["run_id"] and meta["config"] == saved["config"]
  assert {"jax", "cras_jax", "flax", "python"} <= set(meta["versions"])
  assert len(meta["checksum"]["sha256"]) == 64


def _tampered(src, dst, change: str) -> None:
  """A copy of the export at `src`, still a valid archive, with one thing changed."""
  with np.load(src, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  if change == "weight":
    name = max((k for k in arrays if k.startswith("w")), key=lambda k: arrays[k].size)
    arrays[name] = (arrays[name] * 1.5).astype(arrays[name].dtype)
  elif change == "function":
    blob = arrays["exported"].copy()
    blob[blob.size // 2] ^= 0x01
    arrays["exported"] = blob
  else:  # a stored threshold lowered: every image "anomalous"
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta["thresholds"]["image"] = -1e9
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  np.savez(dst, **arrays)


@pytest.mark.parametrize("change", ["weight", "function", "meta"])
def test_an_export_changed_after_writing_is_refused(exported, change, capsys):
  from cras_jax.deploy import run_exported

  model = exported["dir"] / f"tampered_{change}.npz"
  _tampered(exported["dir"] / "model.npz", model, change)
  with pytest.raises(run_exported.ExportError, match="do not match the checksum"):
    run_exported.load(str(model))
  with pytest.raises(SystemExit) as e:
    run_exported.main([str(model), str(exported["dir"] / "crops.npy"), "--quiet"])
  assert e.value.code == 2
  assert "do not match the checksum" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["image_threshold", "pixel_threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_threshold_is_refused_before_any_file_is_read(flag, value, tmp_path, capsys):
  from cras_jax.deploy import run_exported

  missing = tmp_path / "none.npz"  # never opened: the flag is refused first
  with pytest.raises(SystemExit) as e:
    run_exported.main([str(missing), str(tmp_path / "none.npy"), f"--{flag}={value}"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert f"--{flag}={float(value)}: must be a finite number" in err and "Traceback" not in err


def test_a_non_finite_threshold_given_to_the_scorer_is_refused(exported):
  from cras_jax.deploy import run_exported

  model = run_exported.load(str(exported["dir"] / "model.npz"))
  with pytest.raises(ValueError, match="must be a finite number"):
    run_exported.score(model, exported["images"][:1], image_threshold=float("nan"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_zip", "member_missing"])
def test_a_damaged_export_file_is_one_message_not_a_traceback(exported, damage, tmp_path, capsys):
  from cras_jax.deploy import run_exported

  good = (exported["dir"] / "model.npz").read_bytes()
  path = tmp_path / f"{damage}.npz"
  if damage == "truncated":
    path.write_bytes(good[: len(good) // 2])
  elif damage == "empty":
    path.write_bytes(b"")
  elif damage == "not_a_zip":
    path.write_bytes(b"garbage " * 64)
  else:
    with np.load(exported["dir"] / "model.npz") as f:
      np.savez(path, **{k: f[k] for k in f.files if k != "exported"})
  with pytest.raises(run_exported.ExportError, match="export the run again"):
    run_exported.load(str(path))
  with pytest.raises(SystemExit) as e:
    run_exported.main([str(path), str(exported["dir"] / "crops.npy"), "--quiet"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and str(path) in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1
