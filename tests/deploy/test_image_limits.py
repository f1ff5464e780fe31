"""One rule for the images a scorer refuses unread (`deploy.image_limits`): predict applies it,
and run_onnx, which cannot import predict's (JAX-side) code, imports the same function."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cras_jax.base import image_limits, schema
from cras_jax.deploy import run_onnx
from cras_jax.scoring import predict_inputs
from tests.conftest import ROOT

META = {"input": {"resize": 73, "crop": 64, "max_image_pixels": 50_000_000, "max_aspect_ratio": 10}}


def _png(path, width, height):
  Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
  return str(path)


def test_the_defaults_are_the_schemas():
  assert image_limits.MAX_PIXELS == schema.default("data.max_image_pixels")
  assert image_limits.MAX_ASPECT_RATIO == schema.default("data.max_aspect_ratio")
  assert image_limits.from_meta({}) == {"max_pixels": 50_000_000, "max_aspect_ratio": 10.0}
  assert image_limits.from_meta(META) == image_limits.from_meta({})


def test_the_rule():
  assert image_limits.problem(180, 20) is None  # 9:1
  assert "aspect ratio over data.max_aspect_ratio=10" in image_limits.problem(240, 20)  # 12:1
  assert "data.max_image_pixels=100" in image_limits.problem(11, 10, max_pixels=100)
  assert image_limits.problem(240, 20, max_aspect_ratio=12) is None
  assert image_limits.problem(0, 5) is not None


def test_predict_refuses_by_the_shared_rule(tmp_path, monkeypatch):
  """predict's reader refuses a 12:1 image and reads a 9:1 one, by `image_limits.problem`:
  the rule replaced there changes what predict refuses."""
  wide, fine = _png(tmp_path / "wide.png", 240, 20), _png(tmp_path / "fine.png", 180, 20)
  got = list(predict_inputs.read_images([wide, fine], 73, 64, 1))
  assert got[0][1] is None and "wide.png" in got[0][2] and "aspect ratio" in got[0][2]
  assert got[1][1].shape == (64, 64, 3) and got[1][2] is None
  monkeypatch.setattr(image_limits, "problem", lambda *a, **k: "refused by the shared rule")
  got = list(predict_inputs.read_images([fine], 73, 64, 1))
  assert got[0][1] is None and "refused by the shared rule" in got[0][2]


def test_run_onnx_imports_no_jax_with_the_rule():
  code = (
      "import sys; sys.modules['jax'] = None; "
      "from cras_jax.base import image_limits; from cras_jax.deploy import run_onnx; "
      "print(sorted(m for m in sys.modules if m.startswith('cras_jax')))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  loaded = set(json.loads(out.stdout.replace("'", '"')))
  allowed = {"cras_jax", "cras_jax.deploy", "cras_jax.base", "cras_jax.base.image_limits"}
  allowed |= {
      "cras_jax.deploy.run_onnx",
      "cras_jax.deploy.outputs",
      "cras_jax.deploy.onnx_metadata",
  }
  assert loaded <= allowed, loaded - allowed


def test_run_onnx_refuses_what_predict_refuses(tmp_path):
  wide, fine = _png(tmp_path / "wide.png", 240, 20), _png(tmp_path / "fine.png", 180, 20)
  assert run_onnx.inputs_to_crops([fine], META)[0].shape == (1, 64, 64, 3)
  with pytest.raises(run_onnx.ExportError, match=r"wide\.png.*aspect ratio over"):
    run_onnx.inputs_to_crops([wide], META)
