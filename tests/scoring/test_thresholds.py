"""thresholds.json is validated on load: every field scoring reads, named when unusable."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cras_jax.base import errors
from cras_jax.scoring import thresholds
from tests.conftest import ROOT

CLASSES = ["chip", "fabric", "gear", "granite"]


def _valid() -> dict:
  return {
      "class_names": list(CLASSES),
      "image_threshold": 1.2,
      "pixel_threshold": None,  # null: no pixel threshold stored
      "normalisation": {"loc": [0.1, 0.2, 0.3, 0.4], "scale": [0.5, 0.5, 0.5, 0.5]},
      "step": 9,
  }


def _write(workdir, d) -> None:
  text = d if isinstance(d, str) else json.dumps(d)
  (workdir / thresholds.FILE_NAME).write_text(text)


def test_a_valid_file_loads(tmp_path):
  _write(tmp_path, _valid())
  thr = thresholds.load(str(tmp_path), CLASSES)
  assert thr.image_threshold == pytest.approx(1.2) and thr.step == 9
  assert thr.scale.tolist() == [0.5] * 4


def _set(path: str, value):
  d = _valid()
  node, *keys = [d, *path.split(".")]
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value
  return d


@pytest.mark.parametrize(
    "content,message",
    [
        (_set("normalisation.scale", [0.5, 0.0, 0.5, 0.5]), r"scale.*> 0.*fabric \(0\.0\)"),
        (_set("normalisation.scale", [-0.5, -0.5, -0.5, -0.5]), r"scale.*> 0.*chip \(-0\.5\)"),
        (_set("normalisation.scale", [0.5, 0.5, 0.5]), r"scale: must be a list of 4.*got 3"),
        (_set("normalisation.loc", [0.1] * 5), r"loc: must be a list of 4.*got 5"),
        (_set("normalisation.scale", "1"), r"scale: must be a list of 4"),
        (_set("image_threshold", "high"), r"image_threshold='high': must be a finite number"),
        (_set("class_names", ["chip"]), r"class_names: made for \['chip'\]"),
        (_set("step", -1), r"step=-1"),
        ({"class_names": CLASSES}, r"image_threshold='<absent>'.*normalisation: missing"),
        (json.dumps(_valid()).replace("1.2", "NaN"), r"image_threshold=nan: must be a finite"),
        (json.dumps(_valid()).replace("0.3", "Infinity"), r"loc: entries must be finite.*gear"),
        ('{"class_names": ["chip", ', r"is not valid JSON"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_an_unusable_file_is_refused_naming_the_field(tmp_path, content, message):
  _write(tmp_path, content)
  with pytest.raises(errors.UserValueError, match=rf"(?s)thresholds\.json.*{message}.*calibrate"):
    thresholds.load(str(tmp_path), CLASSES)


def test_predict_with_malformed_thresholds_exits_2_with_one_line(tiny_run, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  _write(work, '{"class_names": ')
  image = next((tiny_run["data_root"] / "gear" / "test" / "good").iterdir())
  out = subprocess.run(
      [sys.executable, "-m", "cras_jax.predict", f"--workdir={work}", str(image)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(f"error: {work / 'thresholds.json'}")
  assert not (work / "predictions" / "results.csv").exists()


@pytest.mark.parametrize("stored", ["another-run", None])
def test_thresholds_of_another_run_or_of_no_named_run_are_refused(tmp_path, stored):
  _write(tmp_path, {**_valid(), "run_id": stored})
  with pytest.raises(
      errors.UserValueError, match=r"(?s)thresholds\.json.*(this run's id|this one)"
  ):
    thresholds.load(str(tmp_path), CLASSES, run_id="this-run")
  _write(tmp_path, {**_valid(), "run_id": "this-run"})
  assert thresholds.load(str(tmp_path), CLASSES, run_id="this-run").image_threshold == 1.2


def test_a_trained_runs_thresholds_name_its_run_and_another_runs_are_refused(tiny_run, tmp_path):
  from cras_jax import export
  from cras_jax.scoring import scoring
  from tests import predict_helpers
  from tests.conftest import run_command

  run = predict_helpers.loaded_run(str(tiny_run["workdir"]))
  fitted = thresholds.load_dict(thresholds.path(str(tiny_run["workdir"])))
  assert fitted["run_id"] == run.meta["run_id"] and fitted["run_id"]
  # the run copied, with the thresholds file of another run (same classes, another run id)
  work = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  _write(work, {**fitted, "run_id": "0" * len(fitted["run_id"])})
  with pytest.raises(errors.UserValueError, match="fitted on another run"):
    scoring.load_thresholds(run, str(work))
  # export refuses them too: they are never signed into an exported file
  with pytest.raises(errors.UserValueError, match="fitted on another run"):
    run_command(export, f"--workdir={work}", f"--output={tmp_path / 'm.npz'}")
  assert not (tmp_path / "m.npz").exists()


def test_a_population_members_thresholds_are_refused_for_another_member(tmp_path):
  _write(tmp_path, {**_valid(), "run_id": "pop", "member": "seed1"})
  with pytest.raises(errors.UserValueError, match="fitted on another member than 'seed0'"):
    thresholds.load(str(tmp_path), CLASSES, run_id="pop", member="seed0")
  assert thresholds.load(str(tmp_path), CLASSES, run_id="pop", member="seed1") is not None
  with pytest.raises(errors.UserValueError, match="another member than None"):
    thresholds.load(str(tmp_path), CLASSES, run_id="pop")  # a single run's reader
