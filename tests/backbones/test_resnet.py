"""Tests for cras_jax.backbones.resnet (torchvision-compatible ResNets)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax.backbones.resnet import (
    ARCH_CONFIGS,
    LEVEL_CHANNELS,
    LEVEL_STRIDES,
    ResNet,
    from_torch_state_dict,
    init_random,
)
from tests import reference

TORCHVISION_PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _abstract_vars(arch: str, size=32):
  return jax.eval_shape(lambda: init_random(arch, jax.random.PRNGKey(0), size))


# ---------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAM_COUNTS))
def test_param_counts_match_torchvision(arch):
  variables = _abstract_vars(arch)
  assert _count(variables["params"]) == TORCHVISION_PARAM_COUNTS[arch]
  # BN running stats are separate and are mean/var pairs
  bs = variables["batch_stats"]
  assert _count(bs) > 0
  assert variables["params"]["fc"]["kernel"].shape == (LEVEL_CHANNELS[arch][4], 1000)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (61, 77)])
def test_level_shapes_and_strides(arch, hw):
  h, w = hw
  variables = _abstract_vars(arch)
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: ResNet(arch).apply(v, x), variables, x)
  assert sorted(out) == ["level1", "level2", "level3", "level4"]
  for lvl in range(1, 5):
    s = LEVEL_STRIDES[lvl]
    # ceil division matches the PyTorch conv/pool arithmetic chain
    exp_hw = (-(-h // s), -(-w // s))
    assert out[f"level{lvl}"].shape == (2, *exp_hw, LEVEL_CHANNELS[arch][lvl])
    assert out[f"level{lvl}"].dtype == jnp.float32


@pytest.mark.parametrize(
    "arch", ["resnet18", pytest.param("wide_resnet101_2", marks=pytest.mark.slow)]
)
def test_max_level_skips_later_stages(arch):
  variables = _abstract_vars(arch)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  for max_level in range(1, 5):
    out = jax.eval_shape(lambda v, x: ResNet(arch).apply(v, x, max_level=max_level), variables, x)
    assert sorted(out) == [f"level{i}" for i in range(1, max_level + 1)]
  # init with max_level=2 creates no layer3/layer4 parameters
  v2 = jax.eval_shape(
      lambda: ResNet(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), max_level=2)
  )
  assert "layer2_0" in v2["params"] and "layer3_0" not in v2["params"]
  out = jax.eval_shape(lambda v, x: ResNet(arch).apply(v, x, with_logits=True), variables, x)
  assert out["logits"].shape == (1, 1000)
  with pytest.raises(ValueError):
    ResNet(arch).apply(variables, jnp.zeros((1, 32, 32, 3)), max_level=5)


def test_naming_mirrors_torchvision():
  p = _abstract_vars("resnet50")["params"]
  assert {"conv1", "bn1", "layer1_0", "layer4_2", "fc"} <= set(p)
  assert set(p["layer1_0"]) == {
      "conv1",
      "bn1",
      "conv2",
      "bn2",
      "conv3",
      "bn3",
      "downsample_0",
      "downsample_1",
  }
  assert "downsample_0" not in p["layer1_1"]
  # wide: bottleneck width doubled, output channels unchanged
  pw = _abstract_vars("wide_resnet50_2")["params"]
  assert pw["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert p["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  # v1.5: stride on the 3x3 conv
  p18 = _abstract_vars("resnet18")["params"]
  assert set(p18["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_0", "downsample_1"}
  assert "downsample_0" not in p18["layer1_0"]


def test_unknown_arch():
  with pytest.raises(ValueError, match="unknown ResNet arch"):
    init_random("resnet34x", jax.random.PRNGKey(0), 32)


# ---------------------------------------------------------------------------
# independent PyTorch reference (compact copy of torchvision's structure)
# ---------------------------------------------------------------------------

try:  # torchvision is not a dependency; torch is optional for these tests
  import torch
  import torch.nn as tnn
except Exception:  # pragma: no cover
  torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch not importable")

if torch is not None:

  def _tconv(i, o, k, s, p):
    return tnn.Conv2d(i, o, k, stride=s, padding=p, bias=False)

  class TBasic(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64):
      super().__init__()
      self.conv1 = _tconv(inplanes, planes, 3, stride, 1)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.relu = tnn.ReLU(inplace=True)
      self.conv2 = _tconv(planes, planes, 3, 1, 1)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      idt = x
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      if self.downsample is not None:
        idt = self.downsample(x)
      return self.relu(out + idt)

  class TBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64):
      super().__init__()
      width = int(planes * (width_per_group / 64.0))
      self.conv1 = _tconv(inplanes, width, 1, 1, 0)
      self.bn1 = tnn.BatchNorm2d(width)
      self.conv2 = _tconv(width, width, 3, stride, 1)
      self.bn2 = tnn.BatchNorm2d(width)
      self.conv3 = _tconv(width, planes * 4, 1, 1, 0)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.relu = tnn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      idt = x
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      if self.downsample is not None:
        idt = self.downsample(x)
      return self.relu(out + idt)

  class TResNet(tnn.Module):

    def __init__(self, block, layers, width_per_group=64, num_classes=1000):
      super().__init__()
      self.inplanes = 64
      self.wpg = width_per_group
      self.conv1 = tnn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.relu = tnn.ReLU(inplace=True)
      self.maxpool = tnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
      self.layer1 = self._make_layer(block, 64, layers[0])
      self.layer2 = self._make_layer(block, 128, layers[1], 2)
      self.layer3 = self._make_layer(block, 256, layers[2], 2)
      self.layer4 = self._make_layer(block, 512, layers[3], 2)
      self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
      self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = tnn.Sequential(
            _tconv(self.inplanes, planes * block.expansion, 1, stride, 0),
            tnn.BatchNorm2d(planes * block.expansion),
        )
      mods = [block(self.inplanes, planes, stride, downsample, self.wpg)]
      self.inplanes = planes * block.expansion
      mods += [block(self.inplanes, planes, width_per_group=self.wpg) for _ in range(1, blocks)]
      return tnn.Sequential(*mods)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      feats = {}
      for i in range(1, 5):
        x = getattr(self, f"layer{i}")(x)
        feats[f"level{i}"] = x
      feats["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))
      return feats

  def _torch_model(arch: str, seed: int = 0) -> TResNet:
    block_type, layers, wpg = ARCH_CONFIGS[arch]
    block = TBasic if block_type == "basic" else TBottleneck
    torch.manual_seed(seed)
    m = TResNet(block, list(layers), wpg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for mod in m.modules():
        if isinstance(mod, tnn.Conv2d):
          tnn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu", generator=g)
        elif isinstance(mod, tnn.BatchNorm2d):
          reference.randomise_batchnorm(mod, g)
    return m.eval()


def _state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@requires_torch
@pytest.mark.parametrize(
    "arch,hw", [("resnet18", (61, 77)), pytest.param("resnet50", (64, 64), marks=pytest.mark.slow)]
)
def test_parity_with_pytorch(arch, hw):
  h, w = hw
  tmodel = _torch_model(arch)
  sd = _state_dict_numpy(tmodel)
  variables = from_torch_state_dict(sd, arch)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in tmodel(torch.from_numpy(x)).items()}

  out = jax.jit(lambda v, x: ResNet(arch).apply(v, x, with_logits=True))(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1))
  )
  errs = {}
  for lvl in range(1, 5):
    k = f"level{lvl}"
    got = np.asarray(out[k]).transpose(0, 3, 1, 2)
    assert got.shape == ref[k].shape, k
    errs[k] = _rel_err(got, ref[k])
  errs["logits"] = _rel_err(out["logits"], ref["logits"])
  print(f"{arch} {hw} rel errs: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
  for k, e in errs.items():
    assert e < 1e-4, (k, e)

  # the max_level path gives the same early features
  out2 = ResNet(arch).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), max_level=2)
  assert sorted(out2) == ["level1", "level2"]
  assert _rel_err(out2["level2"], out["level2"]) < 1e-5


@requires_torch
@pytest.mark.parametrize(
    "arch", ["wide_resnet50_2", pytest.param("wide_resnet101_2", marks=pytest.mark.slow)]
)
def test_wide_state_dict_converts(arch):
  """Key set and shapes of torchvision's wide models convert (no forward)."""
  block_type, layers, wpg = ARCH_CONFIGS[arch]
  with torch.device("meta"):
    tmodel = TResNet(TBottleneck, list(layers), wpg)
  shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
  # build a cheap numpy state dict of broadcast zeros (no memory per tensor)
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  variables = jax.eval_shape(lambda: init_random(arch, jax.random.PRNGKey(0), 32))
  conv = from_torch_state_dict(sd, arch)
  got = jax.tree_util.tree_map(lambda a: a.shape, conv)
  exp = jax.tree_util.tree_map(lambda a: a.shape, variables)
  assert got == exp


# ---------------------------------------------------------------------------
# conversion errors
# ---------------------------------------------------------------------------


def _fake_resnet18_state_dict() -> dict[str, np.ndarray]:
  """Synthetic torchvision-layout resnet18 state dict built from flax shapes."""
  from cras_jax.backbones.resnet import flax_path_to_torch_key

  variables = _abstract_vars("resnet18")
  sd = {}
  for coll in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables[coll])[0]
    for path, leaf in flat:
      names = tuple(p.key for p in path)
      shape = leaf.shape
      if names[-1] == "kernel":
        shape = (
            tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        )
      key = flax_path_to_torch_key(coll, names)
      sd[key] = np.zeros(shape, np.float32)
      if names[-1] == "mean":
        sd[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0)
  return sd


def test_fake_state_dict_converts_and_keys_look_like_torchvision():
  sd = _fake_resnet18_state_dict()
  for k in [
      "conv1.weight",
      "bn1.running_var",
      "layer1.0.conv2.weight",
      "layer2.0.downsample.0.weight",
      "layer2.0.downsample.1.running_mean",
      "layer4.1.bn2.num_batches_tracked",
      "fc.weight",
      "fc.bias",
  ]:
    assert k in sd, k
  assert sd["conv1.weight"].shape == (64, 3, 7, 7)
  assert sd["fc.weight"].shape == (1000, 512)
  v = from_torch_state_dict(sd, "resnet18")
  assert v["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert v["params"]["fc"]["kernel"].shape == (512, 1000)
  assert v["batch_stats"]["layer2_0"]["downsample_1"]["var"].shape == (128,)


def test_conversion_transposes_correctly():
  sd = _fake_resnet18_state_dict()
  rng = np.random.default_rng(0)
  sd["conv1.weight"] = rng.standard_normal((64, 3, 7, 7)).astype(np.float32)
  sd["fc.weight"] = rng.standard_normal((1000, 512)).astype(np.float32)
  sd["bn1.weight"] = rng.standard_normal(64).astype(np.float32)
  sd["bn1.running_var"] = rng.random(64).astype(np.float32)
  v = from_torch_state_dict(sd, "resnet18")
  k = np.asarray(v["params"]["conv1"]["kernel"])
  assert k[2, 5, 1, 17] == sd["conv1.weight"][17, 1, 2, 5]
  assert np.asarray(v["params"]["fc"]["kernel"])[3, 99] == sd["fc.weight"][99, 3]
  np.testing.assert_array_equal(v["params"]["bn1"]["scale"], sd["bn1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], sd["bn1.running_var"])


def test_conversion_missing_key_raises():
  sd = _fake_resnet18_state_dict()
  del sd["layer3.1.bn2.running_mean"]
  with pytest.raises(ValueError, match=r"missing.*layer3\.1\.bn2\.running_mean"):
    from_torch_state_dict(sd, "resnet18")


def test_conversion_unknown_key_raises():
  sd = _fake_resnet18_state_dict()
  sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"unknown.*layer5\.0\.conv1\.weight"):
    from_torch_state_dict(sd, "resnet18")
  # num_batches_tracked is only ignored for real BN layers
  sd = _fake_resnet18_state_dict()
  sd["conv1.num_batches_tracked"] = np.array(0)
  with pytest.raises(ValueError, match=r"conv1\.num_batches_tracked"):
    from_torch_state_dict(sd, "resnet18")


def test_conversion_wrong_shape_raises():
  sd = _fake_resnet18_state_dict()
  sd["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"shape.*layer2\.0\.conv1\.weight"):
    from_torch_state_dict(sd, "resnet18")
  # a resnet18 state dict is not a resnet50 one
  with pytest.raises(ValueError):
    from_torch_state_dict(_fake_resnet18_state_dict(), "resnet50")


def test_bfloat16_compute_dtype():
  # numpy-random variables from abstract shapes (avoids compiling init)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda a: (
          rng.standard_normal(a.shape) * (0.1 if len(a.shape) == 4 else 0.2)
          + (1.0 if len(a.shape) == 1 else 0.0)
      ).astype(np.float32),
      _abstract_vars("resnet18"),
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
  ref = ResNet("resnet18").apply(variables, x, max_level=1)
  out = ResNet("resnet18", compute_dtype=jnp.bfloat16).apply(variables, x, max_level=1)
  assert out["level1"].dtype == jnp.bfloat16
  assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32
  assert _rel_err(np.asarray(out["level1"], np.float32), ref["level1"]) < 5e-2
